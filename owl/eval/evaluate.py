"""One evaluation: benchmark entries -> records -> predictions -> metrics and files.

`owl eval` (pipelines/commands/eval.py: the model in this process) and the `evaluate` step
(pipelines/steps/evaluate.py: Ray actors) both run an evaluation through this module; they differ
only in how predictions are generated, a function they pass (`Predictor`). The options both take
are declared once, in `EvalOptions`: the step's `Config` extends it and the CLI's flags are built
from its fields' metadata (`cli_flag`).

    options = EvalOptions(vqa_rule="vqav2")
    benchmarks = load_benchmarks(entries, options, imported_dir)   # imports specs, checks Java
    result = evaluate(benchmarks, predict, options, EvalLayout(out_dir))

Plain Python at module level: the step imports `EvalOptions` when a job file is validated, so
owl.eval.scoring, owl.eval.uncertainty (numpy) and pyarrow are imported where predictions are
scored and written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl.data.video import DEFAULT_NUM_FRAMES
from owl.eval.benchmarks import BenchmarkRecord, benchmark_name, read_benchmark
from owl.eval.caption_metrics import JAVA_MISSING, java_available
from owl.eval.importers import CAPTION_KINDS, import_benchmark, parse_spec
from owl.eval.metrics import CAPTION_TOKENIZERS, VQA_RULES

Predictions = list[dict[str, Any]]
# (benchmark name, blank images?) per pass -> each pass's predictions, in query order.
Predictor = Callable[[list[tuple[str, bool]]], list[Predictions]]


def cli_flag(flag: str, help: str, **argparse_options: Any) -> dict[str, Any]:
    """A field's `owl eval` flag: `--no-X` for a boolean that defaults to True (the flag turns it
    off), else `--X VALUE` of the field's type; `argparse_options` (choices, ...) pass through."""
    return {"flag": flag, "help": help, **argparse_options}


@dataclass
class EvalOptions:
    """How benchmarks are asked and scored: the options `owl eval` and the evaluate step share."""

    batch_size: int = field(default=16, metadata=cli_flag("--batch-size", "queries per batch"))
    # First N records of each benchmark (None: all).
    limit: int | None = field(
        default=None, metadata=cli_flag("--limit", "first N records of each file")
    )
    # Ask multiple-choice questions once per rotation of the options.
    circular: bool = field(
        default=True, metadata=cli_flag("--no-circular", "ask each choice question once")
    )
    # METEOR starts a JVM (seconds); off for quick runs.
    caption_meteor: bool = field(
        default=True, metadata=cli_flag("--no-meteor", "skip METEOR (starts a JVM)")
    )
    # ptb: COCO's PTB tokenizer (needs Java; refused without it). approx: a simple tokenizer,
    # metrics then named *_approx (CIDEr_approx, ...), never under the official names.
    caption_tokenizer: str = field(
        default="ptb",
        metadata=cli_flag(
            "--caption-tokenizer", "ptb: COCO's (needs Java); approx: no Java, metrics named "
            "*_approx", choices=CAPTION_TOKENIZERS,
        ),
    )  # fmt: skip
    # VQA records naming no rule of their own: vqav2 (the official script), vizwiz, normalized.
    vqa_rule: str = field(
        default="vqav2",
        metadata=cli_flag(
            "--vqa-rule", "VQA rule for records that name none (default: the official VQAv2 "
            "script)", choices=VQA_RULES,
        ),
    )  # fmt: skip
    # Frames sampled uniformly from each benchmark video, each an image slot (owl.data.video);
    # the number the model was trained with (tokenize_instructions.num_frames).
    num_frames: int = field(
        default=DEFAULT_NUM_FRAMES,
        metadata=cli_flag(
            "--num-frames", "frames sampled uniformly from each video, each an image slot (the "
            "number the model was trained with; default 4)",
        ),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.caption_tokenizer not in CAPTION_TOKENIZERS:
            raise ValueError(
                f"caption_tokenizer: {self.caption_tokenizer!r} is not one of {CAPTION_TOKENIZERS}"
            )
        if self.vqa_rule not in VQA_RULES:
            raise ValueError(f"vqa_rule: {self.vqa_rule!r} is not one of {VQA_RULES}")


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as read: its entry (file or import spec, as given), the file read, records."""

    entry: str
    path: str
    records: list[BenchmarkRecord]


def load_benchmarks(
    entries: Sequence[str],
    options: EvalOptions,
    imported_dir: str | Path,
    resolve: Callable[[str], str] = str,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Benchmark]:
    """Benchmarks by name (the file name without extension, or an import spec's name). Each entry
    is a benchmark file or an import spec, `[name=]kind:path,path,...`, whose official files are
    imported into `imported_dir` first; `resolve` maps each path as written to a real one (the
    step's `@role/...`). Refuses two benchmarks of one name, and caption records under the PTB
    tokenizer without Java, before anything is generated."""
    benchmarks = {}
    for entry in entries:
        spec = parse_spec(entry)
        if spec is None:
            path = resolve(entry)
        else:
            name, kind, paths = spec
            if progress is not None:
                progress(f"importing {kind} from {len(paths)} path(s)")
            path = str(import_benchmark(kind, [resolve(p) for p in paths], imported_dir, name))
        benchmarks[benchmark_name(path)] = Benchmark(
            entry, path, read_benchmark(path, options.limit)
        )
    if len(benchmarks) != len(entries):
        raise ValueError(
            f"benchmarks: two share a name (file name without extension, or the spec's "
            f"kind; name one `name=kind:...`): {list(entries)}"
        )
    has_captions = any(r.type == "caption" for b in benchmarks.values() for r in b.records)
    if has_captions and options.caption_tokenizer == "ptb" and not java_available():
        raise ValueError(JAVA_MISSING)
    return benchmarks


def check_specs_java(entries: Sequence[str], options: EvalOptions) -> None:
    """Before anything runs: caption benchmarks imported from their official files
    (CAPTION_KINDS) need Java for the PTB tokenizer. Benchmark files whose record types are known
    only once read are checked by `load_benchmarks`."""
    kinds = {spec[1] for spec in map(parse_spec, entries) if spec is not None}
    if options.caption_tokenizer == "ptb" and kinds & CAPTION_KINDS and not java_available():
        raise ValueError(JAVA_MISSING)


# ---------------------------------------------------------------------------------------------
# Scoring and writing


@dataclass(frozen=True)
class EvalLayout:
    """Where an evaluation writes: `<predictions>/<benchmark>[.blank].parquet` (the predictions
    table), `<root>/units/<benchmark>.parquet` (per-item scores of each headline metric, which
    `owl compare` pairs) and `<root>/submissions/<benchmark>.json|.xlsx` (upload files of splits
    without public answers). `owl eval --predictions DIR` writes the predictions into DIR itself,
    the step into `predictions/`."""

    root: Path
    predictions: str = ""


UNITS_DIR = "units"
SUBMISSIONS_DIR = "submissions"


@dataclass
class PassResult:
    """One pass over a benchmark (`blank`: the blank-image control): score()'s metrics
    ("<type>.<metric>", headline metrics with `_ci95_low` / `_high`), its predictions, and the
    files written under the layout's root, in order, as (relative path, rows)."""

    name: str
    blank: bool
    records: list[BenchmarkRecord]
    predictions: Predictions
    metrics: dict[str, float]
    files: list[tuple[str, int]] = field(default_factory=list)
    submission_format: str | None = None  # a split without public answers: its upload format
    submission: str | None = None  # its upload file as written, relative to the layout's root


def evaluate(
    benchmarks: Mapping[str, Benchmark],
    predict: Predictor,
    options: EvalOptions,
    layout: EvalLayout | None,
    blank_control: bool = False,
) -> list[PassResult]:
    """Predict, score and (with a `layout`) write every benchmark: one pass each, and with
    `blank_control` a second pass with blank images for each benchmark that has images or videos
    (scored without METEOR and without intervals; the same records as the real pass)."""
    from owl.eval.scoring import score
    from owl.eval.uncertainty import headline_units, intervals

    passes = [(name, False) for name in benchmarks]
    if blank_control:
        passes += [
            (name, True)
            for name, b in benchmarks.items()
            if any(r.images or r.videos for r in b.records)
        ]
    results = []
    for (name, blank), preds in zip(passes, predict(passes)):
        records = benchmarks[name].records
        metrics = score(
            records, preds, caption_meteor=options.caption_meteor and not blank,
            caption_tokenizer=options.caption_tokenizer, vqa_rule=options.vqa_rule,
        )  # fmt: skip
        result = PassResult(name, blank, records, preds, metrics)
        units = None
        if not blank:
            units = headline_units(
                records, preds, vqa_rule=options.vqa_rule,
                caption_tokenizer=options.caption_tokenizer,
            )  # fmt: skip
            metrics.update(intervals(units))
            result.submission_format = _submission_format(records)
        if layout is not None:
            result.files = _write(layout, result, units, options.vqa_rule)
        results.append(result)
    return results


def _submission_format(records: Sequence[BenchmarkRecord]) -> str | None:
    from owl.eval.submissions import submission_format

    return submission_format(records)


def _write(
    layout: EvalLayout, result: PassResult, units: dict[str, Any] | None, vqa_rule: str
) -> list[tuple[str, int]]:
    """A pass's files under `layout.root`: units, predictions, submission (in that order: the
    order the step lists them in its manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from owl.eval.scoring import prediction_rows
    from owl.eval.submissions import write_submission
    from owl.eval.uncertainty import write_units

    root, name = layout.root, result.name
    files = []
    if units is not None:
        rel = f"{UNITS_DIR}/{name}.parquet"
        num_rows = write_units(root / rel, units)
        if num_rows:  # none for a split without public answers
            files.append((rel, num_rows))
    rel = str(Path(layout.predictions) / f"{name}{'.blank' if result.blank else ''}.parquet")
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    rows = prediction_rows(result.records, result.predictions, vqa_rule)
    pq.write_table(pa.Table.from_pylist(rows), root / rel)
    files.append((rel, len(result.predictions)))
    if result.submission_format is not None:
        path = write_submission(
            root / SUBMISSIONS_DIR / name, result.submission_format, result.records,
            result.predictions,
        )  # fmt: skip
        result.submission = str(path.relative_to(root))
        files.append((result.submission, len(result.records)))
    return files
