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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from owl.data.manifest import Manifest
from owl.eval.benchmarks import BENCHMARK_TYPES, BenchmarkRecord
from owl.eval.evaluate import Benchmark, EvalLayout, EvalOptions, check_specs_java
from owl.eval.importers import parse_spec
from pipelines.step import StepContext, StepInput, resolve_path

# Ray, torch and transformers (through owl.eval.generate / prompts) are imported where the step
# computes: validating a job file or a fully cached `owl run` reads `Config` only.

MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
PREDICTIONS_DIR = "predictions"
IMPORTED_DIR = "imported"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _shapes_benchmarks() -> list[str]:
    return [
        f"@shapes/benchmarks/{name}.jsonl" for name in ("vqa", "caption", "multiple_choice", "text")
    ]


@dataclass
class Config(EvalOptions):
    """The evaluation options (owl.eval.evaluate.EvalOptions: batch_size, limit, circular,
    caption_meteor, caption_tokenizer, vqa_rule, num_frames; shared with `owl eval`) and the
    step's own below."""

    # Benchmark files (.jsonl / .parquet) or import specs (`vqav2:questions.json,images/`);
    # `@role/...` paths resolve inside an input's folder.
    benchmarks: list[str] = field(default_factory=_shapes_benchmarks)
    num_workers: int = 2  # Ray actors; each loads the model once
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: actors run on CUDA
    # Generation budget per record type; types left out keep owl.eval.prompts defaults.
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    # Also score every image benchmark with blank images: how much the answers use the image.
    blank_image_control: bool = True
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.benchmarks:
            raise ValueError("benchmarks: list at least one benchmark file")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        unknown = sorted(set(self.max_new_tokens) - set(BENCHMARK_TYPES))
        if unknown:
            raise ValueError(f"max_new_tokens: unknown type(s) {unknown}; use {BENCHMARK_TYPES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {DTYPES}")
        for entry in self.benchmarks:
            parse_spec(entry)  # a malformed spec fails when the job file is read


class EvalWorker:
    """One model replica. Created as a Ray actor by `run`; plain class for direct use.

    It loads the model only: the driver encodes the prompts and decodes the replies, so an actor
    never imports transformers (seconds per actor) and gets token ids in, token ids out."""

    def __init__(self, model_dir: str, device: str, dtype: str, num_threads: int) -> None:
        import torch

        from owl.model import load_model

        torch.set_num_threads(max(1, num_threads))
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.model = load_model(model_dir, device=device, dtype=getattr(torch, dtype)).eval()

    def ready(self) -> bool:
        """Returns once the model is loaded (the step times loading apart from generating)."""
        return True

    def generate(
        self,
        queries: list[Any],
        prompts: list[list[int]],
        budgets: list[int],
        options: dict[str, Any],
    ) -> list[list[int]]:
        """New token ids per query (owl.eval.generate.generate_replies)."""
        from owl.eval.generate import generate_replies

        return generate_replies(self.model, queries, prompts, budgets, **options)


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    import ray

    from owl.data.tokenize import load_tokenizer
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
        encoded = _encode_all(cfg, tokenizer, _model_config(inputs), benchmarks)
        ray.get([worker.ready.remote() for worker in workers])
        loaded = time.monotonic()

        def predict(passes: list[tuple[str, bool]]) -> list[list[dict[str, Any]]]:
            ctx.progress(
                0, len(passes),
                f"evaluating {len(benchmarks)} benchmark(s) on {len(workers)} worker(s)",
            )  # fmt: skip
            return _predict_all(ctx, cfg, workers, tokenizer, encoded, passes)

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
            _metric_names(result.name, result.records, result.metrics, result.blank)
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


def _encode_all(
    cfg: Config, tokenizer: Any, model_cfg: Any, benchmarks: dict[str, Benchmark]
) -> dict[str, tuple[list[Any], list[list[int]], list[int]]]:
    """Per benchmark: its queries in order, their prompt ids and budgets (the blank-image pass
    asks the same prompts)."""
    from owl.eval.generate import encode_queries

    return {
        name: encode_queries(
            tokenizer, b.records, model_cfg, max_new_tokens_by_type=dict(cfg.max_new_tokens),
            circular=cfg.circular, num_frames=cfg.num_frames,
        )
        for name, b in benchmarks.items()
    }  # fmt: skip


def _chunks(num_items: int, num_chunks: int) -> list[slice]:
    """Contiguous, near-equal slices of `num_items` (empty ones dropped)."""
    size, rest = divmod(num_items, num_chunks)
    chunks, start = [], 0
    for i in range(num_chunks):
        end = start + size + (1 if i < rest else 0)
        chunks.append(slice(start, end))
        start = end
    return [c for c in chunks if c.stop > c.start]


def _predict_all(
    ctx: StepContext,
    cfg: Config,
    workers: list[Any],
    tokenizer: Any,
    encoded: dict[str, tuple[list[Any], list[list[int]], list[int]]],
    passes: list[tuple[str, bool]],
) -> list[list[dict[str, Any]]]:
    """Predictions per pass (benchmark, blank?), each in query order. A pass's queries (not its
    records: a circular multiple-choice record is several queries) are cut into one near-equal
    contiguous chunk per actor, and every chunk is queued at once."""
    import ray

    from owl.eval.generate import decode_replies

    futures = []
    for name, blank in passes:
        queries, prompts, budgets = encoded[name]
        options = {
            "batch_size": cfg.batch_size,
            "blank_images": blank,
            "eos_token_id": tokenizer.eos_token_id,
            "num_frames": cfg.num_frames,
        }
        futures.append(
            [
                workers[i].generate.remote(queries[c], prompts[c], budgets[c], options)
                for i, c in enumerate(_chunks(len(queries), len(workers)))
            ]
        )
    results = []
    for done, ((name, blank), pass_futures) in enumerate(zip(passes, futures), start=1):
        replies = [reply for chunk in ray.get(pass_futures) for reply in chunk]
        results.append(decode_replies(tokenizer, encoded[name][0], replies))
        ctx.progress(done, len(passes), f"{name}{' (blank images)' if blank else ''} generated")
    return results


def _metric_names(
    name: str, records: Sequence[BenchmarkRecord], metrics: dict[str, float], blank: bool
) -> dict[str, float]:
    """Rename score()'s "<type>.<metric>" to "<benchmark>.<metric>" when the file is named after
    its only type, else "<benchmark>.<type>.<metric>"; blank-image metrics get "blank_"."""
    types = {r.type for r in records}
    named = {}
    for key, value in metrics.items():
        record_type, metric = key.split(".", 1)
        if blank and metric == "count":
            continue  # the same records as the real pass
        prefix = name if types == {name} else f"{name}.{record_type}"
        named[f"{prefix}.{'blank_' if blank else ''}{metric}"] = value
    return named
