"""Model benchmarks on CPU, as ratios measured in one run (so machine load cancels out).

1. Forward + backward tokens/s at `demo` size: our decoder (text-only batch through the whole
   OwlModel, owl1 = plain LLaMA layers, owl2 = with the modality-adaptive module) vs transformers
   `LlamaForCausalLM` with the same dimensions (SDPA attention). Target: owl1 >= 1.0x.
2. Generation of 256 new tokens (batch 1; text prompt, then image + text prompt), KV cache vs
   recomputing the whole sequence each step. Target >= 5x.

Times are this process's CPU time (one torch thread by default), repeats interleaved (baseline,
candidate, baseline, ...), so other jobs on a shared machine do not skew the ratios; tables give the
best repeat's rate and the ratios of the best and of the median repeats. The load average is
printed before and after.

Usage: .venv/bin/python bench/bench_model.py [--batch 8] [--length 256] [--repeats 5] [--threads 1]
       [--only train|generate]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from owl import IMAGE_TOKEN_ID
from owl.model import build_model, get_config


def _hf_llama(name: str) -> LlamaForCausalLM:
    d = get_config(name).decoder
    cfg = LlamaConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden,
        intermediate_size=d.ffn_dim,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_kv_heads,
        rms_norm_eps=d.rms_norm_eps,
        max_position_embeddings=d.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
        use_cache=False,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def _cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU time of one call of this process (one torch thread): other jobs on a shared machine
    slow the wall clock down, not this."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    return min(_cpu_seconds(fn) for _ in range(repeats))


def bench_train_step(
    batch: int, length: int, repeats: int
) -> list[tuple[str, float, float, float]]:
    torch.manual_seed(0)
    ids = torch.randint(0, get_config("demo").decoder.vocab_size, (batch, length))
    models = {
        "transformers LlamaForCausalLM": _hf_llama("demo").train(),
        "owl decoder (owl1, no MAM)": build_model(get_config("demo", "owl1")).train(),
        "owl decoder (owl2, MAM)": build_model(get_config("demo", "owl2")).train(),
    }

    def step(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            out = model(ids)
            logits = out.logits if hasattr(out, "logits") else out
            logits.float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)

        return run

    # Interleave the repeats so slow phases of a shared machine hit every model alike.
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        step(model)()  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            seconds[name].append(_cpu_seconds(step(model)))
    base = seconds["transformers LlamaForCausalLM"]
    return [_row(name, batch * length, base, v) for name, v in seconds.items()]


def _row(
    name: str, items: int, baseline: list[float], seconds: list[float]
) -> tuple[str, float, float, float]:
    """(name, items/s of the best repeat, best-vs-best ratio, median-vs-median ratio)."""
    return (
        name,
        items / min(seconds),
        min(baseline) / min(seconds),
        statistics.median(baseline) / statistics.median(seconds),
    )


def bench_generation(
    new_tokens: int, repeats: int, with_image: bool, batch: int = 1
) -> list[tuple[str, float, float, float]]:
    """`batch` copies of a 16-token text prompt (optionally after one image); no EOS, so every run
    makes exactly `new_tokens` tokens per sample. Without the cache each step reruns the whole
    model (images included), which is what generation without a KV cache costs."""
    torch.manual_seed(0)
    model = build_model("demo").eval()
    prompt = torch.randint(3, 512, (16,)).tolist()
    images = None
    if with_image:
        prompt = [IMAGE_TOKEN_ID] * model.cfg.num_visual_tokens + prompt
        images = [torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)]

    prompts, images = [prompt] * batch, None if images is None else images * batch

    def run(use_cache: bool) -> Callable[[], object]:
        return lambda: model.generate(
            prompts, images, max_new_tokens=new_tokens, use_cache=use_cache
        )

    seconds: dict[bool, list[float]] = {False: [], True: []}
    run(True)()  # warm-up
    for _ in range(repeats):  # interleaved, as above
        for use_cache in (False, True):
            seconds[use_cache].append(_cpu_seconds(run(use_cache)))
    return [
        _row("no cache (recompute each step)", batch * new_tokens, seconds[False], seconds[False]),
        _row("KV cache", batch * new_tokens, seconds[False], seconds[True]),
    ]


def _table(title: str, unit: str, rows: list[tuple[str, float, float, float]]) -> str:
    lines = [
        f"### {title}",
        "",
        f"| | {unit} | ratio (best) | ratio (median) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {rate:,.0f} | {best:.2f}x | {median:.2f}x |"
        for name, rate, best, median in rows
    ]
    return "\n".join(lines)


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--only", choices=["train", "generate"], help="run one part only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; "
        f"{args.repeats} interleaved repeats by process CPU time; {_load()}\n",
        flush=True,
    )
    if args.only != "generate":
        rows = bench_train_step(args.batch, args.length, args.repeats)
        title = f"Forward+backward, demo size, batch {args.batch} x {args.length} tokens"
        print(_table(title, "tokens/s", rows) + "\n", flush=True)
    for with_image, batch in ((False, 1), (True, 1), (True, 8)):
        if args.only == "train":
            break
        rows = bench_generation(args.new_tokens, args.repeats, with_image, batch)
        prompt = "1 image + 16 text tokens" if with_image else "16 text tokens"
        title = (
            f"Greedy generation, demo size, batch {batch}, {prompt}, {args.new_tokens} new tokens"
        )
        print(_table(title, "tokens/s", rows) + "\n", flush=True)
    print(_load())


if __name__ == "__main__":
    main()
