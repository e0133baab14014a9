"""Step `filter`: downloaded webdataset shards -> clean parquet shards, every removal counted.

Two Ray Data passes over the shards (one map task per shard each) around one global step:
1. per shard (`_verdict_batch`): read img2dataset's metadata parquet (typed columns, status) and
   the tar's images; apply `owl.data.filters.sample_problem` (source size, aspect ratio, caption
   bounds after URL/HTML stripping, score thresholds, language); hash the image bytes and
   url+caption; write the survivors to a work file; return one verdict row per downloaded sample
   (key, the rule that removed it or "", image sha256, url+caption digest);
2. driver: counts the verdicts per rule as they stream in, then finds the keys that repeat an
   image or a url+caption seen under a smaller key (global, so the result does not depend on
   shard boundaries or task order);
3. per shard (`_write_batch`): drop those keys, sort by key, write `shards/NNNNN.parquet`.
Output columns: key, url, caption, image, width, height, sha256, then the kept extra columns.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from owl.data.clip_score import check_clip_folder, keep_top_fraction
from owl.data.filters import FilterRules, duplicate_keys, sample_problem
from owl.data.manifest import Manifest
from owl.data.near_dup import band_slices, phash64
from pipelines.step import StepContext, StepInput
from pipelines.steps._filter_clip import clip_scores
from pipelines.steps._filter_near_dup import near_duplicate_keys

SHARDS_DIR = "shards"
# img2dataset's own metadata columns: not carried into the output.
_DOWNLOAD_COLUMNS = frozenset(
    {"key", "url", "caption", "width", "height", "original_width", "original_height", "status",
     "error_message", "exif", "md5", "sha256", "sha512"}
)  # fmt: skip
# Survivors per Ray Data block of the near-duplicate rule.
_NEAR_DUP_BLOCK = 100_000
_BASE_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("sha256", pa.string()),
]


@dataclass(frozen=True)
class Config(FilterRules):
    """The per-sample rules (`owl.data.filters.FilterRules`' fields) and the dataset-wide ones."""

    dedup_image: bool = True
    dedup_url_caption: bool = True
    # Perceptual-hash near-duplicates: max differing bits of two 64-bit pHashes; None: off.
    near_dup_radius: int | None = None
    # CLIP score: a Hugging Face CLIP folder (full CLIPModel + tokenizer + image processor);
    # "" scores nothing. Then at most one of the threshold and the kept share of the best.
    clip_model: str = ""
    min_clip_score: float | None = None
    clip_keep_fraction: float | None = None
    clip_batch_size: int = 64
    clip_actors: int = 1  # scoring actors on a cluster without GPUs (else one per GPU)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.near_dup_radius is not None:
            band_slices(self.near_dup_radius)  # raises on a radius out of range
        wants_clip = self.min_clip_score is not None or self.clip_keep_fraction is not None
        if wants_clip and not self.clip_model:
            raise ValueError("min_clip_score / clip_keep_fraction need clip_model (a CLIP folder)")
        if self.min_clip_score is not None and self.clip_keep_fraction is not None:
            raise ValueError("set min_clip_score or clip_keep_fraction, not both")
        if self.clip_keep_fraction is not None and not 0 < self.clip_keep_fraction <= 1:
            raise ValueError(f"clip_keep_fraction={self.clip_keep_fraction}: must be in (0, 1]")
        if self.clip_batch_size < 1 or self.clip_actors < 1:
            raise ValueError("clip_batch_size and clip_actors must be >= 1")


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


# phash: the image's 64-bit perceptual hash, only when the near-duplicate rule is on.
_VERDICT_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("image", pa.string()), ("pair", pa.string()),
     ("phash", pa.uint64())]
)  # fmt: skip


_SURVIVOR_SCHEMA = pa.schema(
    [("key", pa.string()), ("image", pa.string()), ("pair", pa.string()), ("phash", pa.uint64()),
     ("shard", pa.string())]
)  # fmt: skip


def _apply_rules(tar: Path, rules: Config, work_file: Path) -> pa.Table:
    """Per-sample rules on one shard; survivors go to `work_file`. One verdict row per sample
    img2dataset downloaded (`_VERDICT_SCHEMA`; reason "" and the digests for a survivor)."""
    meta = pq.read_table(tar.with_suffix(".parquet"))
    schema = _output_schema(meta.schema)
    images = _tar_images(tar)
    rows, verdicts = [], {name: [] for name in _VERDICT_SCHEMA.names}
    for row in meta.to_pylist():
        if row["status"] != "success":
            continue  # counted by the download step
        caption, reason = sample_problem(row, row["original_width"], row["original_height"], rules)
        image_digest = pair = phash = None
        if reason is None:
            image = images[row["key"]]
            image_digest = hashlib.sha256(image).hexdigest()
            out = {name: row.get(name) for name in schema.names}
            out.update(caption=caption, image=image, sha256=image_digest)
            rows.append(out)
            pair = hashlib.sha256(f"{row['url']}\0{caption}".encode()).hexdigest()[:32]
            phash = phash64(image) if rules.near_dup_radius is not None else None
        for name, value in zip(
            _VERDICT_SCHEMA.names, (row["key"], reason or "", image_digest, pair, phash)
        ):
            verdicts[name].append(value)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), work_file)
    return pa.table(verdicts, schema=_VERDICT_SCHEMA)


def _verdict_batch(shards: pa.Table, *, rules: Config) -> pa.Table:
    """Ray Data map_batches function: (tar, work_file) rows -> the verdicts of their samples,
    each with the shard it came from (the tar's stem)."""
    tables = []
    for tar, work_file in zip(shards["tar"].to_pylist(), shards["work_file"].to_pylist()):
        verdicts = _apply_rules(Path(tar), rules, Path(work_file))
        tables.append(
            verdicts.append_column("shard", pa.array([Path(tar).stem] * len(verdicts), pa.string()))
        )
    return pa.concat_tables(tables)


def _write_shard(
    work_file: Path, drop: set[str], out_file: Path, scores: dict[str, float] | None
) -> int:
    """The shard's survivors less `drop`, sorted by key, with their CLIP scores when scored."""
    table = pq.read_table(work_file)
    keys = table.column("key").to_pylist()
    table = table.filter(pa.array([k not in drop for k in keys], pa.bool_()))
    table = table.sort_by("key")
    if scores is not None:
        column = [scores[k] for k in table.column("key").to_pylist()]
        table = table.append_column("clip_score", pa.array(column, pa.float32()))
    pq.write_table(table, out_file, row_group_size=1024)
    return table.num_rows


def _write_batch(shards: pa.Table) -> pa.Table:
    """Ray Data map_batches function: (work_file, drop, out_file, score_keys, scores) rows ->
    (out_file, rows). `scores` is null when the CLIP rule is off."""
    names = ("work_file", "drop", "out_file", "score_keys", "scores")
    rows = [
        _write_shard(Path(w), set(d), Path(o), None if v is None else dict(zip(k, v)))
        for w, d, o, k, v in zip(*(shards.column(c).to_pylist() for c in names))
    ]
    return pa.table({"out_file": shards.column("out_file"), "rows": pa.array(rows, pa.int64())})


def _without(table: pa.Table, drop: set[str]) -> pa.Table:
    keys = table.column("key").to_pylist()
    return table.filter(pa.array([k not in drop for k in keys], pa.bool_()))


def _duplicates(digests: pa.Table, cfg: Config) -> tuple[set[str], Counter]:
    """Keys to drop as duplicates (image first, then url+caption among the rest, then perceptual
    near-duplicates among the rest), and counts."""
    dropped: Counter = Counter()
    drop: set[str] = set()
    if cfg.dedup_image:
        drop = duplicate_keys(digests, "image")
        dropped["filter.duplicate_image"] = len(drop)
    if cfg.dedup_url_caption:
        pairs = duplicate_keys(_without(digests, drop), "pair")
        dropped["filter.duplicate_url_caption"] = len(pairs)
        drop |= pairs
    if cfg.near_dup_radius is not None:
        rest = _without(digests, drop).select(["key", "phash"])
        blocks = [rest.slice(i, _NEAR_DUP_BLOCK) for i in range(0, rest.num_rows, _NEAR_DUP_BLOCK)]
        near = near_duplicate_keys(blocks, cfg.near_dup_radius)
        dropped["filter.near_duplicate_image"] = len(near)
        drop |= near
    return drop, +dropped


def _clip_rule(shards: list[dict], cfg: Config) -> tuple[dict[str, float], set[str]]:
    """CLIP scores of the samples that passed every other rule ({work_file, drop} per shard),
    and the keys the threshold or the kept share removes."""
    folder = str(Path(cfg.clip_model).expanduser())
    scores = clip_scores(shards, folder, cfg.clip_batch_size, cfg.clip_actors)
    keys = sorted(scores)
    if cfg.min_clip_score is not None:
        return scores, {k for k in keys if scores[k] < cfg.min_clip_score}
    if cfg.clip_keep_fraction is not None:
        values = np.array([scores[k] for k in keys], np.float32)
        return scores, keep_top_fraction(keys, values, cfg.clip_keep_fraction)
    return scores, set()


def _verdicts(tars: list[Path], work: Path, rules: Config) -> tuple[Counter, pa.Table]:
    """Stage 1 on Ray Data: drops per rule, and (key, image, pair, shard) of every survivor."""
    import ray.data  # here, not at import: validating a job or a cached run needs only `Config`

    items = [{"tar": str(t), "work_file": str(work / f"{t.stem}.parquet")} for t in tars]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _verdict_batch, fn_kwargs={"rules": rules}, batch_size=1, batch_format="pyarrow",
        num_cpus=1,
    )  # fmt: skip
    dropped: Counter = Counter()
    survivors = []
    for verdicts in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        reasons = verdicts.column("reason")
        for item in pc.value_counts(reasons).to_pylist():
            if item["values"]:
                dropped[f"filter.{item['values']}"] += item["counts"]
        kept = verdicts.filter(pc.equal(reasons, ""))
        survivors.append(kept.select(_SURVIVOR_SCHEMA.names))
    return dropped, pa.concat_tables([_SURVIVOR_SCHEMA.empty_table(), *survivors])


def _shard_items(tars: list[Path], work: Path, survivors: pa.Table, drop: set[str]) -> list[dict]:
    """Per shard, its work file and the keys of it in `drop`."""
    drops: dict[str, list[str]] = {t.stem: [] for t in tars}
    for key, shard in zip(survivors["key"].to_pylist(), survivors["shard"].to_pylist()):
        if key in drop:
            drops[shard].append(key)
    return [{"work_file": str(work / f"{t.stem}.parquet"), "drop": drops[t.stem]} for t in tars]


def _write_outputs(
    tars: list[Path],
    work: Path,
    shards_dir: Path,
    survivors: pa.Table,
    drop: set[str],
    scores: dict[str, float] | None,
) -> dict[str, int]:
    """Stage 3 on Ray Data: each shard's survivors less `drop`, sorted; out file -> rows."""
    import ray.data

    items = _shard_items(tars, work, survivors, drop)
    scored: dict[str, list[str]] = {t.stem: [] for t in tars}
    for key, shard in zip(survivors["key"].to_pylist(), survivors["shard"].to_pylist()):
        if scores is not None and key in scores and key not in drop:
            scored[shard].append(key)
    for item, tar in zip(items, tars):
        item["out_file"] = str(shards_dir / f"{tar.stem}.parquet")
        item["score_keys"] = scored[tar.stem]
        item["scores"] = None if scores is None else [scores[k] for k in scored[tar.stem]]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _write_batch, batch_size=1, batch_format="pyarrow", num_cpus=1
    )
    rows = {}
    for written in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows.update(zip(written.column("out_file").to_pylist(), written.column("rows").to_pylist()))
    return rows


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    if "data" not in inputs:
        raise ValueError(f"the filter step needs the role 'data' (download), got {sorted(inputs)}")
    data = inputs["data"]
    tars = sorted(data.dir / f.path for f in data.manifest.files if f.path.endswith(".tar"))
    work, shards_dir = ctx.out_dir / "_work", ctx.out_dir / SHARDS_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards_dir.mkdir(parents=True, exist_ok=True)
    ctx.progress(0, len(tars), "filtering shards")

    dropped: Counter = Counter()
    rows: dict[str, int] = {}
    scores: dict[str, float] | None = None
    if cfg.clip_model:
        check_clip_folder(cfg.clip_model, "filter.clip_model")
    if tars:
        dropped, survivors = _verdicts(tars, work, cfg)
        drop, dup_counts = _duplicates(survivors, cfg)
        dropped.update(dup_counts)
        if cfg.clip_model:
            ctx.progress(0, len(tars), "CLIP-scoring the kept samples")
            scores, low = _clip_rule(_shard_items(tars, work, survivors, drop), cfg)
            dropped["filter.clip_score"] = len(low)
            drop |= low
        rows = _write_outputs(tars, work, shards_dir, survivors, drop, scores)
    shutil.rmtree(work)

    manifest = Manifest(step=ctx.step)
    out_files = [shards_dir / f"{t.stem}.parquet" for t in tars]
    for out in out_files:
        manifest.add_file(ctx.out_dir, f"{SHARDS_DIR}/{out.name}", rows=rows[str(out)])
    num_in = sum(f.rows or 0 for f in data.manifest.files if f.path.endswith(".tar"))
    num_out = sum(rows.values())
    manifest.dropped = dict(sorted(dropped.items()))
    manifest.stats = {"num_in": float(num_in), "num_out": float(num_out),
                      "keep_rate": num_out / num_in if num_in else 0.0}  # fmt: skip
    manifest.info = {"rules": asdict(cfg)}
    ctx.progress(len(tars), len(tars), f"kept {num_out} of {num_in}")
    return manifest
