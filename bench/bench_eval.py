"""Evaluation throughput, two comparisons on the same items in one invocation.

`--compare step` (default): the evaluate step on 2 Ray workers against one process calling the
model's `generate` in a loop, one item at a time (the authors' only working mode), on the same
items with the same budget and greedy decoding. The loop runs once per `--loop-threads` value
(default 1 torch thread; 2 threads fight everything else for a 2-core machine's cores); the step
has 2 workers x 1 thread and its default batch size (16). The loop's model is already in memory
(not timed); the step is timed in all (starting its actors, loading the model in each, encoding,
generating, scoring, writing) and after the workers have loaded the model (its
`eval.generate_seconds`). Answers are checked equal (batching changes speed, not answers).
Default size: 1,000 VQA items (a small official benchmark's order: POPE has 3 x 3,000,
ScienceQA-IMG 2,017, MME 2,374).

    .venv/bin/python bench/bench_eval.py --model demo --records 1000

`--compare batch`: `owl.eval.generate.predict` in one process at several batch sizes, each as a
speed-up over batch size 1 (answers checked equal).

    .venv/bin/python bench/bench_eval.py --compare batch --model demo --records 24 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from owl.data.manifest import Manifest
from owl.data.tokenizer import train_bpe_tokenizer
from owl.eval.benchmarks import read_benchmark
from owl.eval.generate import predict
from owl.eval.prompts import prompt_ids
from owl.model import OwlModel, get_config, save_model

WORDS = "What colour is the shape? Answer the question using a single word or phrase. red blue"


def _benchmark(directory: Path, num_records: int) -> Path:
    (directory / "images").mkdir(parents=True)
    lines = []
    for i in range(num_records):
        Image.new("RGB", (40 + i, 32), (10 * i % 255, 80, 160)).save(
            directory / "images" / f"{i}.png"
        )
        lines.append({"id": f"v{i}", "type": "vqa", "images": [f"images/{i}.png"],
                      "question": "What colour is the shape?" + " Look." * (i % 5),
                      "answers": ["red"] * 10})  # fmt: skip
    (directory / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return directory / "vqa.jsonl"


@torch.no_grad()
def _loop(model, tokenizer, records, max_new: int) -> list[str]:
    from owl.eval.generate import load_images

    cfg = model.cfg
    out = []
    for record in records:
        ids = prompt_ids(tokenizer, record, variant=cfg.variant,
                         placeholder=cfg.image_placeholder, num_visual_tokens=cfg.num_visual_tokens)  # fmt: skip
        reply = model.generate([ids], [load_images(record, cfg)], max_new_tokens=max_new,
                               temperature=0.0, eos_token_id=tokenizer.eos_token_id)[0]  # fmt: skip
        out.append(tokenizer.decode(reply, skip_special_tokens=True).strip())
    return out


def _compare_step(args: argparse.Namespace) -> None:
    import ray

    from pipelines.step import StepContext, StepInput
    from pipelines.steps import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_bpe_tokenizer(
            [WORDS] * 50, vocab_size=300, out_dir=root / "tok/tokenizer"
        )
        cfg = get_config(args.model, decoder={"vocab_size": len(tokenizer)})
        torch.manual_seed(0)
        model = OwlModel(cfg).eval()
        save_model(model, root / "train/model")
        bench = _benchmark(root / "bench", args.records)
        records = read_benchmark(bench)
        load_before = os.getloadavg()

        loops = {}
        for threads in (int(t) for t in args.loop_threads.split(",")):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            looped = _loop(model, tokenizer, records, args.max_new_tokens)
            loops[threads] = time.perf_counter() - start
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            inputs = {name: StepInput(name=name, dir=root / d, manifest=Manifest(step=name))
                      for name, d in (("model", "train"), ("tokenizer", "tok"))}  # fmt: skip
            step_cfg = evaluate.Config(
                benchmarks=[str(bench)], batch_size=args.batch_size, num_workers=2,
                cpus_per_worker=1, max_new_tokens={"vqa": args.max_new_tokens},
                blank_image_control=False, dtype="float32",
            )  # fmt: skip
            ctx = StepContext(step="evaluate", out_dir=root / "out", job_name="bench", model=cfg)
            start = time.perf_counter()
            manifest = evaluate.run(ctx, step_cfg, inputs)  # includes actor start + model load
            step_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        import pyarrow.parquet as pq

        stepped = pq.read_table(root / "out/predictions/vqa.parquet").column("prediction")
        same = "same answers" if stepped.to_pylist() == looped else "ANSWERS DIFFER"
        print(f"records {len(records)}, model {args.model}, max_new_tokens {args.max_new_tokens}")
        gen_s = manifest.stats["eval.generate_seconds"]
        print(f"evaluate step, 2 workers x 1 thread, batch {args.batch_size}: {step_s:7.2f} s in "
              f"all, {gen_s:.2f} s after the workers loaded the model  {same}")  # fmt: skip
        for threads, loop_s in loops.items():
            print(f"generate loop, 1 process x {threads} thread(s), batch 1: {loop_s:7.2f} s  "
                  f"-> step speed-up x{loop_s / step_s:.2f} in all, "
                  f"x{loop_s / gen_s:.2f} after loading")  # fmt: skip
        print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores")  # fmt: skip


def _compare_batch(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer([WORDS] * 50, vocab_size=300, out_dir=Path(tmp) / "tok")
        cfg = get_config(args.model, decoder={"vocab_size": len(tokenizer)})
        torch.manual_seed(0)
        model = OwlModel(cfg).eval()
        records = read_benchmark(_benchmark(Path(tmp) / "bench", args.records))
        budgets = {"vqa": args.max_new_tokens}
        baseline, reference = None, None
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            start = time.perf_counter()
            out = predict(
                model, tokenizer, records, batch_size=batch_size, max_new_tokens_by_type=budgets
            )
            seconds = time.perf_counter() - start
            baseline = baseline or seconds
            reference = reference or out
            same = "same answers" if out == reference else "ANSWERS DIFFER"
            print(
                f"batch {batch_size:>3}: {seconds:7.2f} s  speed-up x{baseline / seconds:5.2f}  {same}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("step", "batch"), default="step")
    parser.add_argument("--model", default="demo", help="registry size")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="step: its batch size")
    parser.add_argument("--batch-sizes", default="1,4,8,24", help="batch: the sizes compared")
    parser.add_argument("--threads", type=int, default=1, help="batch: torch threads")
    parser.add_argument("--loop-threads", default="1", help="step: the loop's torch threads")
    args = parser.parse_args()
    if args.compare == "step":
        _compare_step(args)
    else:
        _compare_batch(args)


if __name__ == "__main__":
    main()
