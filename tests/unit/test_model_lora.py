"""LoRA: exact trainable sets (decoder attention only) and merged weights with the same logits."""

from __future__ import annotations

import pytest
import torch

from owl import IMAGE_TOKEN_ID
from owl.model import build_model
from owl.model.lora import apply_lora, merge_lora


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, k + 8), generator=torch.Generator().manual_seed(0))
    ids[0, 2 : 2 + k] = IMAGE_TOKEN_ID
    return ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_default_lora_trains_exactly_decoder_q_and_v_adapters() -> None:
    model = apply_lora(build_model("debug-tiny"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"decoder.layers.{i}.attn.{proj}.lora_{ab}.default.weight"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert trainable == expected  # no ViT/abstractor q_proj, no k_proj_visual, no base weights


def test_modules_to_save_are_trainable_in_place() -> None:
    model = apply_lora(
        build_model("debug-tiny"), r=4, target_modules=("k_proj", "k_proj_visual"),
        modules_to_save=("abstractor",),
    )  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    abstractor = {n for n, _ in model.named_parameters() if n.startswith("abstractor.")}
    adapters = trainable - abstractor
    assert abstractor <= trainable
    assert len(adapters) == 2 * 2 * 2
    assert all(".attn.k_proj" in n and ".lora_" in n for n in adapters)


def test_bad_lora_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="not decoder attention projections"):
        apply_lora(build_model("debug-tiny"), target_modules=("fc1",))
    with pytest.raises(ValueError, match="not modules of the model"):
        apply_lora(build_model("debug-tiny"), modules_to_save=("decoder.nope",))


def test_merged_model_has_plain_names_and_the_same_logits() -> None:
    torch.manual_seed(0)
    plain_names = set(build_model("debug-tiny").state_dict())
    model = apply_lora(build_model("debug-tiny")).eval()
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    batch = _batch(model.cfg.num_visual_tokens)
    with torch.no_grad():
        before = model(*batch)
        merged = merge_lora(model)
        after = merged(*batch)
    assert set(merged.state_dict()) == plain_names
    assert (before - after).abs().max() <= 1e-5
