"""The composed forward pass: image splicing, packing, bad inputs, gradients, bf16, checkpointing."""

from __future__ import annotations

import pytest
import torch

from owl import IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config
from owl.model.positions import positions_from_segments

K = get_config("debug-tiny").num_visual_tokens


@pytest.fixture(scope="module")
def model() -> OwlModel:
    torch.manual_seed(0)
    return OwlModel(get_config("debug-tiny")).eval()


def _sample(num_text: int, num_images: int, seed: int) -> torch.Tensor:
    """Token ids (L,) with `num_images` image runs spread between text tokens."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randint(1, 256, (num_text,), generator=generator)]
    for _ in range(num_images):
        parts.insert(1, torch.full((K,), IMAGE_TOKEN_ID))
        parts.insert(1, torch.randint(1, 256, (2,), generator=generator))
    return torch.cat(parts)


def test_logits_shape_and_images_fill_slots_in_order(model: OwlModel) -> None:
    ids = torch.stack([_sample(5, 1, 0), _sample(5, 1, 1)])  # (2, T)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(ids, images)
        swapped = model(ids, images.flip(0))
        row0_alone = model(ids[:1], images[:1])
    assert logits.shape == (2, ids.shape[1], 256)
    assert torch.allclose(logits[:1], row0_alone, atol=1e-5)  # image 0 belongs to row 0
    assert not torch.allclose(logits, swapped, atol=1e-3)


def test_packed_row_equals_each_sample_alone(model: OwlModel) -> None:
    first, second = _sample(4, 1, 2), _sample(6, 2, 3)
    images = torch.randn(3, 3, 32, 32)
    packed = torch.cat([first, second, torch.zeros(3, dtype=torch.long)])[None]  # + right padding
    segments = torch.cat(
        [torch.full_like(first, 1), torch.full_like(second, 2), torch.zeros(3, dtype=torch.long)]
    )[None]
    with torch.no_grad():
        together = model(packed, images, segment_ids=segments)
        alone_1 = model(first[None], images[:1])
        alone_2 = model(second[None], images[1:])
    n1, n2 = len(first), len(second)
    assert (together[0, :n1] - alone_1[0]).abs().max() <= 1e-5
    assert (together[0, n1 : n1 + n2] - alone_2[0]).abs().max() <= 1e-5
    assert torch.isfinite(together).all()  # padded queries attend only to padding, never NaN


def test_positions_restart_per_segment() -> None:
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0]])
    assert positions_from_segments(segments).tolist() == [[0, 1, 0, 1, 2, 0, 1, 0]]


def test_left_padding_with_segments_matches_unpadded(model: OwlModel) -> None:
    ids = _sample(5, 1, 4)
    image = torch.randn(1, 3, 32, 32)
    padded = torch.cat([torch.zeros(4, dtype=torch.long), ids])[None]
    segments = (torch.arange(padded.shape[1]) >= 4).long()[None]
    with torch.no_grad():
        left = model(padded, image, segment_ids=segments)[0, 4:]
        plain = model(ids[None], image)[0]
    assert (left - plain).abs().max() <= 1e-5


def test_image_count_mismatch_names_both_counts(model: OwlModel) -> None:
    ids = _sample(5, 2, 5)[None]
    with pytest.raises(ValueError, match=r"hold 2 image\(s\).*but 1 image\(s\) were given"):
        model(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"hold 2 image\(s\).*but 0 image\(s\)"):
        model(ids)


def test_broken_slot_run_is_rejected(model: OwlModel) -> None:
    ids = _sample(5, 1, 6)
    ids = torch.cat([ids, torch.full((1,), IMAGE_TOKEN_ID)])[None]  # a stray single slot
    with pytest.raises(ValueError, match=f"not a multiple of num_visual_tokens={K}"):
        model(ids, torch.randn(1, 3, 32, 32))


def test_wrong_image_size_names_expected_and_got(model: OwlModel) -> None:
    ids = _sample(5, 1, 7)[None]
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\).*got \(1, 3, 48, 48\)"):
        model(ids, torch.randn(1, 3, 48, 48))


def test_text_only_training_batch_still_reaches_every_parameter() -> None:
    """Same module sequence whatever the batch holds: ViT/abstractor run on an empty batch."""
    model = OwlModel(get_config("debug-tiny")).train()
    model(torch.randint(0, 256, (2, 12))).sum().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    assert model.vision.patch_embed.weight.grad.abs().sum() == 0


def test_visual_copies_get_gradients_only_from_visual_tokens() -> None:
    model = OwlModel(get_config("debug-tiny")).train()
    ids = _sample(6, 1, 8)[None]
    model(ids, torch.randn(1, 3, 32, 32)).sum().backward()
    grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if "_visual" in n}
    assert len(grads) == 8 and all(g > 0 for g in grads.values())
    model.zero_grad(set_to_none=True)
    model(torch.randint(0, 256, (1, 12))).sum().backward()
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if "_visual" in n)


@pytest.mark.parametrize("variant", ["owl1", "owl2"])
def test_activation_checkpointing_gives_identical_gradients(variant: str) -> None:
    """Vision, abstractor and decoder layers are all checkpointed (each layer's forward runs again
    during backward), and every gradient equals the one without checkpointing."""
    torch.manual_seed(1)
    plain = OwlModel(get_config("debug-tiny", variant)).train()
    ckpt = OwlModel(plain.cfg.replace(activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids, images = _sample(5, 1, 9)[None], torch.randn(1, 3, 32, 32)
    calls: dict[tuple[str, str], int] = {}
    for label, m in (("plain", plain), ("ckpt", ckpt)):
        for part in ("vision", "abstractor", "decoder"):
            for layer in getattr(m, part).layers:
                key = (label, part)
                # A pre-hook: recomputation stops early, after the last tensor backward needs.
                layer.register_forward_pre_hook(
                    lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1)
                )
        m(ids, images).square().mean().backward()
    num_layers = {
        part: len(getattr(plain, part).layers) for part in ("vision", "abstractor", "decoder")
    }
    for part, n in num_layers.items():
        assert calls[("plain", part)] == n, part
        assert calls[("ckpt", part)] == 2 * n, part  # recomputed in backward
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_bf16_forward_backward_is_finite() -> None:
    model = OwlModel(get_config("debug-tiny")).to(torch.bfloat16).train()
    ids = torch.stack([_sample(5, 1, 10), _sample(5, 1, 11)])
    segments = torch.ones_like(ids)
    segments[1, -3:] = 0
    logits = model(ids, torch.randn(2, 3, 32, 32), segment_ids=segments)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_vit_positions_start_as_2d_sincos_at_the_scale_of_patch_features() -> None:
    """From scratch the learned ViT positions start as 2-D sin-cos (CLS row zero): neighbouring
    patches get similar embeddings, far ones different, and their size is that of the patch
    features, so the encoder knows where things are from step 0."""
    torch.manual_seed(0)
    model = OwlModel(get_config("demo"))
    pos = model.vision.position_embedding.detach()  # (1 + 8 * 8, 64)
    assert torch.equal(pos[0], torch.zeros(64))
    grid = pos[1:].reshape(8, 8, 64)
    cos = torch.nn.functional.cosine_similarity
    assert cos(grid[3, 3], grid[3, 4], dim=0) > cos(grid[3, 3], grid[3, 7], dim=0) + 0.1
    assert cos(grid[3, 3], grid[4, 3], dim=0) > cos(grid[3, 3], grid[7, 3], dim=0) + 0.1
    with torch.no_grad():
        patches = model.vision.patch_embed(torch.randn(16, 3, 32, 32)).flatten(2).transpose(1, 2)
    ratio = grid.norm(dim=-1).mean() / patches.norm(dim=-1).mean()
    assert 0.3 < float(ratio) < 3.0
    # Owl1: its abstractor has no sin-cos positions either, so any width builds.
    odd = get_config("demo", "owl1", vision={"width": 66, "num_heads": 6, "mlp_dim": 128},
                     abstractor={"width": 66, "num_heads": 6})  # fmt: skip
    pos = OwlModel(odd).vision.position_embedding.detach()  # width not a multiple of 4
    assert 0.5 < float(pos.std() * 66**0.5) < 2.0  # CLIP's N(0, width^-0.5)
