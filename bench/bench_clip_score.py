"""Benchmark: the filter step's CLIP-score stage vs raw transformers CLIP inference, same batches.

Prints samples/s of both and their ratio (target >= 0.8x). Both score the same shards (parquet
files as the filter step's work files hold them: key, image PNG bytes, caption) with the same
CLIPModel in batches of `--batch-size` taken in key order, captions padded to the model's context,
on one CPU thread each:
- raw: in this process, `CLIPImageProcessor` + `CLIPTokenizer` + `CLIPModel(...)` per batch, the
  model loaded once before the clock starts;
- step: `pipelines.steps._filter_clip.clip_scores` on a fresh 1-CPU local Ray: one Ray Data
  actor (torch on 1 thread, as Ray sets it) that loads the model, reads the shards and scores
  them; its time includes the actor's start and the model load (what the step pays), not
  `ray.init` (the runner connects before a step starts).
The two alternate (raw, step, raw, step, ...) so both see the same load; scores are checked
equal (<= 1e-4). The model has random weights with ViT-B/32's geometry (224 px, patch 32,
width 768 / text 512) and `--layers` layers per tower.

    .venv/bin/python bench/bench_clip_score.py --samples 256 --layers 6 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def save_model(folder: Path, layers: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + symbols + [s + "</w>" for s in symbols])}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # 224 px, CLIP's mean/std
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 512, "intermediate_size": 2048,
                     "num_hidden_layers": layers, "num_attention_heads": 8,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": 224, "patch_size": 32, "hidden_size": 768,
                       "intermediate_size": 3072, "num_hidden_layers": layers,
                       "num_attention_heads": 12},
        projection_dim=512,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)


def write_shards(folder: Path, num_samples: int, per_shard: int) -> list[Path]:
    rng = np.random.default_rng(0)
    words = [
        "a",
        "the",
        "red",
        "blue",
        "green",
        "cat",
        "dog",
        "photo",
        "of",
        "small",
        "large",
        "sky",
        "tree",
        "car",
        "on",
        "in",
    ]
    paths = []
    for start in range(0, num_samples, per_shard):
        rows = []
        for i in range(start, min(start + per_shard, num_samples)):
            side = int(rng.integers(160, 400))
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).resize((side, side)).save(buf, format="PNG")
            rows.append({"key": f"{i:09d}", "image": buf.getvalue(),
                         "caption": " ".join(rng.choice(words, 8))})  # fmt: skip
        paths.append(folder / f"{start // per_shard:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), paths[-1])
    return paths


class Raw:
    """Plain transformers: processor, tokenizer and model called per batch."""

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.processor = CLIPImageProcessor.from_pretrained(folder)

    def run(self, shards: list[Path], batch_size: int) -> dict[str, float]:
        import torch

        scores: dict[str, float] = {}
        for path in shards:
            table = pq.read_table(path).sort_by("key")
            for start in range(0, table.num_rows, batch_size):
                batch = table.slice(start, batch_size).to_pydict()
                images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch["image"]]
                with torch.inference_mode():
                    pixels = self.processor(images=images, return_tensors="pt").pixel_values
                    text = self.tokenizer(
                        batch["caption"], padding="max_length", truncation=True,
                        max_length=self.model.config.text_config.max_position_embeddings,
                        return_tensors="pt",
                    )  # fmt: skip
                    out = self.model(pixel_values=pixels, **text)
                cos = (out.image_embeds * out.text_embeds).sum(-1)
                scores.update(zip(batch["key"], cos.tolist()))
        return scores


def run_step(
    shards: list[Path], folder: Path, batch_size: int, temp_dir: str
) -> tuple[dict[str, float], float]:
    """(scores, seconds of the stage alone: Ray is up before the clock starts, as the runner
    connects before a step runs)."""
    import ray

    from pipelines.steps._filter_clip import clip_scores

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        items = [{"work_file": str(p), "drop": []} for p in shards]
        start = time.perf_counter()
        scores = clip_scores(items, str(folder), batch_size, num_actors=1)
        return scores, time.perf_counter() - start
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    with tempfile.TemporaryDirectory(prefix="owl-bench-clip") as tmp:
        root = Path(tmp)
        save_model(root / "clip", args.layers)
        (root / "shards").mkdir()
        shards = write_shards(root / "shards", args.samples, args.per_shard)
        raw = Raw(root / "clip")
        raw_times, step_times = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            expected = raw.run(shards, args.batch_size)
            raw_times.append(time.perf_counter() - start)
            got, seconds = run_step(
                shards, root / "clip", args.batch_size, f"/tmp/obc{os.getpid()}-{i}"
            )
            step_times.append(seconds)
            keys = sorted(expected)
            assert sorted(got) == keys
            diff = max(abs(got[k] - expected[k]) for k in keys)
            assert diff <= 1e-4, diff
    raw_rate = args.samples / statistics.median(raw_times)
    step_rate = args.samples / statistics.median(step_times)
    print(json.dumps({
        "samples": args.samples, "batch_size": args.batch_size, "layers": args.layers,
        "raw_s": [round(t, 2) for t in raw_times], "step_s": [round(t, 2) for t in step_times],
        "raw_samples_per_s": round(raw_rate, 2), "step_samples_per_s": round(step_rate, 2),
        "ratio": round(step_rate / raw_rate, 3), "load_average": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
