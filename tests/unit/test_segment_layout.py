"""Per-segment attention (SegmentLayout) against the dense block-diagonal causal mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import owl.model.model as model_module
from owl import IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config
from owl.model.decoder import SegmentLayout, _buckets
from owl.model.model import segment_mask


def _segments(rows: list[list[int]], length: int) -> torch.Tensor:
    """Rows given as sample lengths, packed left to right, right-padded with segment 0."""
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for b, lengths in enumerate(rows):
        start = 0
        for k, n in enumerate(lengths, start=1):
            out[b, start : start + n] = k
            start += n
    return out


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor):
    mask = segment_mask(segments, segments)  # (B, 1, T, T)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)  # (B, T, h, d)


@pytest.mark.parametrize(
    "rows",
    [
        [[5, 40, 3, 1], [48], [20, 20, 7], [2]],  # packed rows, padding, 1-token segments
        [[30], [9], [49], [17]],  # padding mode: one sample per row
    ],
)
def test_attention_and_gradients_equal_the_dense_mask(rows: list[list[int]]) -> None:
    torch.manual_seed(0)
    segments = _segments(rows, 49)
    real = (segments > 0)[..., None, None]  # (B, T, 1, 1)
    q, k, v = (torch.randn(4, 49, 2, 8, requires_grad=True) for _ in range(3))
    weights = torch.randn(4, 49, 2, 8)

    layout = SegmentLayout(segments, slack=1.1, min_length=4)
    assert len(layout.shapes) > 1  # several buckets, so the regrouping is exercised
    ours = layout.attend(q, k, v)
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    dense = _dense(q, k, v, segments)
    expected = torch.autograd.grad((dense * weights * real).sum(), (q, k, v))

    assert not torch.equal(ours, dense)  # padding: zero attention output vs padding-to-padding
    torch.testing.assert_close(ours * real, dense * real, atol=1e-5, rtol=1e-5)
    assert torch.all(ours[~real.expand_as(ours)] == 0)  # padding tokens get a zero output
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_every_real_token_has_exactly_one_slot() -> None:
    segments = _segments([[5, 40, 3, 1], [48], [20, 20, 7], [2]], 49)
    layout = SegmentLayout(segments, slack=1.1, min_length=4)
    slots = sum(n * width for n, width in layout.shapes)
    real = torch.nonzero(segments.flatten() > 0).flatten()
    assert torch.all(layout.scatter[segments.flatten() == 0] == slots)  # padding -> zero slot
    assert torch.equal(layout.gather[layout.scatter[real]], real)  # each token reads itself back
    assert len(set(layout.scatter[real].tolist())) == len(real)


def test_buckets_bound_padding_cost_and_keep_short_segments_together() -> None:
    lengths = [100, 90, 50, 49, 10, 8, 3]
    runs = _buckets(lengths, slack=1.25, min_length=16)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous, in order
    for lo, hi in runs:
        widest, inside = lengths[lo], lengths[lo:hi]
        if widest > 16:
            assert len(inside) * widest**2 <= 1.25 * sum(n * n for n in inside)
    assert runs[-1] == (4, 7)  # 10, 8, 3: at most min_length wide, one call
    assert _buckets([], slack=1.25, min_length=16) == []


@pytest.mark.parametrize("variant", ["owl1", "owl2"])
def test_model_logits_and_gradients_equal_the_dense_mask(variant: str, monkeypatch) -> None:
    """The whole model (debug-tiny without and with the MAM) on a packed batch with images: the
    per-segment attention gives the real tokens' logits and every parameter's gradient of SDPA
    under the dense block-diagonal mask (the model's attention before `SegmentLayout`)."""
    torch.manual_seed(0)
    model = OwlModel(get_config("debug-tiny", variant)).train()
    k = model.cfg.num_visual_tokens
    segments = _segments([[45, 8, 6], [k + 30, k + 2], [3]], 62)  # packed rows, padding
    ids = torch.randint(3, 256, segments.shape)
    ids[0, 45 : 45 + k] = ids[1, :k] = ids[1, k + 30 : 2 * k + 30] = IMAGE_TOKEN_ID
    images = torch.randn(3, 3, 32, 32)
    real = (segments > 0)[..., None]
    weights = torch.randn(*segments.shape, 256) * real  # a loss over the real tokens only
    params = list(model.parameters())

    def logits_and_grads() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        logits = model(ids, images, segment_ids=segments)
        return logits, torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)

    assert len(SegmentLayout(segments).shapes) > 1  # several buckets
    ours, ours_grads = logits_and_grads()
    monkeypatch.setattr(model_module, "SegmentLayout", lambda s: segment_mask(s, s))
    dense, dense_grads = logits_and_grads()
    assert not torch.equal(ours, dense)  # padding: zero attention output vs padding-to-padding
    torch.testing.assert_close(ours * real, dense * real, atol=1e-5, rtol=1e-5)
    for (name, _), got, want in zip(model.named_parameters(), ours_grads, dense_grads):
        assert (got is None) == (want is None), name
        if got is not None:
            assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max()), name  # rounding
