"""A tiny video job end to end through the real `owl` command (issue 26, item 4): the shapes
source writes mp4 videos of a moving shape, tokenize_instructions samples their frames into image
slots, both stages train a few steps on local Ray, and the evaluate step scores the held-out
video questions (exact match) from each video's frames, and again with every frame blanked.

A plumbing test, not a learning one: a few steps teach the model nothing, so the test checks what
went where (frames per sample, visual slots, scored counts), not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from owl import IMAGE_TOKEN_ID

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

NUM_VIDEOS, NUM_EVAL_VIDEOS, NUM_FRAMES = 12, 6, 3
SCALE = {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
TRAIN = {"resources": SCALE, "trainable": "all", "batch": {"micro_batch_size": 2, "max_length": 128},
         "checkpoint": {"every": 100}, "memory": {"zero_stage": 2}, "log_every": 1}  # fmt: skip


def _job(storage: Path) -> dict:
    videos = {"format": "llava", "path": "@shapes/video_instructions.json"}
    return {
        "name": "video",
        "storage": str(storage),
        "seed": 0,
        "model": {
            "name": "debug-tiny",
            "variant": "owl2",
            "overrides": {"decoder": {"vocab_size": 300}},
        },  # fmt: skip
        "shapes": {
            "num_caption_images": 8,
            "num_instruction_images": 4,
            "num_text": 4,
            "num_eval": 2,
            "num_videos": NUM_VIDEOS,
            "num_eval_videos": NUM_EVAL_VIDEOS,
            "video_frames": 6,
        },  # fmt: skip
        "download": {
            "url_list": "@shapes/captions.parquet",
            "image_size": 32,
            "processes_count": 1,
            "thread_count": 2,
            "distributor": "multiprocessing",
        },
        "filter": {"min_side": 16},
        "tokenizer": {"vocab_size": 300, "texts": [videos]},
        "tokenize_captions": {"max_length": 128},
        "tokenize_instructions": {
            "max_length": 128,
            "num_frames": NUM_FRAMES,
            "sources": [videos],
        },  # fmt: skip
        "stage1": {**TRAIN, "schedule": {"max_steps": 1}},
        "stage2": {**TRAIN, "schedule": {"max_steps": 3}},
        "evaluate": {
            **SCALE,
            "benchmarks": ["@shapes/benchmarks/video_qa.jsonl"],
            "num_frames": NUM_FRAMES,
            "caption_meteor": False,
        },  # fmt: skip
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("video-job")
    job = root / "video.yaml"
    job.write_text(yaml.safe_dump(_job(root / "storage")))
    ray_tmp = tempfile.mkdtemp(prefix="rvideo-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "run", str(job), "--json"],
            cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp),
            capture_output=True, text=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"owl run failed:\n{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}"
    return root / "storage", json.loads(proc.stdout)


def _step_dir(storage: Path, result: dict, step: str) -> Path:
    key = next(s["key"] for s in result["steps"] if s["step"] == step)
    return storage / "steps" / step / key


def test_video_job_trains_and_scores_video_qa(run) -> None:
    from owl.data.manifest import Manifest
    from owl.data.shards import read_shard
    from owl.model import get_config

    storage, result = run
    assert result["ok"], result["error"]
    assert {s["step"]: s["state"] for s in result["steps"]} == dict.fromkeys(
        ["shapes", "download", "filter", "tokenizer", "tokenize_captions",
         "tokenize_instructions", "stage1", "stage2", "evaluate"], "done")  # fmt: skip

    # Every video conversation kept, each sample holding NUM_FRAMES frames in its image slots.
    tokenized = _step_dir(storage, result, "tokenize_instructions")
    manifest = Manifest.read(tokenized)
    assert manifest.stats["samples_out"] == NUM_VIDEOS and not manifest.dropped
    slots = get_config("debug-tiny").num_visual_tokens
    rows = [r for f in manifest.files if f.path.endswith(".arrow")
            for r in read_shard(tokenized / f.path).to_pylist()]  # fmt: skip
    assert len(rows) == NUM_VIDEOS
    for row in rows:
        assert row["kind"] == "multimodal" and len(row["images"]) == NUM_FRAMES
        assert row["input_ids"].count(IMAGE_TOKEN_ID) == NUM_FRAMES * slots
        assert all(image.startswith(b"\x89PNG") for image in row["images"])

    stage2 = Manifest.read(_step_dir(storage, result, "stage2"))
    assert stage2.stats["steps"] == 3 and len(stage2.curves["loss"]) == 3

    # The held-out video questions asked from their frames, scored by exact match, and again
    # with every frame blanked (the image-blind control).
    metrics = result["metrics"]
    assert metrics["video_qa.text.count"] == NUM_EVAL_VIDEOS
    assert 0.0 <= metrics["video_qa.text.accuracy"] <= 1.0
    assert 0.0 <= metrics["video_qa.text.blank_accuracy"] <= 1.0
    predictions = _step_dir(storage, result, "evaluate") / "predictions" / "video_qa.parquet"
    assert predictions.is_file()
