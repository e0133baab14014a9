"""Step `download`: a caption URL list -> webdataset tar shards, with img2dataset.

Stages: check the URL list's structure (before any work) -> normalise it to parquet (url, caption,
kept extra columns) -> img2dataset's reader, downloader and webdataset writer, run by its
multiprocessing distributor locally or as Ray tasks on a cluster -> aggregate the per-shard
`*_stats.json` into the manifest, every failure counted under a `download.<reason>` key.

We assemble img2dataset's parts instead of calling `img2dataset.download()` for one reason: its
resizer reports a truncated JPEG, a decompression bomb, a 0-byte file and HTML bytes all as
"Image decoding error". `CheckedResizer` (`_img2dataset.py`) names them first (header only, no
pixel decoding) and then hands the bytes to img2dataset's own resizer. Its wandb logger process is
not started.

Resume: the step is resumable (its folder is kept between attempts and re-runs of the same key).
A shard is finished when its `*_stats.json` (img2dataset writes it last) parses; a re-run hands
the finished shard ids to img2dataset's reader as `done_shards` (its incremental mode) and fetches
only the others, the finished shards' stats (their failure counts) staying as they are. A shard
cut off half-way (a .tar / .parquet without stats) is written again from its start. If the
normalised URL list differs from the one the finished shards came from, the step starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow.parquet as pq

from owl.configs import INPUT_PATH
from owl.data.filters import download_reason
from owl.data.manifest import Manifest
from owl.data.url_lists import PRESETS, UrlListSpec, check_url_list, read_url_list
from pipelines.step import StepContext, StepInput, resolve_path
from pipelines.steps._img2dataset_env import WORKER_ENV, set_worker_env

if TYPE_CHECKING:
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader

# img2dataset (albumentations: seconds to import) is imported where the step computes, after
# these are set: no update check over the network, no wandb. Validating a job file or a fully
# cached `owl run` reads `Config` only.
set_worker_env()

SHARDS_DIR = "shards"
RESUME_FILE = "_resume.json"  # the URL list the shards under shards/ come from
OOM_SHARD_COUNT = 5  # shard names have 5 digits: shards/00000.tar


@dataclass
class Config:
    url_list: str = field(default="@shapes/captions.parquet", metadata=INPUT_PATH)  # file/folder
    # "laion", "coyo" or "cc3m": format and column defaults of that dataset
    preset: Literal["", "laion", "coyo", "cc3m"] = ""
    # "" = the preset's, or parquet
    input_format: Literal["", "parquet", "csv", "tsv", "json", "jsonl"] = ""
    url_col: str = ""  # "" = the preset's or "url"
    caption_col: str = ""  # "" = the preset's or "caption"
    # Extra columns kept with each sample (scores...); None = the preset's, or every other column.
    save_additional_columns: list[str] | None = None
    column_names: list[str] | None = None  # for csv/tsv without a header line
    image_size: int = 32
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = (
        "border"
    )
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float | None = None
    max_image_pixels: int = 89_478_485  # declared size above this = decompression bomb (PIL's)
    timeout: float = 10.0  # seconds for the whole fetch of one URL (and for each socket read)
    retries: int = 0
    processes_count: int = 1
    thread_count: int = 32
    number_sample_per_shard: int = 10_000
    distributor: Literal["auto", "multiprocessing", "ray"] = (
        "auto"  # auto: ray on a multi-node cluster
    )
    env: dict[str, str] = field(default_factory=dict)  # extra env vars for download processes


def url_list_spec(cfg: Config) -> UrlListSpec:
    if cfg.preset and cfg.preset not in PRESETS:
        raise ValueError(f"download.preset={cfg.preset!r}: expected one of {sorted(PRESETS)} or ''")
    base = PRESETS.get(cfg.preset, UrlListSpec())
    extras = cfg.save_additional_columns
    names = cfg.column_names
    return UrlListSpec(
        input_format=cfg.input_format or base.input_format,
        url_col=cfg.url_col or base.url_col,
        caption_col=cfg.caption_col or base.caption_col,
        extra_cols=tuple(extras) if extras is not None else base.extra_cols,
        column_names=tuple(names) if names is not None else base.column_names,
    )


def _normalise_url_list(path: str, spec: UrlListSpec, work: Path) -> tuple[list[str], int, int]:
    """Write the URL list as work/urls/NNNNN.parquet; (kept extra columns, rows, missing URLs)."""
    kept_by_file = check_url_list(path, spec)  # structural errors stop here, before any work
    extras_seen = {tuple(cols) for cols in kept_by_file.values()}
    if len(extras_seen) > 1:
        raise ValueError(
            f"{path}: files keep different extra columns {sorted(extras_seen)}; "
            "set save_additional_columns to the columns every file has"
        )
    (work / "urls").mkdir(parents=True)
    num_rows = num_missing = 0
    extras: list[str] = []
    for i, (_, table, missing) in enumerate(read_url_list(path, spec)):
        pq.write_table(table, work / "urls" / f"{i:05d}.parquet")
        extras = table.column_names[2:]
        num_rows += table.num_rows
        num_missing += missing
    return extras, num_rows, num_missing


def _build_downloader(cfg: Config, reader: Reader, shards_dir: Path) -> Downloader:
    from img2dataset.writer import WebDatasetSampleWriter

    from pipelines.steps._img2dataset import CheckedResizer, DeadlineDownloader

    resizer = CheckedResizer(
        cfg.max_image_pixels,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio or float("inf"),
    )
    return DeadlineDownloader(  # `timeout`: the whole fetch of one URL, not one socket read
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=cfg.thread_count,
        save_caption=True,
        extract_exif=False,
        output_folder=str(shards_dir),
        column_list=reader.column_list,
        timeout=cfg.timeout,
        number_sample_per_shard=cfg.number_sample_per_shard,
        oom_shard_count=OOM_SHARD_COUNT,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=None,
        disallowed_header_directives=None,
    )


def _download_shard(downloader: Downloader, shard: tuple[int, str]) -> tuple[bool, Any]:
    return downloader(shard)


def _ray_distributor(downloader: Downloader, reader: Reader, env: dict[str, str]) -> None:
    """One Ray task per shard; failed shards are retried once (as img2dataset's local one does)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=1, runtime_env={"env_vars": env})(_download_shard)
    downloader_ref = ray.put(downloader)
    shards = list(reader)
    for _ in range(2):
        results = ray.get([task.remote(downloader_ref, shard) for shard in shards])
        shards = [row for ok, row in results if not ok]
        if not shards:
            return


def _pick_distributor(name: str) -> str:
    if name not in ("auto", "multiprocessing", "ray"):
        raise ValueError(f"download.distributor={name!r}: expected auto, multiprocessing or ray")
    if name != "auto":
        return name
    import ray

    return "ray" if ray.is_initialized() and len(ray.nodes()) > 1 else "multiprocessing"


def _aggregate_stats(shards_dir: Path, num_shards: int) -> tuple[dict[str, int], Counter, list]:
    """(totals, dropped by reason, raw messages) over the per-shard stats files."""
    stats_files = sorted(shards_dir.glob("*_stats.json"))
    if len(stats_files) != num_shards:
        raise RuntimeError(
            f"{shards_dir}: {len(stats_files)} of {num_shards} shards finished; see the log for the "
            "failing shard, fix the cause and run the step again"
        )
    totals: Counter = Counter()
    dropped: Counter = Counter()
    messages: Counter = Counter()
    for path in stats_files:
        stats = json.loads(path.read_text())
        totals.update(
            {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")}
        )
        totals["duration_max"] = max(totals["duration_max"], stats["duration"])
        for message, count in stats["status_dict"].items():
            reason = download_reason(message)
            if reason != "success":
                dropped[reason] += count
                messages[message] += count
    return dict(totals), dropped, messages.most_common(20)


def _urls_digest(urls_dir: Path, cfg: Config) -> str:
    """sha256 over the normalised URL list and the settings that decide what a shard holds."""
    digest = hashlib.sha256(str(cfg.number_sample_per_shard).encode())
    for path in sorted(urls_dir.glob("*.parquet")):
        table = pq.read_table(path)
        for name in table.column_names:
            digest.update(name.encode())
            for chunk in table.column(name).chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        digest.update(buf)
    return digest.hexdigest()


def _finished_shards(out_dir: Path, shards_dir: Path, urls_digest: str) -> set[int]:
    """Ids of the shards a killed earlier attempt finished; clears the folder if they came from
    another URL list. A stats file cut off while being written does not count."""
    resume = out_dir / RESUME_FILE
    previous = json.loads(resume.read_text()).get("urls") if resume.exists() else None
    if previous != urls_digest:
        shutil.rmtree(shards_dir, ignore_errors=True)
        resume.write_text(json.dumps({"urls": urls_digest}))
        return set()
    done = set()
    for path in shards_dir.glob("*_stats.json"):
        try:
            json.loads(path.read_text())["status_dict"]
        except (ValueError, KeyError):
            path.unlink()
            continue
        done.add(int(path.name.split("_")[0]))
    return done


def _manifest(ctx: StepContext, shards_dir: Path) -> Manifest:
    manifest = Manifest(step=ctx.step)
    for tar in sorted(shards_dir.glob("*.tar")):
        meta = tar.with_suffix(".parquet")
        status = pq.read_table(meta, columns=["status"]).column("status").to_pylist()
        manifest.add_file(ctx.out_dir, f"{SHARDS_DIR}/{tar.name}", rows=status.count("success"))
        # One row per URL tried, failures included: the shard's images are counted on the tar.
        manifest.add_file(ctx.out_dir, f"{SHARDS_DIR}/{meta.name}")
        manifest.add_file(ctx.out_dir, f"{SHARDS_DIR}/{tar.stem}_stats.json")
    return manifest


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    spec = url_list_spec(cfg)
    url_list = resolve_path(cfg.url_list, inputs)
    distributor = _pick_distributor(cfg.distributor)
    work, shards_dir = ctx.out_dir / "_work", ctx.out_dir / SHARDS_DIR
    shutil.rmtree(work, ignore_errors=True)
    extras, num_rows, num_missing = _normalise_url_list(url_list, spec, work)
    done = _finished_shards(ctx.out_dir, shards_dir, _urls_digest(work / "urls", cfg))
    shards_dir.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir()
    env = {**WORKER_ENV, **cfg.env}
    os.environ.update(env)  # inherited by the spawned download processes
    from img2dataset.distributor import multiprocessing_distributor
    from img2dataset.reader import Reader

    reader = Reader(str(work / "urls"), "parquet", "url", "caption", None, None, extras or None,
                    cfg.number_sample_per_shard, done, str(work / "tmp"))  # fmt: skip
    downloader = _build_downloader(cfg, reader, shards_dir)
    num_shards = math.ceil(num_rows / cfg.number_sample_per_shard) if num_rows else 0
    resumed = f", {len(done)} shards already done" if done else ""
    ctx.progress(len(done), num_shards, f"downloading {num_rows} urls with {distributor}{resumed}")
    if distributor == "ray":
        _ray_distributor(downloader, reader, env)
    elif num_shards > len(done):
        multiprocessing_distributor(cfg.processes_count, downloader, reader, None, 1)
    totals, dropped, messages = _aggregate_stats(shards_dir, num_shards)
    shutil.rmtree(work)

    manifest = _manifest(ctx, shards_dir)
    if num_missing:
        dropped["download.missing_url"] = num_missing
    manifest.dropped = dict(sorted(dropped.items()))
    count, successes = totals.get("count", 0), totals.get("successes", 0)
    manifest.stats = {
        "num_urls": float(num_rows + num_missing),
        "num_images": float(successes),
        "success_rate": successes / count if count else 0.0,
        "num_shards": float(num_shards),
        "failed_to_download": float(totals.get("failed_to_download", 0)),
        "failed_to_resize": float(totals.get("failed_to_resize", 0)),
    }
    manifest.info = {"extra_columns": extras, "distributor": distributor,
                     "top_errors": [[m, n] for m, n in messages], "url_list": url_list,
                     "resumed_shards": len(done)}  # fmt: skip
    ctx.progress(num_shards, num_shards, f"{successes}/{count} images")
    return manifest
