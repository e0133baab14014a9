"""TrainConfig validation and its sections (old flat keys refused with their new place), the
papers' recipes (the 7B job files), the DeepSpeed config and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from owl.configs import build_dataclass
from owl.train.config import (
    MOVED,
    BatchConfig,
    LoraConfig,
    TrainConfig,
    deepspeed_config,
    lr_multiplier,
    warmup_steps,
)
from owl.train.job import FAULT_ENV, Fault
from pipelines.jobspec import load_job


def test_deepspeed_config_cpu_is_fp32_with_torch_adamw() -> None:
    cfg = TrainConfig().replace(
        batch={"micro_batch_size": 3, "grad_accum": 2},
        memory={"zero_stage": 2},
        optimizer={"grad_clip": 0.5},
        resources={"num_workers": 4},
    )
    ds = deepspeed_config(cfg, world_size=4, on_gpu=False)
    assert ds["bf16"]["enabled"] is False
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98]


@pytest.mark.parametrize(("world_size", "accum"), [(4, 2), (2, 4), (1, 8), (3, 3), (8, 1)])
def test_fewer_workers_accumulate_more_and_keep_the_global_batch(world_size, accum) -> None:
    """num_workers x grad_accum micro-batches per step, shared out (rounded up: a worker with
    one fewer runs a zero-weight one, owl.data.step_stream)."""
    cfg = TrainConfig(batch=BatchConfig(micro_batch_size=3, grad_accum=2)).replace(
        resources={"num_workers": 4}
    )
    ds = deepspeed_config(cfg, world_size=world_size, on_gpu=False)
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == 3 * accum * world_size


def test_deepspeed_config_gpu_is_bf16_and_zero3_gathers_on_save() -> None:
    ds = deepspeed_config(
        TrainConfig().replace(memory={"zero_stage": 3}), world_size=1, on_gpu=True
    )
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_config_gpu_uses_torch_fused_adamw() -> None:
    """On GPU the optimizer is torch's fused AdamW, not DeepSpeed's FusedAdam (a JIT build that
    needs nvcc); DeepSpeed hands the params other than torch_adam / adam_w_mode to
    torch.optim.AdamW as keyword arguments, so they must be AdamW's."""
    gpu = deepspeed_config(TrainConfig(), world_size=1, on_gpu=True)["optimizer"]["params"]
    cpu = deepspeed_config(TrainConfig(), world_size=1, on_gpu=False)["optimizer"]["params"]
    assert gpu["torch_adam"] is True and gpu["fused"] is True
    assert "fused" not in cpu  # the CPU optimizer (and the demo's numbers) as before
    kwargs = {k: v for k, v in gpu.items() if k not in ("torch_adam", "adam_w_mode")}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert optimizer.defaults["fused"] is True


def test_schedule_warms_up_then_decays_to_min() -> None:
    values = [lr_multiplier(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[20] == pytest.approx(0.1)


def test_warmup_ratio_and_steps() -> None:
    assert warmup_steps(TrainConfig().replace(schedule={"warmup_ratio": 0.03}), 1000) == 30
    both = {"warmup_steps": 50, "warmup_ratio": 0.5}
    assert warmup_steps(TrainConfig().replace(schedule=both), 1000) == 50


def test_lambda_lr_resumes_exactly() -> None:
    """The schedule is a function of the step count stored in the scheduler's state dict."""

    def make() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        fn = lambda s: lr_multiplier(s, warmup=3, total=10, min_ratio=0.0)  # noqa: E731
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, fn)

    opt, sched = make()
    lrs = []
    for _ in range(8):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    opt2, sched2 = make()
    for _ in range(4):
        opt2.step()
        sched2.step()
    state = sched2.state_dict()
    opt3, sched3 = make()
    sched3.load_state_dict(state)
    resumed = []
    for _ in range(4):
        opt3.step()
        sched3.step()
        resumed.append(sched3.get_last_lr()[0])
    assert resumed == lrs[4:]


def test_parsed_from_a_dict_rejects_unknown_and_converts_lists() -> None:
    raw = {"optimizer": {"lr": 3e-4, "betas": [0.9, 0.95]}, "lora": {"targets": ["q_proj"]}}
    cfg = build_dataclass(TrainConfig, raw, "stage1")
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.lora.targets == ("q_proj",)
    with pytest.raises(ValueError, match=r"stage1: unknown field.*learning_rate"):
        build_dataclass(TrainConfig, {"learning_rate": 1e-4}, "stage1")
    with pytest.raises(ValueError, match=r"stage1.optimizer: unknown field.*learning_rate"):
        build_dataclass(TrainConfig, {"optimizer": {"learning_rate": 1e-4}}, "stage1")
    with pytest.raises(ValueError, match=r"stage1.optimizer.lr: expected float, got str"):
        build_dataclass(TrainConfig, {"optimizer": {"lr": "fast"}}, "stage1")
    with pytest.raises(ValueError, match=r"^stage1.memory: zero_stage must be"):
        build_dataclass(TrainConfig, {"memory": {"zero_stage": 4}}, "stage1")


def test_old_flat_keys_are_refused_with_their_new_place() -> None:
    with pytest.raises(ValueError) as caught:
        build_dataclass(TrainConfig, {"lr": 1e-4, "stage": 1}, "stage1")
    assert str(caught.value) == "stage1.lr moved to stage1.optimizer.lr"
    with pytest.raises(ValueError) as caught:
        build_dataclass(TrainConfig, {"lora_r": 4, "checkpoint_every": 5}, "stage2")
    assert str(caught.value) == (
        "stage2.checkpoint_every moved to stage2.checkpoint.every; "
        "stage2.lora_r moved to stage2.lora.r"
    )
    # Every old key names a field that exists now.
    for old, new in MOVED.items():
        section, _, name = new.partition(".")
        assert hasattr(getattr(TrainConfig(), section), name), (old, new)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"memory": {"zero_stage": 4}}, "stage1.memory: zero_stage must be 0, 1, 2 or 3"),
        ({"stage": 3}, "stage1: stage must be 1 or 2"),
        ({"optimizer": {"vit_layer_decay": 0.0}}, "stage1.optimizer: vit_layer_decay"),
        (
            {"resources": {"fewer_workers": "shrink"}},
            "stage1.resources: fewer_workers must be 'wait' or 'continue'",
        ),
        ({"resources": {"min_workers": 2}}, r"min_workers must be in \[1, num_workers\]"),
        ({"data": {"loader": "global", "mix": {"a": 1.0}}}, "stage1.data: mix needs loader"),
        (
            {"evaluate": {"every": 3, "benchmarks": ["b.jsonl"]}},
            r"stage1: evaluate.every \(3\) must be a multiple of checkpoint.every \(100\)",
        ),
    ],
)
def test_invalid_values_name_the_section_and_field(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_dataclass(TrainConfig, raw, "stage1")


def test_replace_changes_only_the_named_fields_of_a_section() -> None:
    base = TrainConfig().replace(optimizer={"lr": 3e-4, "weight_decay": 0.0})
    changed = base.replace(optimizer={"lr": 1e-3}, stage=2)
    assert (changed.optimizer.lr, changed.optimizer.weight_decay, changed.stage) == (1e-3, 0.0, 2)
    assert base.optimizer.lr == 3e-4  # frozen: a copy


def test_recipe_job_files_carry_the_paper_values(tmp_path) -> None:
    """The papers' recipes live in the 7B job files only (no copy in owl.train.config)."""
    owl1 = load_job("jobs/owl1-llama-7b.yaml", [f"storage={tmp_path}"]).steps
    stage1 = owl1["stage1"].config
    opt = stage1.optimizer
    assert (opt.lr, opt.betas, opt.weight_decay, stage1.schedule.warmup_steps) == (
        1e-4,
        (0.9, 0.98),
        0.1,
        2000,
    )
    assert stage1.schedule.max_steps == 50000
    stage2 = owl1["stage2"].config
    assert (stage2.optimizer.lr, stage2.lora) == (
        2e-5,
        LoraConfig(r=8, alpha=32, dropout=0.05, targets=("q_proj", "v_proj")),
    )
    owl2 = load_job("jobs/owl2-llama2-7b.yaml", [f"storage={tmp_path}"]).steps
    assert owl2["stage1"].config.schedule.max_steps == 40000
    stage2 = owl2["stage2"].config
    assert stage2.memory.zero_stage == 3 and stage2.schedule.warmup_ratio == 0.03
    assert stage2.optimizer.vit_layer_decay < 1


def test_fault_injection_comes_from_the_environment_only(monkeypatch) -> None:
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert Fault.from_env() is None
    monkeypatch.setenv(FAULT_ENV, "5:1:kill")
    assert Fault.from_env() == Fault(step=5, rank=1, mode="kill")
    monkeypatch.setenv(FAULT_ENV, "5:1:explode")
    with pytest.raises(ValueError, match=FAULT_ENV):
        Fault.from_env()


def test_the_docs_sections_example_is_the_demo_stage_1(tmp_path) -> None:
    """docs/pipeline.md's YAML block under "Training stages" is a valid stage section: the demo's
    stage 1 as the job file has it (same values in the same sections)."""
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "pipeline.md").read_text()
    block = re.search(r"## Training stages.*?```yaml\n(.*?)```", docs, re.S).group(1)
    documented = build_dataclass(TrainConfig, yaml.safe_load(block)["stage1"], "stage1")
    demo = load_job("jobs/demo.yaml", [f"storage={tmp_path}"]).steps["stage1"].config
    assert documented == demo
