"""LoRA: exact trainable sets (decoder attention only) and merged weights with the same logits."""

from __future__ import annotations

import pytest
import torch

from owl import IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config
from owl.model.lora import apply_lora, merge_lora


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, k + 8), generator=torch.Generator().manual_seed(0))
    ids[0, 2 : 2 + k] = IMAGE_TOKEN_ID
    return ids, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_default_lora_trains_exactly_decoder_q_and_v_adapters() -> None:
    model = apply_lora(OwlModel(get_config("debug-tiny")))
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
        OwlModel(get_config("debug-tiny")), r=4, target_modules=("k_proj", "k_proj_visual"),
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
        apply_lora(OwlModel(get_config("debug-tiny")), target_modules=("fc1",))
    with pytest.raises(ValueError, match="not modules of the model"):
        apply_lora(OwlModel(get_config("debug-tiny")), modules_to_save=("decoder.nope",))


def test_merged_model_has_plain_names_and_the_same_logits() -> None:
    torch.manual_seed(0)
    plain_names = set(OwlModel(get_config("debug-tiny")).state_dict())
    model = apply_lora(OwlModel(get_config("debug-tiny"))).eval()
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


def test_adapter_folder_is_peft_format_and_loads_with_the_same_logits(tmp_path) -> None:
    """As after Owl1's stage 2 with the abstractor trained: adapters and the abstractor changed;
    peft's own PeftModel.from_pretrained on the stage-1 model gives the trained model's logits."""
    import json

    from peft import PeftModel

    from owl.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter, trained_modules

    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in OwlModel(get_config("debug-tiny")).state_dict().items()}
    model = OwlModel(get_config("debug-tiny"))
    model.load_state_dict(base_state)
    model = apply_lora(model, modules_to_save=("abstractor",)).eval()
    with torch.no_grad():  # "training": adapters and the abstractor move
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith("abstractor."):
                param.add_(torch.randn_like(param) * 0.3)
    assert trained_modules(model) == ["abstractor"]
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # fmt: skip
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 32)
    assert config["modules_to_save"] == ["abstractor"]
    base = OwlModel(get_config("debug-tiny"))
    base.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = _batch(model.cfg.num_visual_tokens)
    with torch.no_grad():
        expected, got = model(*batch), loaded(*batch)
        untouched = OwlModel(get_config("debug-tiny"))
        untouched.load_state_dict(base_state)
        before = untouched.eval()(*batch)
    assert (expected - got).abs().max() <= 1e-5
    assert (expected - before).abs().max() > 1e-2  # the adapter carries the change


@pytest.mark.parametrize("merge", [True, False])
def test_training_export_of_a_lora_stage_writes_the_peft_adapter(tmp_path, merge: bool) -> None:
    """The trainer's export (rank 0): `adapter/` in peft's format next to merged (or base) weights."""
    import json
    from types import SimpleNamespace

    from peft import PeftModel

    from owl.model import load_model
    from owl.model.lora import LORA_STATE
    from owl.train.config import TrainConfig
    from owl.train.data_plan import plan_data
    from owl.train.export import export_model
    from owl.train.job import WorkerJob

    torch.manual_seed(1)
    base_state = {k: v.clone() for k, v in OwlModel(get_config("debug-tiny")).state_dict().items()}
    model = OwlModel(get_config("debug-tiny"))
    model.load_state_dict(base_state)
    model = apply_lora(model).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    batch = _batch(model.cfg.num_visual_tokens)
    with torch.no_grad():
        expected = model(*batch)
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 2)
    cfg = TrainConfig(stage=2).replace(lora={"merge": merge})
    job = WorkerJob(train=cfg, model=model.cfg, data=plan_data(cfg, model.cfg, []))
    export_model(engine, job, tmp_path / "export", rank=0)
    exported = load_model(tmp_path / "export").eval()
    base = OwlModel(get_config("debug-tiny"))
    base.load_state_dict(base_state)
    with torch.no_grad():
        folder = exported(*batch)
        peft = PeftModel.from_pretrained(base, str(tmp_path / "export" / "adapter")).eval()(*batch)
    assert (peft - expected).abs().max() <= 1e-5
    # load_model gives the trained model either way (an adapter kept apart is merged in memory).
    assert (folder - expected).abs().max() <= 1e-5
    state = json.loads((tmp_path / "export" / LORA_STATE).read_text())
    assert state == {"adapter": "adapter", "merged": merge}
    if not merge:  # the folder's own weights are the base weights
        stored = load_model(tmp_path / "export", adapter=False).state_dict()
        assert set(stored) == set(base_state)
        assert all(torch.equal(stored[k], v) for k, v in base_state.items())


def test_release_export_of_an_unmerged_lora_folder_holds_the_trained_weights(tmp_path) -> None:
    """`merge_lora: false` keeps the adapter apart in our folder; the authors' layout written from
    it (the export step's release/) holds the trained weights, since their code cannot apply it."""
    import copy
    from types import SimpleNamespace

    from owl.model import get_config
    from owl.model.hf_import import read_hf_state_dict
    from owl.model.releases import export_release, to_release
    from owl.model.variants import VARIANTS
    from owl.train.config import TrainConfig
    from owl.train.data_plan import plan_data
    from owl.train.export import export_model
    from owl.train.job import WorkerJob

    # A release-faithful eps, and no grouped KV heads (Owl1's transformers 4.28.1 has none).
    cfg = get_config("debug-tiny", "owl1", abstractor={"norm_eps": 1e-5})
    cfg = cfg.replace(decoder={"num_kv_heads": cfg.decoder.num_heads})
    torch.manual_seed(2)
    model = OwlModel(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = apply_lora(model, modules_to_save=("abstractor",)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or name.startswith("abstractor."):
                param.add_(torch.randn_like(param) * 0.3)
        trained = merge_lora(copy.deepcopy(model)).state_dict()
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 2)
    train = TrainConfig(stage=2).replace(lora={"merge": False})
    job = WorkerJob(train=train, model=cfg, data=plan_data(train, cfg, []))
    export_model(engine, job, tmp_path / "export", rank=0)
    export_release(tmp_path / "export", tmp_path / "release")
    release = read_hf_state_dict(tmp_path / "release")
    expected, before = (to_release(cfg, s, VARIANTS["owl1"]) for s in (trained, base))
    assert release.keys() == expected.keys()
    moved = [k for k in expected if not torch.equal(expected[k], before[k])]
    assert any("q_proj" in k for k in moved) and any("abstractor" in k for k in moved)
    for key, tensor in expected.items():
        assert torch.allclose(release[key], tensor, atol=1e-6), key
