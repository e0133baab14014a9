"""Per-stage trainable sets (all four paper cases) and the AdamW parameter groups."""

from __future__ import annotations

import pytest

from owl.model import OwlModel, get_config
from owl.train.config import TrainConfig
from owl.train.stages import format_table, lr_scale, param_groups, select_trainable


def _model(variant: str) -> OwlModel:
    return OwlModel(get_config("debug-tiny", variant=variant))


def _trainable(model: OwlModel) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _names(model: OwlModel) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_owl1_stage1_trains_vision_and_abstractor_only() -> None:
    model = _model("owl1")
    table = select_trainable(model, "owl1", 1)
    expected = {n for n in _names(model) if n.startswith(("vision.", "abstractor."))}
    assert _trainable(model) == expected
    assert "vision.patch_embed.weight" in expected and "abstractor.queries" in expected
    assert table["decoder_text"]["trainable"] == 0 and table["decoder_text"]["total"] > 0
    assert table["decoder_visual"]["total"] == 0  # owl1 has no modality-adaptive copies


@pytest.mark.parametrize("with_abstractor", [False, True])
def test_owl1_stage2_trains_lora_and_optionally_the_abstractor(with_abstractor: bool) -> None:
    model = _model("owl1")
    table = select_trainable(
        model,
        "owl1",
        2,
        train_abstractor_in_stage2=with_abstractor,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ("q_proj", "v_proj")},
    )
    lora = {n for n in _names(model) if "lora_" in n}
    # Adapters only on the decoder's q/v projections: two matrices per wrapped projection.
    assert lora and all(n.startswith("decoder.layers.") for n in lora)
    assert all((".q_proj" in n or ".v_proj" in n) for n in lora)
    abstractor = {n for n in _names(model) if n.startswith("abstractor.")}
    assert _trainable(model) == (lora | abstractor if with_abstractor else lora)
    assert table["vision"]["trainable"] == 0 and table["decoder_text"]["trainable"] == 0


def test_owl2_stage1_adds_the_visual_mam_copies() -> None:
    model = _model("owl2")
    table = select_trainable(model, "owl2", 1)
    names = _names(model)
    visual = {n for n in names if n.startswith("decoder.") and "_visual" in n}
    expected = {n for n in names if n.startswith(("vision.", "abstractor."))} | visual
    assert _trainable(model) == expected
    assert "decoder.layers.1.attn.k_proj_visual.weight" in expected
    assert "decoder.layers.1.post_attn_norm_visual.weight" in expected
    assert "decoder.layers.1.attn.k_proj.weight" not in expected  # the text copy stays frozen
    assert "decoder.lm_head.weight" not in expected
    assert table["decoder_visual"]["trainable"] == table["decoder_visual"]["total"] > 0


def test_owl2_stage2_trains_everything() -> None:
    model = _model("owl2")
    table = select_trainable(model, "owl2", 2)
    assert _trainable(model) == _names(model)
    assert "all" in format_table(table)


def test_param_groups_decay_matrices_only_and_layer_decay() -> None:
    model = _model("owl2")
    select_trainable(model, "owl2", 2)
    cfg = TrainConfig().replace(
        optimizer={"lr": 1e-3, "abstractor_lr": 5e-4, "vit_layer_decay": 0.5, "weight_decay": 0.1}
    )
    groups = param_groups(model, cfg)
    ids = {id(p): n for n, p in model.named_parameters()}
    seen = {ids[id(p)]: g for g in groups for p in g["params"]}
    assert set(seen) == _names(model)
    for name, group in seen.items():
        param = model.get_parameter(name)
        assert group["weight_decay"] == (0.1 if param.ndim >= 2 else 0.0), name
    # debug-tiny's ViT has 1 block: block 0 -> 0.5**1, embeddings -> 0.5**2, post-norm -> 1.
    assert seen["vision.layers.0.attn.q_proj.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert seen["vision.patch_embed.weight"]["lr"] == pytest.approx(1e-3 * 0.25)
    assert seen["vision.post_norm.weight"]["lr"] == pytest.approx(1e-3)
    assert seen["abstractor.queries"]["lr"] == pytest.approx(5e-4)
    assert seen["decoder.lm_head.weight"]["lr"] == pytest.approx(1e-3)


def test_layer_decay_is_deeper_for_earlier_blocks() -> None:
    cfg = TrainConfig().replace(optimizer={"vit_layer_decay": 0.9})
    scales = [lr_scale(f"vision.layers.{i}.mlp.fc1.weight", cfg, 24) for i in range(24)]
    assert scales == sorted(scales) and scales[-1] == pytest.approx(0.9)


def test_frozen_model_has_no_groups_and_unknown_variant_fails() -> None:
    model = _model("owl2")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, TrainConfig())
    with pytest.raises(ValueError, match="no training recipe"):
        select_trainable(model, "owl3", 1)


@pytest.mark.parametrize("variant", ["owl1", "owl2"])
@pytest.mark.parametrize("stage", [1, 2])
def test_trainable_all_overrides_the_recipe_without_lora(variant: str, stage: int) -> None:
    model = _model(variant)
    table = select_trainable(model, variant, stage, trainable="all")
    assert _trainable(model) == _names(model)
    assert not any("lora" in name for name in _names(model))
    assert table["lora"]["total"] == 0


def test_trainable_must_be_paper_or_all() -> None:
    with pytest.raises(ValueError, match="trainable must be 'paper' or 'all'"):
        TrainConfig(trainable="everything")
