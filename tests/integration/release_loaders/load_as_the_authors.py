"""Run inside the authors' stack (transformers 4.31.0 for mPLUG-Owl2, 4.28.1 for mPLUG-Owl; no owl,
no torch): load an exported release folder the way their users do and print what came out, as JSON.

The calls follow their code's facts (X-PLUG/mPLUG-Owl, read, not copied):
- owl2: `AutoTokenizer.from_pretrained(path, use_fast=False)`, `CLIPImageProcessor.from_pretrained`;
  an image is padded to a square with the processor's mean colour (each channel `int(mean * 255)`)
  when the config's `image_aspect_ratio` is "pad", else stretched to a square, then preprocessed;
  the prompt's first piece is tokenized with special tokens (BOS first); the context length is
  the config's `max_sequence_length`, else 2048; the text part of the config is a LlamaConfig.
- owl1: `AutoTokenizer.from_pretrained(path)`, `CLIPImageProcessor.from_pretrained` (their
  MplugOwlImageProcessor adds nothing to it); `MplugOwlProcessor` stretches an image to
  `size["shortest_edge"]` square (bicubic) and tokenizes text without special tokens after a BOS
  it adds itself; `text_config` is built by transformers' own config class for its model_type.

Usage: python load_as_the_authors.py REQUEST_JSON  (folder, variant, texts, image, use_fast)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _tokenizer(folder: str, variant: str, use_fast: bool | None):
    from transformers import AutoTokenizer

    if use_fast is None:  # as their code calls it
        use_fast = variant == "owl1"
    return AutoTokenizer.from_pretrained(folder, use_fast=use_fast, trust_remote_code=True)


def _ids(tokenizer, variant: str, text: str) -> list[int]:
    if variant == "owl2":  # tokenizer_image_token: the first piece keeps the tokenizer's BOS
        return list(tokenizer(text).input_ids)
    return [tokenizer.bos_token_id] + list(tokenizer(text, add_special_tokens=False).input_ids)


def _pixels(folder: str, variant: str, config: dict, image_path: str) -> np.ndarray:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(folder)
    image = Image.open(image_path).convert("RGB")
    if variant == "owl1":
        size = processor.size.get("shortest_edge", 224)
        return processor(image.resize((size, size), 3), return_tensors="np").pixel_values[0]
    side = max(image.size)
    if config.get("image_aspect_ratio") == "pad":
        colour = tuple(int(x * 255) for x in processor.image_mean)
        square = Image.new(image.mode, (side, side), colour)
        square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        image = square
    else:
        image = image.resize((side, side))
    return processor.preprocess(image, return_tensors="np")["pixel_values"][0]


def _text_config(variant: str, config: dict) -> dict:
    from transformers import LlamaConfig
    from transformers.models.auto import CONFIG_MAPPING

    if variant == "owl2":  # their MPLUGOwl2Config is a LlamaConfig with a visual_config
        text = LlamaConfig(**{k: v for k, v in config.items() if k != "visual_config"})
    else:
        text = CONFIG_MAPPING[config["text_config"]["model_type"]](**config["text_config"])
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act",
              "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")  # fmt: skip
    return {name: getattr(text, name) for name in fields}


def main(request: dict) -> dict:
    import transformers
    from transformers import GenerationConfig
    from transformers.utils import is_safetensors_available

    folder, variant = request["folder"], request["variant"]
    config = json.loads(Path(folder, "config.json").read_text())
    tokenizer = _tokenizer(folder, variant, request.get("use_fast"))
    out = {
        "transformers": transformers.__version__,
        "safetensors_available": is_safetensors_available(),
        "tokenizer_class": type(tokenizer).__name__,
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "ids": [_ids(tokenizer, variant, text) for text in request["texts"]],
        "decoded": [
            tokenizer.decode(_ids(tokenizer, variant, t), skip_special_tokens=True)
            for t in request["texts"]
        ],  # fmt: skip
        "pixels": _pixels(folder, variant, config, request["image"]).tolist(),
        "text_config": _text_config(variant, config),
        "context_len": config.get("max_sequence_length", 2048),
    }
    generation = GenerationConfig.from_pretrained(folder)
    out["generation"] = [generation.bos_token_id, generation.eos_token_id, generation.pad_token_id]
    if Path(folder, "tokenizer.model").exists():  # LLaMA's own definition: sentencepiece ids
        import sentencepiece

        model = sentencepiece.SentencePieceProcessor(
            model_file=str(Path(folder, "tokenizer.model"))
        )
        out["sentencepiece_ids"] = [model.encode(text) for text in request["texts"]]
    return out


def train_sentencepiece(corpus: str, prefix: str, vocab_size: int) -> None:
    """A small LLaMA-style sentencepiece BPE model (<unk>=0, <s>=1, </s>=2), as LLaMA's
    tokenizer.model stands in a tokenizer folder."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip


if __name__ == "__main__":
    request = json.loads(Path(sys.argv[1]).read_text())
    if "train_sentencepiece" in request:
        train_sentencepiece(**request["train_sentencepiece"])
    else:
        print(json.dumps(main(request)))
