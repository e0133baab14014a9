"""Step `filter`: downloaded webdataset shards -> clean parquet shards, every removal counted.

Stages, one Ray task per shard for the per-sample rules, then one global pass for duplicates:
1. per shard: read img2dataset's metadata parquet (typed columns, status) and the tar's images;
   apply `owl.data.filters.sample_problem` (source size, aspect ratio, caption bounds after URL/HTML
   stripping, score thresholds, language); hash the image bytes and url+caption; write the
   survivors to a work file and return (key, image sha256, url+caption digest);
2. driver: the keys that repeat an image or a url+caption seen under a smaller key (global, so
   the result does not depend on shard boundaries or task order);
3. per shard: drop those keys, sort by key, write `shards/NNNNN.parquet`.
Output columns: key, url, caption, image, width, height, sha256, then the kept extra columns.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from owl.data.filters import FilterRules, duplicate_keys, sample_problem
from owl.data.manifest import Manifest
from pipelines.step import StepContext, StepInput

SHARDS_DIR = "shards"
# img2dataset's own metadata columns: not carried into the output.
_DOWNLOAD_COLUMNS = frozenset(
    {"key", "url", "caption", "width", "height", "original_width", "original_height", "status",
     "error_message", "exif", "md5", "sha256", "sha512"}
)  # fmt: skip
_BASE_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("sha256", pa.string()),
]


@dataclass
class Config:
    min_side: int = 0
    max_aspect_ratio: float | None = None
    min_caption_words: int = 1
    max_caption_words: int = 256
    min_caption_chars: int = 1
    max_caption_chars: int = 2048
    strip_urls: bool = True
    strip_html: bool = True
    min_similarity: float | None = None
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    similarity_col: str = "similarity"
    punsafe_col: str = "punsafe"
    pwatermark_col: str = "pwatermark"
    min_ascii_ratio: float | None = None  # language rule; None = off
    dedup_image: bool = True
    dedup_url_caption: bool = True

    def rules(self) -> FilterRules:
        fields = asdict(self)
        fields.pop("dedup_image"), fields.pop("dedup_url_caption")
        fields["max_aspect_ratio"] = fields["max_aspect_ratio"] or float("inf")
        return FilterRules(**fields)


def _tar_images(path: Path) -> dict[str, bytes]:
    """key -> image bytes of a webdataset tar written by img2dataset."""
    images = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            if ext in ("jpg", "jpeg", "png", "webp"):
                images[key] = tar.extractfile(member).read()
    return images


def _output_schema(meta_schema: pa.Schema) -> pa.Schema:
    extras = [f for f in meta_schema if f.name not in _DOWNLOAD_COLUMNS]
    return pa.schema(_BASE_FIELDS + extras)


def _apply_rules(tar: Path, rules: FilterRules, work_file: Path) -> tuple[Counter, pa.Table]:
    """Per-sample rules on one shard; survivors go to `work_file`. (drops, digest table)."""
    meta = pq.read_table(tar.with_suffix(".parquet"))
    schema = _output_schema(meta.schema)
    images = _tar_images(tar)
    dropped: Counter = Counter()
    rows, digests = [], {"key": [], "image": [], "pair": []}
    for row in meta.to_pylist():
        if row["status"] != "success":
            continue  # counted by the download step
        caption, reason = sample_problem(row, row["original_width"], row["original_height"], rules)
        if reason is not None:
            dropped[f"filter.{reason}"] += 1
            continue
        image = images[row["key"]]
        out = {name: row.get(name) for name in schema.names}
        out.update(caption=caption, image=image, sha256=hashlib.sha256(image).hexdigest())
        rows.append(out)
        pair = hashlib.sha256(f"{row['url']}\0{caption}".encode()).hexdigest()[:32]
        for name, value in (("key", row["key"]), ("image", out["sha256"]), ("pair", pair)):
            digests[name].append(value)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), work_file)
    return dropped, pa.table(digests, schema=pa.schema([(n, pa.string()) for n in digests]))


def _write_shard(work_file: Path, drop: set[str], out_file: Path) -> int:
    table = pq.read_table(work_file)
    keys = table.column("key").to_pylist()
    table = table.filter(pa.array([k not in drop for k in keys], pa.bool_()))
    table = table.sort_by("key")
    pq.write_table(table, out_file, row_group_size=1024)
    return table.num_rows


def _duplicates(digests: pa.Table, cfg: Config) -> tuple[set[str], Counter]:
    """Keys to drop as duplicates (image first, then url+caption among the rest), and counts."""
    dropped: Counter = Counter()
    drop: set[str] = set()
    if cfg.dedup_image:
        drop = duplicate_keys(digests, "image")
        dropped["filter.duplicate_image"] = len(drop)
    if cfg.dedup_url_caption:
        rest = digests.filter(pa.array([k not in drop for k in digests.column("key").to_pylist()]))
        pairs = duplicate_keys(rest, "pair")
        dropped["filter.duplicate_url_caption"] = len(pairs)
        drop |= pairs
    return drop, +dropped


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    if "data" not in inputs:
        raise ValueError(f"the filter step needs the role 'data' (download), got {sorted(inputs)}")
    import ray  # here, not at import: validating a job or a cached run needs only `Config`

    apply_rules_task = ray.remote(num_cpus=1)(_apply_rules)
    write_shard_task = ray.remote(num_cpus=1)(_write_shard)
    rules = cfg.rules()
    data = inputs["data"]
    tars = sorted(data.dir / f.path for f in data.manifest.files if f.path.endswith(".tar"))
    work, shards_dir = ctx.out_dir / "_work", ctx.out_dir / SHARDS_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards_dir.mkdir(parents=True, exist_ok=True)
    ctx.progress(0, len(tars), "filtering shards")

    refs = [apply_rules_task.remote(t, rules, work / f"{t.stem}.parquet") for t in tars]
    results = ray.get(refs)
    dropped: Counter = sum((r[0] for r in results), Counter())
    digest_tables = [r[1] for r in results]
    drop: set[str] = set()
    if digest_tables:
        drop, dup_counts = _duplicates(pa.concat_tables(digest_tables), cfg)
        dropped.update(dup_counts)

    out_files = [shards_dir / f"{t.stem}.parquet" for t in tars]
    refs = []
    for tar, out, table in zip(tars, out_files, digest_tables):
        shard_drop = {k for k in table.column("key").to_pylist() if k in drop}
        refs.append(write_shard_task.remote(work / f"{tar.stem}.parquet", shard_drop, out))
    rows = ray.get(refs)
    shutil.rmtree(work)

    manifest = Manifest(step=ctx.step)
    for out, n in zip(out_files, rows):
        manifest.add_file(ctx.out_dir, f"{SHARDS_DIR}/{out.name}", rows=n)
    num_in = sum(f.rows or 0 for f in data.manifest.files if f.path.endswith(".tar"))
    manifest.dropped = dict(sorted(dropped.items()))
    manifest.stats = {"num_in": float(num_in), "num_out": float(sum(rows)),
                      "keep_rate": sum(rows) / num_in if num_in else 0.0}  # fmt: skip
    manifest.info = {"rules": asdict(cfg)}
    ctx.progress(len(tars), len(tars), f"kept {sum(rows)} of {num_in}")
    return manifest
