"""The memory plan (`owl.train.memory`): DeepSpeed's estimator for the model states, activations
measured on a real forward, the stage's trainable set, and the refusal before anything starts."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config
from owl.train.config import TrainConfig
from owl.train.loss import token_loss_sum
from owl.train.memory import activation_bytes, parameter_counts, plan_memory
from owl.train.stages import planned_model
from pipelines import cli
from pipelines.jobspec import load_job

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.zero.stage3 import (  # noqa: E402
    estimate_zero3_model_states_mem_needs,
)
from deepspeed.runtime.zero.stage3 import model_to_params as ds_model_to_params  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import (  # noqa: E402
    estimate_zero2_model_states_mem_needs,
)

SEVEN_B = get_config("owl2-llama2-7b")


@pytest.mark.parametrize("workers", [1, 8, 64])
def test_model_states_equal_deepspeeds_estimate_when_everything_trains(workers) -> None:
    """The cold estimators behind `estimate_zero{2,3}_model_states_mem_needs_all_cold`, no
    offload, on the 7B model's counts (built on the meta device)."""
    for zero in (2, 3):
        cfg = TrainConfig(stage=2, trainable="all").replace(
            memory={"zero_stage": zero}, resources={"num_workers": workers}
        )
        plan = plan_memory(SEVEN_B, cfg)
        assert plan.trainable_params == plan.total_params > 8e9
        if zero == 2:
            _, expected = estimate_zero2_model_states_mem_needs(
                plan.total_params, num_gpus_per_node=workers, cpu_offload=False
            )
        else:
            _, expected, _ = estimate_zero3_model_states_mem_needs(
                plan.total_params,
                plan.largest_layer_params,
                num_gpus_per_node=workers,
                cpu_offload=False,
                cpu_offload_params=False,
            )
        assert abs(plan.model_states - expected) <= 1, (zero, plan.model_states, expected)


def test_parameter_counts_match_deepspeeds_on_a_real_model() -> None:
    model = OwlModel(get_config("debug-tiny"))
    total, trainable, largest = parameter_counts(model)
    assert (total, largest) == ds_model_to_params(model) and trainable == total


def test_plan_honours_the_trainable_set() -> None:
    paper = TrainConfig(stage=1).replace(memory={"zero_stage": 2}, resources={"num_workers": 8})
    everything = paper.replace(trainable="all")
    p, a = plan_memory(SEVEN_B, paper), plan_memory(SEVEN_B, everything)
    _, table = planned_model(SEVEN_B, paper)
    assert p.trainable_params == sum(g["trainable"] for g in table.values())
    assert p.trainable_params < 0.2 * p.total_params  # the language model is frozen in stage 1
    assert p.total_params == a.total_params
    # ZeRO-2 on 8 workers: each frozen parameter saves its 16-bit grad and fp32 states' share.
    saved = 18 * (a.trainable_params - p.trainable_params) / 8
    assert a.model_states - p.model_states == pytest.approx(saved)
    # Owl1 stage 2: LoRA adapters (and the abstractor) train; their parameters are counted.
    owl1 = get_config("owl1-llama-7b")
    lora = plan_memory(owl1, TrainConfig(stage=2, train_abstractor_in_stage2=True))
    _, lora_table = planned_model(owl1, TrainConfig(stage=2, train_abstractor_in_stage2=True))
    assert lora_table["lora"]["trainable"] > 0
    assert (
        lora.trainable_params == lora_table["lora"]["trainable"] + lora_table["abstractor"]["total"]
    )


def _saved_bytes(model_cfg, cfg: TrainConfig) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (+ the logits the
    loop holds), fp32 on CPU: rows packed full, the most images a row holds."""
    torch.manual_seed(0)
    model = OwlModel(
        model_cfg.replace(activation_checkpointing=cfg.memory.activation_checkpointing)
    )
    model.train()
    slots = model_cfg.num_visual_tokens
    batch = cfg.batch
    per_row = min(batch.max_images_per_row, batch.max_length // slots)
    ids = torch.randint(3, model_cfg.decoder.vocab_size, (batch.micro_batch_size, batch.max_length))
    ids[:, : slots * per_row] = IMAGE_TOKEN_ID
    size = model_cfg.vision.image_size
    images = torch.randn(batch.micro_batch_size * per_row, 3, size, size)
    segments = torch.ones_like(ids)
    storages: dict[int, int] = {}
    # Parameters are not activations, nor are views of them (F.linear saves `weight.t()`).
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, images, segment_ids=segments)
        token_loss_sum(logits, ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX), segments)
    storages[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["debug-tiny", "demo"])
def test_activations_agree_with_what_autograd_keeps(name, checkpointing) -> None:
    model_cfg = get_config(name)
    cfg = TrainConfig().replace(
        batch={"micro_batch_size": 2, "max_length": 128, "max_images_per_row": 2},
        memory={"activation_checkpointing": checkpointing},
    )
    kept, recomputed = activation_bytes(model_cfg, cfg, dtype_bytes=4)
    measured = _saved_bytes(model_cfg, cfg)
    assert 0.8 <= kept / measured <= 1.2, (kept, measured)
    assert (recomputed > 0) == checkpointing


def test_activation_checkpointing_shrinks_the_plan() -> None:
    cfg = TrainConfig(stage=2).replace(
        memory={"zero_stage": 3},
        resources={"num_workers": 8},
        batch={"micro_batch_size": 2, "max_length": 2048},
    )
    full = plan_memory(SEVEN_B, cfg)
    ckpt = plan_memory(SEVEN_B, cfg.replace(memory={"activation_checkpointing": True}))
    assert ckpt.model_states == full.model_states
    assert ckpt.activations < 0.25 * full.activations
    # Text tokens scale with the row length; the images per row are capped (max_images_per_row).
    text_only = cfg.replace(batch={"max_images_per_row": 1})
    short, longer = (
        plan_memory(SEVEN_B, text_only),
        plan_memory(SEVEN_B, text_only.replace(batch={"max_length": 4096})),
    )
    assert 1.9 * short.activations < longer.activations < 2.1 * short.activations


def test_dry_run_shows_the_plan_and_refuses_one_that_does_not_fit(tmp_path, capfd) -> None:
    job = "jobs/owl2-llama2-7b.yaml"
    base = ["run", job, "--dry-run", "--json", "--set", f"storage={tmp_path}"]
    assert cli.main(base) == 0
    out, _ = capfd.readouterr()
    stage2 = next(p for p in json.loads(out)["steps"] if p["name"] == "stage2")
    memory = stage2["memory"]
    assert memory["zero_stage"] == 3 and memory["activation_checkpointing"]
    assert stage2["memory_gib"] == pytest.approx(memory["total_gib"])
    assert memory["total_gib"] == pytest.approx(
        memory["model_states_gib"] + memory["activations_gib"]
    )
    # As docs/pipeline.md shows it, with the error line it documents.
    docs = (Path(__file__).parents[2] / "docs" / "pipeline.md").read_text().splitlines()
    command = next(line for line in docs if "--set stage2.memory.gpu_memory_gib=16" in line)
    documented = docs[docs.index(command) + 1].removeprefix("# ")
    argv = shlex.split(command)
    assert argv[0] == "owl"
    code = cli.main(argv[1:])
    _, err = capfd.readouterr()
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [documented]
    assert lines[0].startswith("error: stage2: the memory plan needs")
    assert not any(tmp_path.iterdir())


# The GPU memory of the instance types infra/ may declare, GiB (A100 40 GB: 40 GiB of HBM).
GPU_GIB = {"p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80}


@pytest.mark.parametrize("recipe", ["owl1-llama-7b", "owl2-llama2-7b"])
def test_recipes_fit_the_gpu_of_the_documented_node(recipe, tmp_path, capfd) -> None:
    """`owl run <recipe> --dry-run` without --set: each stage states the GPU memory of
    infra/cluster.yaml's GPU node (at most the card's) and its memory plan fits it."""
    import yaml

    root = Path(__file__).parents[2]
    cluster = yaml.safe_load((root / "infra" / "cluster.yaml").read_text())
    instance = cluster["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    argv = ["run", f"jobs/{recipe}.yaml", "--dry-run", "--json", "--set", f"storage={tmp_path}"]
    assert cli.main(argv) == 0
    steps = {p["name"]: p for p in json.loads(capfd.readouterr().out)["steps"]}
    job = load_job(f"jobs/{recipe}.yaml", [f"storage={tmp_path}"])
    for stage in ("stage1", "stage2"):
        gpu_gib = job.steps[stage].config.memory.gpu_memory_gib
        assert 0.95 * GPU_GIB[instance] <= gpu_gib <= GPU_GIB[instance]
        assert steps[stage]["memory_gib"] <= gpu_gib


def test_caption_benchmarks_without_java_are_refused_at_validation(tmp_path, capfd, monkeypatch):
    """The recipes score COCO / Flickr30k captions with the PTB tokenizer (Java): on a machine
    without Java, the dry run and the run itself refuse before any step, in one error line."""
    from owl.eval import evaluate  # the evaluation library both the step and `owl eval` call
    from owl.eval.caption_metrics import JAVA_MISSING

    monkeypatch.setattr(evaluate, "java_available", lambda: False)
    storage = tmp_path / "storage"
    base = ["run", "jobs/owl2-llama2-7b.yaml", "--set", f"storage={storage}"]
    for argv in (base + ["--dry-run"], base):
        assert cli.main(argv) == 2
        lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert lines == [f"error: {JAVA_MISSING}"]
    assert not storage.exists()
    # Asked for the approximate tokenizer, or run only up to training, it needs no Java.
    assert cli.main(base + ["--dry-run", "--set", "evaluate.caption_tokenizer=approx"]) == 0
    assert cli.main(base + ["--dry-run", "--until", "stage2"]) == 0
