"""The GPU check (issue 28): what a short window on one CUDA GPU should measure, in one command.

1. job: the demo job through the real `owl run` (shrunk with --set: fewer images, a few dozen
   steps per stage, a few evaluation items), stages and evaluation on the GPU; checks that both
   stages ran in bf16 on CUDA, that each stage's loss went down and that the evaluation scored.
2. train: the stage-2 training step at 7B width: Owl2's 448-px ViT-L/14 and abstractor and as
   many LLaMA-2-7B-width decoder layers (with the MAM) as the memory plan fits in the GPU, the
   recipe's stage-2 settings (jobs/owl2-llama2-7b.yaml: trainable set, ZeRO-3, activation
   checkpointing, micro-batch, max length, grad accumulation), through the training loop's own
   model build, DeepSpeed engine and step, NCCL at world size 1, on packed synthetic rows.
   Tokens/s, MFU (model FLOPs per step from `owl.train.metrics.flop_terms`: vision encoder,
   abstractor, decoder, attention; docs/model.md) and the peak memory
   (torch.cuda.max_memory_allocated) beside the memory plan's prediction (owl.train.memory).
3. generate: Owl2-7B (random weights, bf16) generating with the KV cache from an image + text
   prompt, batch 1 and 8, new tokens/s.
4. One table on stdout; --json prints the results as JSON, --out writes them to a file.

Each part runs in its own process (its memory, process group and failure are its own) under a
time limit. `--device cpu` runs the same parts at miniature sizes (debug-tiny / demo, gloo,
fp32): CI runs its train and generate parts (tests/integration/test_gpu_check.py), checks
the job part's --set values with `owl run --dry-run` there and its summary against the demo's
own run (tests/e2e/test_demo.py), so the script cannot rot.

    make gpu-check                                     # = python bench/gpu_check.py --out ...
    .venv/bin/python bench/gpu_check.py --device cpu --json [--peak-tflops 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("job", "train", "generate")
RECIPE = ROOT / "jobs" / "owl2-llama2-7b.yaml"
# Seconds each part may take (GPU): 8 minutes in all, start-up included.
LIMITS = {"job": 240, "train": 150, "generate": 90}


# --- 1. the demo job through `owl run` -------------------------------------------------------


def job_overrides(device: str, storage: Path) -> list[str]:
    """`--set` values shrinking jobs/demo.yaml to a check (and putting it on the GPU)."""
    gpu = device == "cuda"
    sets = {
        "storage": str(storage),
        "shapes.num_caption_images": 1200 if gpu else 48,
        "shapes.num_instruction_images": 1200 if gpu else 48,
        "shapes.num_text": 200 if gpu else 24,
        "shapes.num_eval": 20 if gpu else 4,
        "shapes.num_eval_vqa": 20 if gpu else 4,
        "download.processes_count": 2 if gpu else 1,
    }
    for stage in ("stage1", "stage2"):
        steps = 40 if gpu else 6
        sets.update({
            f"{stage}.schedule.max_steps": steps, f"{stage}.resources.num_workers": 1,
            f"{stage}.resources.gpus_per_worker": 1 if gpu else 0,
            f"{stage}.log_every": 5 if gpu else 2, f"{stage}.checkpoint.every": steps,
            f"{stage}.schedule.warmup_steps": 5 if gpu else 1,
        })  # fmt: skip
        if not gpu:
            sets[f"{stage}.batch.micro_batch_size"] = 4
    # Caption metrics tokenize with COCO's PTB tokenizer (Java); a GPU machine without Java
    # scores them with the approximate tokenizer (metrics named *_approx) instead of failing.
    tokenizer = "ptb" if shutil.which("java") else "approx"
    for step in ("evaluate_stage1", "evaluate"):
        sets.update({
            f"{step}.limit": 20 if gpu else 4, f"{step}.num_workers": 1,
            f"{step}.gpus_per_worker": 1 if gpu else 0, f"{step}.caption_tokenizer": tokenizer,
        })  # fmt: skip
    return [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]


def run_job(device: str, storage: Path, timeout: float) -> dict[str, Any]:
    """`owl run jobs/demo.yaml --json` shrunk; the stages' losses and the evaluation's metrics."""
    command = [sys.executable, "-m", "pipelines.cli", "run", "jobs/demo.yaml", "--json"]
    command += job_overrides(device, storage)
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"ok": False, "wall_s": wall, "error": _run_error(done)}
    return {"wall_s": wall, **job_summary(storage, device)}


def _run_error(done: subprocess.CompletedProcess) -> str:
    """The failed run's error: `owl run --json`'s "error" field, else the last lines of stderr."""
    try:
        return str(json.loads(done.stdout)["error"])
    except (ValueError, KeyError, TypeError):
        return " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])


def _step_manifest(storage: Path, step: str) -> dict[str, Any]:
    """The newest manifest.json of `step` under the storage root."""
    manifests = sorted(
        (storage / "steps" / step).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime
    )
    if not manifests:
        raise FileNotFoundError(f"no manifest for step {step} under {storage}")
    return json.loads(manifests[-1].read_text())


def job_summary(storage: Path, device: str) -> dict[str, Any]:
    """What the job's manifests say: per stage the first and last logged loss, the engine's
    device and precision (on `device`, bf16 on CUDA only); per evaluation its metrics."""
    out: dict[str, Any] = {"stages": {}, "evaluations": {}}
    for stage in ("stage1", "stage2"):
        manifest = _step_manifest(storage, stage)
        losses = [value for _, value in manifest["curves"]["loss"]]
        engine = manifest["info"]["deepspeed"]
        out["stages"][stage] = {
            "first_loss": losses[0], "last_loss": losses[-1], "steps": manifest["stats"]["steps"],
            "loss_went_down": losses[-1] < losses[0], "device": engine.get("device", ""),
            "bf16": engine.get("bf16", False),
            "tokens_per_s": manifest["stats"]["tokens"] / manifest["stats"]["train_time_s"],
        }  # fmt: skip
    for step in ("evaluate_stage1", "evaluate"):
        stats = _step_manifest(storage, step)["stats"]
        out["evaluations"][step] = {k: v for k, v in stats.items() if isinstance(v, float)}
    on_device = all(
        s["device"].startswith(device) and s["bf16"] == (device == "cuda")
        for s in out["stages"].values()
    )
    out["ok"] = (
        on_device
        and all(s["loss_went_down"] for s in out["stages"].values())
        and all(e.get("eval.num_queries", 0) > 0 for e in out["evaluations"].values())
    )
    return out


# --- 2. the stage-2 training step at 7B width -------------------------------------------------


def recipe_stage2(**overrides: Any) -> Any:
    """The Owl2-7B recipe's stage-2 `TrainConfig` (jobs/owl2-llama2-7b.yaml), with overrides
    (`TrainConfig.replace`'s: a section as a dict changes the fields it names)."""
    import yaml

    from owl.configs import build_dataclass
    from owl.train.config import TrainConfig

    section = yaml.safe_load(RECIPE.read_text())["stage2"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in section.items() if k in names}
    return build_dataclass(TrainConfig, {**fields, "stage": 2}, "stage2").replace(**overrides)


def train_shapes(device: str, layers: int, steps: int) -> tuple[Any, Any]:
    """(model config, train config) of the measured step. GPU: Owl2-7B widths with `layers`
    decoder layers (0: as many as the memory plan fits in 80% of the GPU: the rest for the CUDA
    context, NCCL, DeepSpeed's buckets and the allocator's slack), the recipe's stage 2.
    CPU: debug-tiny with the recipe's stage-2 settings at a small micro-batch and length."""
    from owl.model import get_config

    common = {
        "resources": {"num_workers": 1},
        "schedule": {"max_steps": steps},
        "log_every": 1,
        "checkpoint": {"every": steps},
        "data": {"mix": {}},  # the step trains on synthetic rows, not the recipe's text mixture
    }
    if device == "cpu":
        batch = {"micro_batch_size": 2, "max_length": 128, "grad_accum": 2}
        cfg = recipe_stage2(**common, batch=batch)
        return get_config("debug-tiny", decoder={"num_layers": layers or 2}), cfg
    cfg = recipe_stage2(**common)
    if layers:
        return get_config("owl2-llama2-7b", decoder={"num_layers": layers}), cfg
    return fitting_model(cfg, _gpu_bytes() * 0.8), cfg


def fitting_model(cfg: Any, budget_bytes: float) -> Any:
    """Owl2-7B widths with the most decoder layers (up to 32) whose memory plan fits the budget."""
    from owl.model import get_config
    from owl.train.memory import plan_memory

    best = get_config("owl2-llama2-7b", decoder={"num_layers": 1})
    for layers in range(1, 33):
        model = get_config("owl2-llama2-7b", decoder={"num_layers": layers})
        if plan_memory(model, cfg).total > budget_bytes:
            break
        best = model
    return best


def _gpu_bytes() -> float:
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory)


def measure_train(
    device: str, layers: int, steps: int, warmup: int, peak_tflops: float
) -> dict[str, Any]:
    """Build the model, DeepSpeed engine and loader as the training loop does, then time
    `steps` optimizer steps after `warmup` untimed ones."""
    import torch

    from bench.bench_train import write_data
    from owl.data.loader import shards_from_manifest
    from owl.train import engine as engine_setup
    from owl.train import loop
    from owl.train.data_plan import plan_data
    from owl.train.job import LocalSession, WorkerJob, init_single_process_group
    from owl.train.memory import plan_memory
    from owl.train.metrics import flop_terms, peak_flops
    from owl.train.stages import select_for_stage

    model_cfg, cfg = train_shapes(device, layers, warmup + steps)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    init_single_process_group(backend="nccl" if cuda else "gloo")
    plan = plan_memory(model_cfg, cfg)
    rows = (warmup + steps) * cfg.batch.grad_accum * cfg.batch.micro_batch_size
    with tempfile.TemporaryDirectory(prefix="gpu-check-data-") as tmp:
        # About 6 samples per row (median length max_length / 6), and spare ones.
        manifest = write_data(Path(tmp), model_cfg, count=8 * rows, max_length=cfg.batch.max_length)
        shards = shards_from_manifest(manifest, Path(tmp))
        job = WorkerJob(train=cfg, model=model_cfg, data=plan_data(cfg, model_cfg, shards))
        session = LocalSession(Path(tmp) / "checkpoints")
        started = time.perf_counter()
        model = engine_setup.starting_model(job, session)
        select_for_stage(model, model_cfg.variant, cfg)
        engine = engine_setup.initialize_engine(model, cfg, cfg.schedule.max_steps, 1)
        loader = job.data.stream(session.rank, session.world_size)
        setup_s = time.perf_counter() - started
        engine.train()
        timed: list[dict[str, float]] = []
        for step in range(warmup + steps):
            _sync(cuda)
            start = time.perf_counter()
            counts = loop._train_step(engine, loader, job, 1)
            _sync(cuda)
            counts["time_s"] = time.perf_counter() - start
            counts["loss"] = counts["loss_sum"] / max(counts["supervised"], 1)
            if step >= warmup:
                timed.append(counts)
    peak_bytes = torch.cuda.max_memory_allocated() if cuda else None
    seconds = sum(c["time_s"] for c in timed)
    flops = sum(c["flops"] for c in timed)
    peak = peak_flops() if peak_tflops <= 0 else peak_tflops * 1e12
    return {
        "model": {"name": model_cfg.name, "decoder_layers": model_cfg.decoder.num_layers},
        "train_config": {
            "trainable": cfg.trainable,
            "zero_stage": cfg.memory.zero_stage,
            "activation_checkpointing": cfg.memory.activation_checkpointing,
            "micro_batch_size": cfg.batch.micro_batch_size,
            "max_length": cfg.batch.max_length,
            "grad_accum": cfg.batch.grad_accum,
        },
        "engine": engine_setup.engine_summary(engine),
        "setup_s": setup_s,
        "steps": [
            {k: c[k] for k in ("loss", "tokens", "images", "attention_pairs", "flops", "time_s")}
            for c in timed
        ],
        "losses": [c["loss"] for c in timed],
        "tokens_per_s": sum(c["tokens"] for c in timed) / seconds,
        "flops_per_s": flops / seconds,
        "peak_flops": peak,
        "mfu": flops / seconds / peak if peak else None,
        "flop_terms_last_step": flop_terms(
            model_cfg,
            tokens=int(timed[-1]["tokens"]),
            attention_pairs=int(timed[-1]["attention_pairs"]),
            images=int(timed[-1]["images"]),
        ),  # fmt: skip
        "peak_memory_gib": None if peak_bytes is None else peak_bytes / (1 << 30),
        "memory_plan": plan.to_dict(),
        "ok": all(c["loss"] == c["loss"] for c in timed),  # no NaN
    }


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


# --- 3. generation with the KV cache ----------------------------------------------------------


def measure_generation(device: str, new_tokens: int) -> dict[str, Any]:
    """New tokens/s of `generate` (greedy, KV cache, no EOS stop) at batch 1 and 8, image + text
    prompts. GPU: Owl2-7B in bf16; CPU: debug-tiny in fp32."""
    import torch

    from owl import IMAGE_TOKEN_ID
    from owl.model import OwlModel, get_config

    cuda = device == "cuda"
    name = "owl2-llama2-7b" if cuda else "debug-tiny"
    cfg = get_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = OwlModel(cfg)
    model = (model.to(torch.bfloat16) if cuda else model).eval()
    dtype = next(model.parameters()).dtype
    size = cfg.vision.image_size
    prompt = [1, *[IMAGE_TOKEN_ID] * cfg.num_visual_tokens, *range(10, 42)]
    out: dict[str, Any] = {"model": name, "dtype": str(dtype).removeprefix("torch."), "batches": {}}
    for batch in (1, 8):
        images = [torch.rand(1, 3, size, size, dtype=dtype) for _ in range(batch)]
        model.generate([prompt] * batch, images, max_new_tokens=4, eos_token_id=None)  # warm-up
        _sync(cuda)
        start = time.perf_counter()
        tokens = model.generate(
            [prompt] * batch, images, max_new_tokens=new_tokens, eos_token_id=None
        )
        _sync(cuda)
        seconds = time.perf_counter() - start
        count = sum(len(t) for t in tokens)
        out["batches"][str(batch)] = {
            "new_tokens": count, "seconds": seconds, "tokens_per_s": count / seconds,
        }  # fmt: skip
    out["ok"] = all(
        b["new_tokens"] == b_size * new_tokens for b_size, b in zip((1, 8), out["batches"].values())
    )
    return out


# --- orchestration ----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def run_part(part: str, args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    """One part in its own process, under its time limit (its error, not a crash, on failure)."""
    limit = LIMITS[part] * args.time_scale
    if part == "job":
        try:
            return run_job(args.device, storage / "job", limit)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {limit:.0f} s"}
    result = storage / f"{part}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        part,
        "--result",
        str(result),
    ]
    command += ["--device", args.device, "--layers", str(args.layers), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens)]
    command += ["--peak-tflops", str(args.peak_tflops)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {limit:.0f} s"}
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"ok": False, "error": " | ".join(tail)}
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - started}


def _gib(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f} GiB" if value >= 1 else f"{value * 1024:.1f} MiB"


def _flops(value: float) -> str:
    return f"{value / 1e12:.2f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.3f} GFLOP/s"


def _job_line(r: dict[str, Any]) -> str:
    stages = [
        f"{name} loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['steps']:.0f} steps "
        f"({s['device'] or '?'}, {'bf16' if s['bf16'] else 'fp32'}, {s['tokens_per_s']:,.0f} tok/s)"
        for name, s in r["stages"].items()
    ]
    evals = [
        f"{name}: {m['eval.num_queries']:.0f} queries, "
        + ", ".join([f"{k} {v:.3f}" for k, v in sorted(m.items()) if not k.startswith("eval.")][:3])
        for name, m in r["evaluations"].items()
    ]
    return "; ".join(stages + evals)


def _train_line(r: dict[str, Any]) -> str:
    plan, t = r["memory_plan"], r["train_config"]
    mfu = (
        "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}" if r["mfu"] >= 1e-3 else f"{r['mfu']:.1e}"
    )
    return (
        f"{r['model']['name']} widths, {r['model']['decoder_layers']} decoder layers, ZeRO-"
        f"{r['engine']['zero_stage']}, {t['micro_batch_size']} x {t['max_length']} x accum "
        f"{t['grad_accum']}: {r['tokens_per_s']:,.0f} tok/s, {_flops(r['flops_per_s'])}, "
        f"MFU {mfu}; peak memory {_gib(r['peak_memory_gib'])}, plan "
        f"{_gib(plan['total_gib'])} (model states {_gib(plan['model_states_gib'])} + "
        f"activations {_gib(plan['activations_gib'])})"
    )


def _generate_line(r: dict[str, Any]) -> str:
    rates = ", ".join(f"batch {b} {v['tokens_per_s']:,.1f} tok/s" for b, v in r["batches"].items())
    return f"{r['model']} {r['dtype']}, KV cache, image + text prompt: {rates}"


LINES = {"job": _job_line, "train": _train_line, "generate": _generate_line}


def table(results: dict[str, Any]) -> str:
    """One line per part: what it measured, its wall time, OK or FAILED (with the error)."""
    lines = [f"GPU check on {results['device_name']} ({results['device']}), "
             f"{results['wall_s']:.0f} s in all"]  # fmt: skip
    for part, r in results["parts"].items():
        status = "OK" if r.get("ok") else "FAILED"
        body = r["error"] if "error" in r else LINES[part](r)
        lines.append(f"{part:<9} {status:<7} {r.get('wall_s', 0):>5.0f} s  {body}")
    return "\n".join(lines)


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    import platform

    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: what fits)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--new-tokens", type=int, default=0, help="0: 128 on GPU, 16 on CPU")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0,
        help="peak FLOP/s for MFU (0: the GPU's bf16 peak from owl.train.metrics)",
    )  # fmt: skip
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies the limits")
    parser.add_argument("--part", choices=PARTS[1:], help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or (128 if args.device == "cuda" else 16)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:  # a child process: one part, its result to a file
        if args.part == "train":
            result = measure_train(
                args.device, args.layers, args.steps, args.warmup, args.peak_tflops
            )
        else:
            result = measure_generation(args.device, args.new_tokens)
        args.result.write_text(json.dumps(result))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device: run on a GPU machine, or --device cpu", file=sys.stderr)
            return 2
    started = time.perf_counter()
    results: dict[str, Any] = {"device": args.device, "device_name": _device_name(args.device)}
    results["parts"] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for part in args.parts.split(","):
            print(f"[gpu-check] {part} ...", file=sys.stderr, flush=True)
            results["parts"][part] = run_part(part, args, Path(tmp))
    results["wall_s"] = time.perf_counter() - started
    results["ok"] = all(r.get("ok") for r in results["parts"].values())
    print(table(results), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
