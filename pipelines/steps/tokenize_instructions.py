"""Step `tokenize_instructions`: instruction files (LLaVA / mPLUG-Owl2 JSON, Alpaca, ShareGPT) ->
stage-2 tokenized Arrow shards with the model variant's conversation template.

The driver reads the sources (text only; unusable records are counted by reason), Ray Data tasks
read each sample's image files and encode it (a missing image is counted, not fatal), and the
driver streams the results in source order into `shards/shard-NNNNN.arrow`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from owl.data.manifest import Manifest
from owl.data.sources import Bad, Record, SourceSpec, check_source, read_source
from owl.data.templates import DropSample, Turn
from owl.data.tokenize import Encoded, encode_conversations
from pipelines.step import StepContext, StepInput, resolve_path
from pipelines.steps.tokenize_captions import (
    cached_tokenizer,
    max_length_of,
    results_batch,
    tokenizer_dir,
    write_tokenized,
)


@dataclass
class Config:
    # Instruction files: {format: llava|alpaca|sharegpt, path, image_folder}; paths may be `@shapes/...`.
    sources: list[SourceSpec] = field(default_factory=list)
    # Longest sample in tokens (visual slots included); None: the model's max_positions.
    max_length: int | None = None
    # Replaces the variant's default system prompt ("" removes it); None keeps the default.
    system: str | None = None
    rows_per_shard: int = 10_000
    batch_size: int = 128
    num_blocks: int = 8  # how many pieces the sample list is cut into for the tasks


def _read_image(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    if "://" not in path:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    filesystem, inner = pafs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type != pafs.FileType.File:
        return None
    with filesystem.open_input_file(inner) as f:
        return f.read()


def encode_conversation_batch(
    batch: pa.Table,
    *,
    tokenizer_dir: str,
    variant: str,
    num_visual_tokens: int,
    max_length: int,
    system: str | None,
) -> pa.Table:
    """Ray Data map_batches function: reads a batch's images, encodes its conversations."""
    rows = batch.to_pylist()
    image_paths = [json.loads(row["images"]) for row in rows]
    images = [[_read_image(p) for p in paths] for paths in image_paths]
    samples = [
        ([Turn(role, text) for role, text in json.loads(row["turns"])], len(paths))
        for row, paths in zip(rows, image_paths)
    ]
    results: list[Encoded | DropSample] = encode_conversations(
        cached_tokenizer(tokenizer_dir),
        samples,
        variant=variant,
        num_visual_tokens=num_visual_tokens,
        max_length=max_length,
        system=system,
    )
    for i, imgs in enumerate(images):
        if any(img is None for img in imgs) and isinstance(results[i], Encoded):
            results[i] = DropSample("missing_image")
    counts = [r.num_images if isinstance(r, Encoded) else 0 for r in results]
    values = [img for imgs, n in zip(images, counts) for img in imgs[:n]]
    table = results_batch(
        results,
        [row["sample_id"] for row in rows],
        "text",
        (counts, pa.array(values, pa.binary())),
        [row["source"] for row in rows],
    )
    kinds = ["multimodal" if paths else "text" for paths in image_paths]
    return table.set_column(1, "kind", pa.array(kinds, pa.string()))


def _records(specs: list[SourceSpec], dropped: Counter) -> list[dict[str, Any]]:
    """Every usable sample of every source as a small text-only row; Bad ones counted."""
    rows = []
    for spec in specs:
        for record in read_source(spec):
            if isinstance(record, Bad):
                dropped[record.reason] += 1
                continue
            assert isinstance(record, Record)
            rows.append(
                {
                    "sample_id": record.sample_id,
                    "turns": json.dumps([[t.role, t.text] for t in record.turns]),
                    "images": json.dumps(record.images),
                    "source": record.source,
                }
            )
    return rows


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    if not cfg.sources:
        raise ValueError("tokenize_instructions.sources: empty; list at least one instruction file")
    specs = [
        SourceSpec(
            s.format,
            resolve_path(s.path, inputs),
            resolve_path(s.image_folder, inputs) if s.image_folder else None,
        )
        for s in cfg.sources
    ]
    for spec in specs:
        check_source(spec)
    tok_dir = tokenizer_dir(inputs)
    max_length = max_length_of(cfg.max_length, ctx)
    dropped: Counter = Counter()
    rows = _records(specs, dropped)
    num_in = len(rows) + sum(dropped.values())
    if not rows:
        return write_tokenized(None, ctx, cfg.rows_per_shard, num_in, dropped)
    ds = ray.data.from_items(rows, override_num_blocks=min(cfg.num_blocks, len(rows)))
    ds = ds.map_batches(
        encode_conversation_batch,
        fn_kwargs=dict(
            tokenizer_dir=tok_dir,
            variant=ctx.model.variant,
            num_visual_tokens=ctx.model.num_visual_tokens,
            max_length=max_length,
            system=cfg.system,
        ),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=ctx.resources.cpus_per_worker,
    )
    return write_tokenized(ds, ctx, cfg.rows_per_shard, num_in, dropped)
