"""The evaluate step's settings, its model actors, their generation passes and the names their
metrics get: shared by the evaluate step (pipelines/steps/evaluate.py, whose `Config` this is)
and evaluation during training (pipelines/steps/_train_eval.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from owl.eval.benchmarks import BENCHMARK_TYPES, BenchmarkRecord
from owl.eval.evaluate import Benchmark, EvalOptions
from owl.eval.importers import parse_spec
from pipelines.step import StepContext

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


def encode_all(
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


def chunks(num_items: int, num_chunks: int) -> list[slice]:
    """Contiguous, near-equal slices of `num_items` (empty ones dropped)."""
    size, rest = divmod(num_items, num_chunks)
    chunks, start = [], 0
    for i in range(num_chunks):
        end = start + size + (1 if i < rest else 0)
        chunks.append(slice(start, end))
        start = end
    return [c for c in chunks if c.stop > c.start]


def predict_all(
    ctx: StepContext,
    cfg: EvalOptions,
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
                for i, c in enumerate(chunks(len(queries), len(workers)))
            ]
        )
    results = []
    for done, ((name, blank), pass_futures) in enumerate(zip(passes, futures), start=1):
        replies = [reply for chunk in ray.get(pass_futures) for reply in chunk]
        results.append(decode_replies(tokenizer, encoded[name][0], replies))
        ctx.progress(done, len(passes), f"{name}{' (blank images)' if blank else ''} generated")
    return results


def metric_names(
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
