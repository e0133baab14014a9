"""The training step on a real local Ray cluster: 2 workers, DeepSpeed ZeRO-2 and ZeRO-3 on CPU
(gloo).

- ZeRO-3 (model built partitioned) gives ZeRO-2's per-step losses in both stages, and exports
  a consolidated model;
- interrupted at step k under ZeRO-3 (injected failure, no retries) and re-run: same weights as
  an uninterrupted ZeRO-3 run;
- a worker process killed mid-run (ZeRO-2) is restarted by Ray Train from the last checkpoint;
- `fewer_workers: continue` on a cluster with room for one of the two workers: the stage trains
  on one worker (twice the accumulation) and its losses are the 2-worker run's;
- bad input fails before anything starts;
- with `evaluate.every`, each evaluated step's scores as curves, and a benchmark already scored
  for a step (an interrupted evaluation) not asked again.

The reference run (ZeRO-2, 2 workers) evaluates during training; the killed-worker run, which
does not, must end on its weights and losses bit for bit: that one comparison shows both that a
restart from a checkpoint and the evaluation leave the numerics alone (one Ray Train run fewer
than a separate run per guarantee).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.data.manifest import Manifest
from owl.data.schema import TOKENIZED_SCHEMA
from owl.model import OwlModel, get_config, load_model
from owl.train.config import EvaluateDuringTraining, TrainConfig
from owl.train.job import FAULT_ENV
from pipelines.step import StepContext, StepInput

pytestmark = pytest.mark.integration

# 300 ids: the evaluation tests' byte-level tokenizer (tests/unit/eval_helpers.py) fits.
MODEL = get_config("debug-tiny", decoder={"vocab_size": 300})
BASE = TrainConfig(stage=1, log_every=1, seed=3).replace(
    optimizer={"lr": 1e-3},
    schedule={"max_steps": 6},
    batch={"micro_batch_size": 2, "grad_accum": 2, "max_length": 64},
    memory={"zero_stage": 2},
    checkpoint={"every": 2},
    resources={"num_workers": 2, "cpus_per_worker": 1},
)


def _sample(i: int, rng: np.random.Generator) -> dict:
    num_images = int(rng.integers(0, 3))
    prompt = [1] + [IMAGE_TOKEN_ID] * (MODEL.num_visual_tokens * num_images)
    prompt += rng.integers(3, 256, int(rng.integers(2, 12))).tolist()
    reply = rng.integers(3, 256, int(rng.integers(3, 20))).tolist()
    images = []
    for _ in range(num_images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
            buffer, format="PNG"
        )
        images.append(buffer.getvalue())
    return {
        "sample_id": f"s{i}",
        "kind": "multimodal" if images else "text",
        "input_ids": prompt + reply,
        "labels": [IGNORE_INDEX] * len(prompt) + reply,
        "images": images,
        "num_tokens": len(prompt) + len(reply),
        "num_supervised": len(reply),
        "source": f"test:{i}",
    }


def _write_data(directory: Path, count: int) -> StepInput:
    rng = np.random.default_rng(0)
    manifest = Manifest(step="tokenize_test")
    (directory / "shards").mkdir(parents=True)
    for n in range(2):
        rows = [_sample(n * count + i, rng) for i in range(count // 2)]
        rel = f"shards/shard-{n:05d}.arrow"
        with (
            pa.OSFile(str(directory / rel), "wb") as sink,
            pa.ipc.new_file(sink, TOKENIZED_SCHEMA) as w,
        ):
            w.write_table(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA))
        manifest.add_file(directory, rel, rows=len(rows), tokens=sum(r["num_tokens"] for r in rows))
    return StepInput(name="tokenize_test", dir=directory, manifest=manifest)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rtrn")  # its own session folder, removed after
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> StepInput:
    return _write_data(tmp_path_factory.mktemp("tokenized"), count=80)


PROGRESS: dict[Path, list[tuple[float, float | None, str]]] = {}


def _run(out_dir: Path, cfg: TrainConfig, data: StepInput, **more: StepInput):
    from pipelines.steps import train

    reported = PROGRESS.setdefault(out_dir, [])
    ctx = StepContext(
        step="stage1", out_dir=out_dir, job_name="test", model=MODEL,
        progress=lambda done, total, message: reported.append((done, total, message)),
    )  # fmt: skip
    return train.run(ctx, cfg, {"data": data, **more})


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(out_dir / "model").state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def evaluating(tmp_path_factory) -> tuple[TrainConfig, StepInput]:
    """BASE evaluating every 2 steps on a vqa and a multiple-choice benchmark, and the
    tokenizer input that evaluation needs."""
    from tests.unit.eval_helpers import make_benchmarks, make_tokenizer

    root = tmp_path_factory.mktemp("evaluation")
    make_tokenizer(root / "tokenizer_step" / "tokenizer")
    tokenizer = StepInput("tokenizer", root / "tokenizer_step", Manifest(step="tokenizer"))
    files = make_benchmarks(root / "benchmarks", num_per_type=2)
    cfg = BASE.replace(
        evaluate=EvaluateDuringTraining(
            every=2,
            benchmarks=(str(files["vqa"]), str(files["multiple_choice"])),
            cpus_per_worker=0,  # the cluster's 2 CPUs are the training workers'
            vqa_rule="normalized",
        ),
    )
    return cfg, tokenizer


# An evaluation interrupted after scoring vqa at step 2 (written before the reference run
# starts): that score is kept, not asked again.
PRESCORED = Path("evaluations") / "step-00000002" / "vqa.json"


@pytest.fixture(scope="module")
def reference(ray_cluster, data, evaluating, tmp_path_factory) -> tuple[Path, Manifest]:
    """BASE with evaluation during training (see the module docstring)."""
    cfg, tokenizer = evaluating
    out = tmp_path_factory.mktemp("uninterrupted")
    (out / PRESCORED).parent.mkdir(parents=True)
    (out / PRESCORED).write_text('{"step": 2, "metrics": {"vqa.accuracy": 0.125, "vqa.count": 2}}')
    return out, _run(out, cfg, data, tokenizer=tokenizer)


def test_uninterrupted_run_exports_model_and_metrics(reference) -> None:
    out, manifest = reference
    assert manifest.stats["steps"] == 6 and manifest.stats["tokens"] > 0
    assert manifest.stats["resumed_from_step"] == 0
    assert [s for s, _ in manifest.curves["loss"]] == [1, 2, 3, 4, 5, 6]
    assert {f.path for f in manifest.files} >= {"model/config.json"}
    assert manifest.info["trainable_parameters"]["decoder_text"]["trainable"] == 0
    before = load_model(out / "model")  # trained vision weights differ from a fresh init
    assert before.cfg == MODEL
    # The driver showed the workers' reports as they came: step, loss, tokens/s, ETA.
    live = [(done, total, m) for done, total, m in PROGRESS[out] if m.startswith("loss ")]
    assert live and {total for _, total, _ in live} == {6}
    assert "tok/s" in live[0][2] and ("ETA" in live[0][2] or live[0][0] == 6)


def _losses(manifest: Manifest) -> list[float]:
    return [value for _, value in manifest.curves["loss"]]


def _max_relative(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def zero3(ray_cluster, data, tmp_path_factory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("zero3")
    return out, _run(out, BASE.replace(memory={"zero_stage": 3}), data)


def test_zero3_stage1_matches_zero2_and_is_built_partitioned(reference, zero3) -> None:
    (ref_dir, ref), (out, manifest) = reference, zero3
    assert _max_relative(_losses(ref), _losses(manifest)) <= 1e-4
    assert manifest.stats["steps"] == 6
    # As DeepSpeed's engine reports it (read back inside the workers).
    assert (
        manifest.info["deepspeed"]["zero_stage"] == 3 and ref.info["deepspeed"]["zero_stage"] == 2
    )
    assert manifest.info["deepspeed"]["gradient_accumulation_steps"] == BASE.batch.grad_accum
    # Built partitioned: rank 0 held about half the parameters (2 workers), ZeRO-2 all of them.
    total = sum(g["total"] for g in manifest.info["trainable_parameters"].values())
    assert ref.stats["parameters_held_rank0"] == total
    assert manifest.stats["parameters_held_rank0"] <= 0.6 * total
    # The consolidated export is a complete model; the frozen language model did not move.
    exported, trained = load_model(out / "model").state_dict(), _weights(ref_dir)
    assert exported.keys() == trained.keys()
    torch.manual_seed(BASE.seed)  # the workers' seed: the initial weights they started from
    initial = OwlModel(MODEL).state_dict()
    frozen = [k for k in exported if k.startswith("decoder.") and "_visual" not in k]
    assert frozen and all(torch.equal(exported[k], trained[k]) for k in frozen)
    assert all(torch.equal(exported[k], initial[k]) for k in frozen)


def test_zero3_interrupted_run_resumes_to_identical_weights(
    zero3, data, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "3:1:raise")
    cfg = BASE.replace(memory={"zero_stage": 3}, resources={"max_failures": 0})
    with pytest.raises(Exception, match="injected failure"):
        _run(tmp_path, cfg, data)
    assert not (tmp_path / "model").exists()
    manifest = _run(tmp_path, cfg, data)  # same step key: resumes from the step-2 checkpoint
    assert manifest.stats["steps"] == 6 and manifest.stats["resumed_from_step"] == 2
    assert _losses(manifest) == _losses(zero3[1])
    assert _max_diff(_weights(tmp_path), _weights(zero3[0])) <= 1e-6


@pytest.mark.slow
def test_zero3_stage2_matches_zero2(reference, data, tmp_path) -> None:
    """Stage 2 (everything trains), both from the stage-1 model: ZeRO-3 reads it partitioned.

    Slow (`make test-slow`, two Ray Train runs): by default, ZeRO-3 against ZeRO-2 is proven in
    stage 1 (test_zero3_stage1_matches_zero2_and_is_built_partitioned) and a ZeRO-3 stage 2 that
    reads its stage-1 model partitioned and trains everything by the Owl2 recipe's rehearsal
    (tests/e2e/test_recipe_rehearsal.py, test_owl2_stage2_runs_zero3_with_layerwise_decay_...)."""
    from pipelines.steps import train

    init = StepInput(name="stage1", dir=reference[0], manifest=reference[1])
    cfg = BASE.replace(stage=2, schedule={"max_steps": 4}, checkpoint={"every": 4})
    losses = {}
    for zero in (2, 3):
        out = tmp_path / f"zero{zero}"
        ctx = StepContext(step="stage2", out_dir=out, job_name="test", model=MODEL)
        manifest = train.run(
            ctx, cfg.replace(memory={"zero_stage": zero}), {"data": data, "init": init}
        )
        losses[zero] = _losses(manifest)
    assert len(losses[3]) == 4
    assert _max_relative(losses[2], losses[3]) <= 1e-4


@pytest.mark.slow
def test_owl1_lora_stage2_trains_only_adapters_and_abstractor(ray_cluster, data, tmp_path) -> None:
    """Owl1's stage 2 as its recipe says (LoRA r/alpha/dropout on q/v, the abstractor trained),
    here under ZeRO-3 so the adapters are partitioned too: the exported base weights are the
    starting model's bit for bit except the abstractor, the adapters moved, and peft loads the
    adapter folder on the starting model.

    Slow (`make test-slow`): by default the recipe's own LoRA stage 2 (ZeRO-2, adapters merged)
    is proven by tests/e2e/test_recipe_rehearsal.py's
    test_owl1_stage2_lora_changes_only_adapters_and_the_abstractor (only the abstractor and q/v
    change, the peft adapter on the stage-1 model gives the exported model's logits); what only
    this test adds is ZeRO-3 with LoRA and the unmerged export."""
    from peft import PeftModel

    from owl.model import save_model
    from owl.model.lora import ADAPTER_DIR
    from pipelines.steps import train

    owl1 = get_config("debug-tiny", "owl1")
    torch.manual_seed(5)
    start = OwlModel(owl1)
    save_model(start, tmp_path / "init" / "model")
    cfg = BASE.replace(
        stage=2,
        train_abstractor_in_stage2=True,
        schedule={"max_steps": 3},
        checkpoint={"every": 3},
        memory={"zero_stage": 3},
        lora={
            "merge": False,
            "r": 8,
            "alpha": 32,
            "dropout": 0.05,
            "targets": ("q_proj", "v_proj"),
        },
    )
    init = StepInput(name="stage1", dir=tmp_path / "init", manifest=Manifest(step="stage1"))
    ctx = StepContext(step="stage2", out_dir=tmp_path / "out", job_name="test", model=owl1)
    manifest = train.run(ctx, cfg, {"data": data, "init": init})
    table = manifest.info["trainable_parameters"]
    assert table["lora"]["trainable"] > 0 and table["abstractor"]["trainable"] > 0
    assert table["vision"]["trainable"] == table["decoder_text"]["trainable"] == 0
    exported = load_model(tmp_path / "out" / "model", adapter=False).state_dict()  # base weights
    before = start.state_dict()
    assert exported.keys() == before.keys()
    changed = {k for k in before if not torch.equal(exported[k], before[k])}
    assert changed and all(k.startswith("abstractor.") for k in changed)
    adapter = PeftModel.from_pretrained(start, str(tmp_path / "out" / "model" / ADAPTER_DIR))
    lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * owl1.decoder.num_layers  # q and v of every layer
    assert all(p.abs().max() > 0 for p in lora_b)  # started at zero, trained


def test_killed_worker_is_restarted_from_last_checkpoint(
    reference, data, tmp_path, monkeypatch
) -> None:
    # max_failures=2, not 1: Ray Train 2.60 can count one SIGKILL twice (the peer's gloo error,
    # then a stale health check of the torn-down group); seen under heavy CPU contention.
    monkeypatch.setenv(FAULT_ENV, "5:1:kill")
    cfg = BASE.replace(resources={"max_failures": 2})
    manifest = _run(tmp_path, cfg, data)
    assert manifest.stats["steps"] == 6 and manifest.stats["resumed_from_step"] in (2, 4)
    # Bit for bit the reference's, which evaluated during training and was never interrupted.
    assert dict(manifest.curves["loss"]) == dict(reference[1].curves["loss"])
    assert _max_diff(_weights(tmp_path), _weights(reference[0])) == 0.0
    assert not any(name.startswith("eval.") for name in manifest.curves)
    # The failure and the recovery are in the manifest (the stage's MLflow metrics) and the log.
    assert manifest.stats["worker_failures"] in (1, 2) and manifest.stats["recovery_s"] > 0
    events = [e["event"] for e in manifest.info["train_events"]]
    assert events[0] == "failure" and events[-1] == "recovered"
    lines = [m for _, _, m in PROGRESS[tmp_path]]
    assert any(m.startswith("workers failed after step ") for m in lines), lines
    assert any(m.startswith("recovered: training again at step") for m in lines), lines


def test_fewer_workers_continue_trains_on_what_the_cluster_offers(
    ray_cluster, reference, data, tmp_path
) -> None:
    """Two workers of 2 CPUs asked of the 2-CPU cluster: with `fewer_workers: continue,
    min_workers: 1` Ray Train starts the one that fits, which consumes both sample streams
    (accumulating twice as many micro-batches): the 2-worker reference run's losses. (Ray Train
    sizes its elastic group by the cluster's CPUs, not by what other actors hold: busy CPUs
    would not make it start fewer workers.)"""
    cfg = BASE.replace(
        resources={"fewer_workers": "continue", "min_workers": 1, "cpus_per_worker": 2.0}
    )
    manifest = _run(tmp_path, cfg, data)
    engine = manifest.info["deepspeed"]
    assert engine["gradient_accumulation_steps"] == 2 * BASE.batch.grad_accum  # one worker ran
    batch = BASE.batch
    assert engine["train_batch_size"] == (
        BASE.resources.num_workers * batch.grad_accum * batch.micro_batch_size
    )
    assert manifest.stats["steps"] == 6 and "worker_failures" not in manifest.stats
    assert _max_relative(_losses(reference[1]), _losses(manifest)) <= 1e-5


def test_bad_inputs_fail_before_start(ray_cluster, data, tmp_path) -> None:
    empty = StepInput(name="tokenize_test", dir=tmp_path, manifest=Manifest(step="tokenize_test"))
    with pytest.raises(ValueError, match="no tokenized shards"):
        _run(tmp_path / "a", BASE, empty)
    with pytest.raises(ValueError, match="3 CPUs, but the Ray cluster has 2"):
        _run(tmp_path / "b", BASE.replace(resources={"num_workers": 3}), data)
    with pytest.raises(ValueError, match="GPU"):
        _run(tmp_path / "c", BASE.replace(resources={"gpus_per_worker": 1.0}), data)
    broken = _write_data(tmp_path / "broken", count=8)
    victim = broken.dir / "shards" / "shard-00001.arrow"
    victim.write_bytes(victim.read_bytes()[:-8] + b"corrupt!")
    # The global loader: the driver checks every digest before a worker starts. The streaming
    # loader: the worker that opens the shard checks it before using any of its rows; the run
    # stops with the shard named (a one-line ValueError from the worker's), before a first step.
    for name, loader in (("d", "global"), ("e", "streaming")):
        with pytest.raises(ValueError, match=r"shard-00001\.arrow: sha256 does not match"):
            _run(tmp_path / name, BASE.replace(data={"loader": loader}), broken)
        assert not list((tmp_path / name / "checkpoints").glob("**/step-*"))
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_evaluation_during_training_scores_every_evaluated_step_once(reference) -> None:
    """The reference run's evaluations: a curve per benchmark at steps 2, 4 and 6, the
    pre-scored vqa at step 2 kept as it was, each step's model removed once scored. That the
    evaluation left the losses and weights alone: test_killed_worker_... (bitwise)."""
    out, manifest = reference
    vqa, choice = (
        manifest.curves["eval.vqa.accuracy"],
        manifest.curves["eval.multiple_choice.accuracy"],
    )
    assert [s for s, _ in vqa] == [2, 4, 6] and vqa[0] == (2, 0.125)
    assert [s for s, _ in choice] == [2, 4, 6]
    assert all(0.0 <= v <= 1.0 for _, v in vqa + choice)
    assert json.loads((out / PRESCORED).read_text())["metrics"]["vqa.accuracy"] == 0.125
    assert not list(out.glob("evaluations/step-*/model"))  # each removed once scored
    assert manifest.stats["eval_during_training_s"] > 0


def test_restored_from_its_last_checkpoint_says_so(reference, data, evaluating, capsys) -> None:
    """A driver killed after the final checkpoint but before the manifest: the re-run (the same
    config) restores the last step, trains nothing, scores nothing again, and its manifest and
    log say where it resumed from."""
    out, first = reference
    before = _weights(out)
    scored = {p: p.stat().st_mtime_ns for p in out.glob("evaluations/step-*/*.json")}
    assert len(scored) == 6  # 2 benchmarks x steps 2, 4, 6
    cfg, tokenizer = evaluating
    manifest = _run(out, cfg, data, tokenizer=tokenizer)
    assert manifest.stats["steps"] == 6 and manifest.stats["resumed_from_step"] == 6
    assert "stage1: resuming from step 6" in capsys.readouterr().out
    assert _max_diff(_weights(out), before) == 0.0
    assert {p: p.stat().st_mtime_ns for p in out.glob("evaluations/step-*/*.json")} == scored
