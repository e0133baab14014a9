"""Tiny Hugging Face CLIP vision and LLaMA folders, written by transformers' own save_pretrained
(the layout a user downloads: config.json + model.safetensors), for the init step's tests and the
recipe rehearsals. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch


def save_clip_and_llama(
    clip_dir: Path,
    llama_dir: Path,
    *,
    vision_layers: int = 1,
    vocab_size: int = 128,
    num_kv_heads: int = 2,
) -> None:
    """A 32-px CLIP ViT (patch 8: a 4x4 grid, width 32) and a 2-layer LLaMA (hidden 64, 4
    heads; grouped KV by default: 2 KV heads), random weights from seed 0."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=vision_layers, num_attention_heads=2, hidden_act="quick_gelu",
        )
    )  # fmt: skip
    clip.save_pretrained(clip_dir)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=num_kv_heads, rms_norm_eps=1e-6,
        )
    )  # fmt: skip
    llama.save_pretrained(llama_dir)


def save_clip_model(folder: Path, *, image_size: int = 32, seed: int = 0) -> None:
    """A full tiny CLIPModel (both towers, width 32, projections 16) with its tokenizer (a
    byte-level vocabulary, no merges) and image processor, as a downloaded CLIP folder holds
    them: what the filter step's CLIP score loads. Random weights from `seed`."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + symbols + [s + "</w>" for s in symbols])}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    torch.manual_seed(seed)
    text = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2,
    )  # fmt: skip
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    CLIPModel(config).save_pretrained(folder)
