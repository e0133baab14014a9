"""Step `evaluate`: a trained model on benchmark files -> per-sample predictions and metrics.

Inputs: `model` (a training step: `model/`), `tokenizer` (`tokenizer/`), optionally `shapes`
(whose `benchmarks/` the default config reads). A pool of Ray actors (one per GPU, or N CPU
actors) each loads the model once (and nothing else: no tokenizer, no transformers); while they
start, the driver encodes every prompt. Each benchmark's queries are split into contiguous
chunks, one per actor, and all chunks are queued at once so actors stay busy across
benchmarks; the actors return token ids, which the driver decodes. The driver
scores (the caption toolkit's Java runs there), writes `predictions/<benchmark>.parquet` and
`units/<benchmark>.parquet` (the per-item scores of each headline metric) and returns the
metrics, each headline metric with its 95% bootstrap interval (`<metric>_ci95_low` / `_high`),
in `Manifest.stats` (docs/benchmarks.md explains names and rules).

A benchmark entry is a benchmark file or an import spec, `[name=]kind:path,path,...` (e.g.
`vqav2:questions.json,annotations.json,images/`): the official files are imported into
`imported/` first (owl.eval.importers). A benchmark without public answers (VQAv2 test-dev,
MMBench test) is generated and not scored: its upload file is written to
`submissions/<benchmark>.json|.xlsx`, listed in the manifest's files and artifacts.

Benchmark images are read by the actors from the paths in the files: on a multi-node cluster
they must be on storage every node sees (the pipeline's storage root is).
"""

from __future__ import annotations

import time
from typing import Any

from owl.data.manifest import Manifest
from owl.eval.evaluate import EvalLayout, check_specs_java
from pipelines.step import StepContext, StepInput, resolve_path
from pipelines.steps._eval_passes import (
    IMPORTED_DIR,
    MODEL_DIR,
    PREDICTIONS_DIR,
    TOKENIZER_DIR,
    Config,
    EvalWorker,
    encode_all,
    metric_names,
    predict_all,
)

# Ray, torch and transformers (through owl.eval.generate / prompts) are imported where the step
# computes: validating a job file or a fully cached `owl run` reads `Config` only.


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    import ray

    from owl.data.tokenizer import load_tokenizer
    from owl.eval.evaluate import evaluate, load_benchmarks
    from owl.eval.prompts import DEFAULT_MAX_NEW_TOKENS, max_new_tokens, style_of

    started = time.monotonic()
    benchmarks = load_benchmarks(
        cfg.benchmarks, cfg, ctx.out_dir / IMPORTED_DIR, resolve=lambda p: resolve_path(p, inputs),
        progress=lambda message: ctx.progress(0, 1, message),
    )  # fmt: skip
    workers = _start_workers(cfg, inputs)
    try:
        # While the actors start and load the model, the driver encodes every prompt.
        tokenizer = load_tokenizer(inputs["tokenizer"].dir / TOKENIZER_DIR)
        encoded = encode_all(cfg, tokenizer, _model_config(inputs), benchmarks)
        ray.get([worker.ready.remote() for worker in workers])
        loaded = time.monotonic()

        def predict(passes: list[tuple[str, bool]]) -> list[list[dict[str, Any]]]:
            ctx.progress(
                0, len(passes),
                f"evaluating {len(benchmarks)} benchmark(s) on {len(workers)} worker(s)",
            )  # fmt: skip
            return predict_all(ctx, cfg, workers, tokenizer, encoded, passes)

        results = evaluate(
            benchmarks, predict, cfg, EvalLayout(ctx.out_dir, PREDICTIONS_DIR),
            blank_control=cfg.blank_image_control,
        )  # fmt: skip
    finally:
        for worker in workers:
            ray.kill(worker)

    manifest = Manifest(step=ctx.step)
    for result in results:
        manifest.stats.update(
            metric_names(result.name, result.records, result.metrics, result.blank)
        )
        for rel, rows in result.files:
            manifest.add_file(ctx.out_dir, rel, rows=rows)
            manifest.artifacts.append(rel)
    manifest.stats["eval.num_queries"] = float(sum(len(r.predictions) for r in results))
    manifest.stats["eval.seconds"] = time.monotonic() - started
    # Generating and scoring alone, after every worker has loaded the model.
    manifest.stats["eval.generate_seconds"] = time.monotonic() - loaded
    manifest.info["benchmarks"] = {
        name: {"path": b.entry, "records": len(b.records)} for name, b in benchmarks.items()
    }
    manifest.info["max_new_tokens"] = {**DEFAULT_MAX_NEW_TOKENS, **cfg.max_new_tokens}
    # What each benchmark was asked with: prompt style -> generation budget.
    manifest.info["prompts"] = {
        name: {style_of(r): max_new_tokens(r, cfg.max_new_tokens) for r in b.records}
        for name, b in benchmarks.items()
    }
    manifest.info["vqa_rule"] = cfg.vqa_rule
    manifest.info["caption_tokenizer"] = cfg.caption_tokenizer
    ctx.progress(len(results), len(results), "scored")
    return manifest


def check_environment(cfg: Config) -> None:
    """At validation (`owl run`, `--dry-run`; pipelines.runner), before any step runs: Java for
    caption benchmarks imported from their official files (owl.eval.evaluate.check_specs_java)."""
    check_specs_java(cfg.benchmarks, cfg)


def _start_workers(cfg: Config, inputs: dict[str, StepInput]) -> list[Any]:
    for role, sub in (("model", MODEL_DIR), ("tokenizer", TOKENIZER_DIR)):
        if role not in inputs:
            raise ValueError(f"evaluate needs the {role!r} input; this step got {sorted(inputs)}")
        if not (inputs[role].dir / sub).is_dir():
            raise ValueError(f"{inputs[role].dir}: no {sub}/ folder in the {role!r} input")
    import ray

    device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
    actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(EvalWorker)
    return [
        actor.remote(
            str(inputs["model"].dir / MODEL_DIR), device, cfg.dtype, int(cfg.cpus_per_worker)
        )
        for _ in range(cfg.num_workers)
    ]


def _model_config(inputs: dict[str, StepInput]) -> Any:
    """The model's OwlConfig, read from its folder (prompts need its variant and visual slots)."""
    from owl.model.weights import read_model_config

    return read_model_config(inputs["model"].dir / MODEL_DIR)
