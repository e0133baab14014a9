"""Parity with transformers on the same random weights, loaded through our Hugging Face loaders."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from owl import IMAGE_TOKEN_ID
from owl.model import get_config
from owl.model.pretrained import pretrained_model

VISION = {
    "image_size": 32,
    "patch_size": 8,
    "width": 32,
    "num_layers": 2,
    "num_heads": 2,
    "mlp_dim": 64,
}
DECODER = {
    "vocab_size": 128, "hidden": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "ffn_dim": 96, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
}  # fmt: skip


def _randomize(model: torch.nn.Module) -> None:
    """Every parameter random (norm weights around 1) so no term can hide behind an init value."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + (1.0 if "norm" in name and param.dim() == 1 else 0.0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory):
    hf_cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    model = LlamaForCausalLM(hf_cfg)
    _randomize(model)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory):
    hf_cfg = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, hidden_act="quick_gelu",
    )  # fmt: skip
    model = CLIPVisionModel(hf_cfg)
    _randomize(model)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return path


def _cfg(variant: str):
    return get_config(
        "debug-tiny", variant, vision=VISION, abstractor={"width": 32}, decoder=DECODER
    )


def test_decoder_matches_transformers_llama_with_grouped_kv(llama_dir) -> None:
    ours = pretrained_model(_cfg("owl1"), {"llama": str(llama_dir)})[0].eval()
    theirs = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_vit_matches_transformers_clip_vision(clip_dir) -> None:
    ours = pretrained_model(_cfg("owl2"), {"clip": str(clip_dir)})[0].eval()
    theirs = CLIPVisionModel.from_pretrained(clip_dir).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = theirs(pixel_values=images).last_hidden_state
        # Owl applies the post-LayerNorm to every token; CLIP only to the pooled CLS.
        expected = theirs.post_layernorm(hidden)
        diff = (ours.vision(images) - expected).abs().max().item()
    assert diff <= 1e-5


def test_owl2_with_identical_branches_equals_plain_decoder(llama_dir, clip_dir) -> None:
    torch.manual_seed(3)
    folders = {"clip": str(clip_dir), "llama": str(llama_dir)}
    owl2 = pretrained_model(_cfg("owl2"), folders)[0].eval()
    owl1 = pretrained_model(_cfg("owl1"), folders)[0].eval()
    # Same abstractor (random in both); positions differ between variants, so switch them off.
    owl1.abstractor.load_state_dict(owl2.abstractor.state_dict())
    owl2.abstractor.query_pos.zero_()
    owl2.abstractor.image_pos.zero_()
    visual_params = [n for n, _ in owl2.named_parameters() if "_visual" in n]
    assert len(visual_params) == 4 * DECODER["num_layers"]
    k = owl2.cfg.num_visual_tokens
    ids = torch.randint(0, 128, (2, 3 * k))
    ids[0, 2 : 2 + k] = IMAGE_TOKEN_ID
    ids[1, 1 : 1 + 2 * k] = IMAGE_TOKEN_ID
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (owl2(ids, images) - owl1(ids, images)).abs().max().item()
    assert diff <= 1e-5


def test_visual_branch_changes_only_visual_positions(llama_dir) -> None:
    model = pretrained_model(_cfg("owl2"), {"llama": str(llama_dir)})[0].eval()
    k = model.cfg.num_visual_tokens
    ids = torch.randint(0, 128, (1, 2 * k))
    ids[0, k : 2 * k] = IMAGE_TOKEN_ID  # text first, image last: causal text is unaffected
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(ids, images)
        model.decoder.layers[0].attn.k_proj_visual.weight.mul_(2.0)
        after = model(ids, images)
    assert torch.equal(before[:, :k], after[:, :k])
    assert (before[:, k:] - after[:, k:]).abs().max() > 1e-3


def test_hf_config_mismatch_names_the_field(llama_dir) -> None:
    cfg = get_config("debug-tiny", "owl1", decoder={**DECODER, "ffn_dim": 100})
    with pytest.raises(ValueError, match="intermediate_size"):
        pretrained_model(cfg, {"llama": str(llama_dir)})


def test_clip_positions_are_interpolated_bicubic_to_a_bigger_grid(clip_dir) -> None:
    """A 4x4-patch CLIP into an 8x8-patch config (the 224 -> 448 px case): CLS kept, the patch
    positions resampled bicubic over the grid; the rest of the ViT unchanged."""
    import torch.nn.functional as F

    theirs = CLIPVisionModel.from_pretrained(clip_dir)
    positions = theirs.embeddings.position_embedding.weight.detach()  # (1 + 16, 32)
    cfg = _cfg("owl2").replace(vision={"image_size": 64})
    ours = pretrained_model(cfg, {"clip": str(clip_dir)})[0]
    got = ours.vision.position_embedding.detach()
    assert got.shape == (1 + 64, 32)
    assert torch.equal(got[0], positions[0])
    grid = positions[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(got[1:], expected.permute(0, 2, 3, 1).reshape(64, 32), atol=1e-6)
    assert torch.equal(
        ours.vision.layers[0].mlp.fc1.weight, theirs.encoder.layers[0].mlp.fc1.weight
    )
    same = pretrained_model(_cfg("owl2"), {"clip": str(clip_dir)})[0]  # same grid: identity
    assert torch.equal(same.vision.position_embedding, positions)
