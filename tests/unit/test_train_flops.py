"""The FLOP formula behind MFU (owl.train.metrics.flop_terms) against torch's own FLOP counter on
a real forward + backward of the tiny model."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config
from owl.model import linear as linear_module
from owl.train.loss import token_loss_sum
from owl.train.metrics import attention_pairs, flop_terms, model_flops, train_flops


def _counted_step(variant: str, rows: int, length: int, images_per_row: int) -> tuple:
    """FlopCounterMode's count of one training step's forward + backward (one sample per row, so
    every token attends over its whole row), and the batch's counts."""
    torch.manual_seed(0)
    cfg = get_config("debug-tiny", variant)
    model = OwlModel(cfg).train()
    k = cfg.num_visual_tokens
    row = [1, *[IMAGE_TOKEN_ID] * k * images_per_row]
    row += torch.randint(3, cfg.decoder.vocab_size, (length - len(row),)).tolist()
    ids = torch.tensor([row] * rows)
    size = cfg.vision.image_size
    images = torch.randn(rows * images_per_row, 3, size, size)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX)
    segments = torch.ones_like(ids)
    # Torch's counter counts matmuls, convolutions and its fused SDPA kernels; on CPU SDPA's
    # kernel is not among them, so attention runs as the math backend's matmuls here.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids, images, segment_ids=segments)
        token_loss_sum(logits, labels, segments).backward()
    return cfg, counter.get_total_flops(), ids.numel(), attention_pairs(segments), len(images)


@pytest.mark.parametrize("variant", ["owl2", "owl1"])
def test_flop_terms_equal_torch_flop_counter(variant: str, monkeypatch) -> None:
    # Every product through F.linear (counted); oneDNN's op is not in the counter's table.
    monkeypatch.setattr(linear_module, "PREFER_ONEDNN", False)
    cfg, counted, tokens, pairs, images = _counted_step(
        variant, rows=2, length=48, images_per_row=2
    )
    terms = flop_terms(cfg, tokens=tokens, attention_pairs=pairs, images=images)
    assert sum(terms.values()) == counted  # exact: every matmul of the step is in the formula
    assert all(terms[name] > 0 for name in terms if name != "mam_second_branch")
    # MFU's model FLOPs leave out Owl2's second MAM key/value branch (computed, then discarded).
    assert (terms["mam_second_branch"] > 0) == (variant == "owl2")
    model = train_flops(cfg, tokens=tokens, attention_pairs=pairs, images=images)
    assert model == model_flops(terms) == counted - terms["mam_second_branch"]


def test_attention_pairs_sums_squared_sample_lengths() -> None:
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert attention_pairs(segments) == 3 * 3 + 2 * 2 + 6 * 6  # padding (0) attends to nothing
