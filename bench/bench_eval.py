"""Evaluation throughput: batched generation against one-by-one (the authors' only working mode).

Builds a random model of a registry size, a small BPE tokenizer and a VQA + multiple-choice
benchmark in a temporary folder, then times `owl.eval.generate.predict` at several batch sizes in
the same run and prints each as a speed-up over batch size 1 (answers are checked equal).

    .venv/bin/python bench/bench_eval.py --model demo --records 24 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from owl.data.tokenize import train_bpe_tokenizer
from owl.eval.benchmarks import read_benchmark
from owl.eval.generate import predict
from owl.model import build_model, get_config

WORDS = "What colour is the shape? Answer the question using a single word or phrase. red blue"


def _benchmark(directory: Path, num_records: int) -> list:
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
    return read_benchmark(directory / "vqa.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="registry size")
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-sizes", default="1,4,8,24")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer([WORDS] * 50, vocab_size=300, out_dir=Path(tmp) / "tok")
        cfg = get_config(args.model, decoder={"vocab_size": len(tokenizer)})
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        records = _benchmark(Path(tmp) / "bench", args.records)
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


if __name__ == "__main__":
    main()
