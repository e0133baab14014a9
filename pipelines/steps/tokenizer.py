"""Step `tokenizer`: a Hugging Face tokenizer folder `tokenizer/` for the tokenize and train steps.

Either a copy of a given HF folder (`path`, e.g. LLaMA's), or a byte-level BPE trained here on the
captions of the filter output (role `data`) plus the instruction/text files in `texts`.
Special tokens: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), pad = <unk>.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from owl.data.manifest import Manifest
from owl.data.sources import Record, SourceSpec, check_source, read_source, record_texts
from owl.data.templates import PLACEHOLDER_RE
from pipelines.step import StepContext, StepInput, resolve_path

OUT = "tokenizer"


@dataclass
class Config:
    # A HF tokenizer folder to use as is; None: train a BPE tokenizer on the pipeline's own text.
    path: str | None = None
    vocab_size: int = 4096
    # Instruction / text-only files whose texts join the captions for training, as
    # {format, path} entries (paths may be `@shapes/...`).
    texts: list[SourceSpec] = field(default_factory=list)
    caption_column: str = "caption"


def _caption_files(data: StepInput, column: str) -> list[Path]:
    files = [data.path(f.path) for f in data.manifest.files if f.path.endswith(".parquet")]
    for path in files:
        if column not in pq.read_schema(path).names:
            raise ValueError(f"{path}: no column {column!r} (set tokenizer.caption_column)")
    return files


def _iter_captions(files: list[Path], column: str) -> Iterator[str]:
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=4096):
            yield from (c for c in batch.column(0).to_pylist() if c)


def _iter_instruction_texts(specs: list[SourceSpec]) -> Iterator[str]:
    for spec in specs:
        for record in read_source(spec):
            if isinstance(record, Record):
                # Placeholders are split off before tokenizing, so they are not vocabulary.
                yield from (PLACEHOLDER_RE.sub(" ", text) for text in record_texts(record))


def _copy_folder(src: str, out_dir: Path) -> None:
    if not Path(src, "tokenizer.json").exists():
        raise ValueError(
            f"tokenizer.path {src}: no tokenizer.json; give a HF fast-tokenizer folder"
        )
    shutil.copytree(src, out_dir / OUT, dirs_exist_ok=True)


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    # transformers / tokenizers here, not at import: a job's validation reads `Config` only
    from owl.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    manifest = Manifest(step=ctx.step)
    out = ctx.out_dir / OUT
    if cfg.path is not None:
        _copy_folder(resolve_path(cfg.path, inputs), ctx.out_dir)
    else:
        specs = [
            SourceSpec(s.format, resolve_path(s.path, inputs), s.image_folder) for s in cfg.texts
        ]
        for spec in specs:
            check_source(spec)
        files = _caption_files(inputs["data"], cfg.caption_column) if "data" in inputs else []
        counter = _Counter()
        texts = itertools.chain(
            _iter_captions(files, cfg.caption_column), _iter_instruction_texts(specs)
        )
        train_bpe_tokenizer(counter.wrap(texts), cfg.vocab_size, out)
        manifest.stats["num_texts"] = counter.count
    tokenizer = load_tokenizer(out)  # the folder must load the way the next steps load it
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        manifest.add_file(ctx.out_dir, path.relative_to(ctx.out_dir).as_posix())
    manifest.stats["vocab_size"] = len(tokenizer)
    manifest.info.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        source=cfg.path or "trained byte-level BPE",
    )
    return manifest


class _Counter:
    """Counts the texts that stream through it."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, texts: Iterator[str]) -> Iterator[str]:
        for text in texts:
            self.count += 1
            yield text
