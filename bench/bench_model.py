"""Model benchmarks on CPU, as ratios measured in one run (so machine load cancels out).

1. Forward + backward tokens/s at `demo` size: our decoder (text-only batch through the whole
   OwlModel, owl1 = plain LLaMA layers, owl2 = with the modality-adaptive module) vs transformers
   `LlamaForCausalLM` with the same dimensions (SDPA attention). Target: owl1 >= 1.0x. Also owl2
   with its MAM norms as two norm modules and a `torch.where` (what the norm-weight lookup buys).
2. Generation of 256 new tokens (batch 1 or 8; text prompt, then image + text prompt), KV cache vs
   recomputing the whole sequence each step (target >= 5x); the cached runs once with `TextStep`
   per generated token, as `generate` does, once with `forward_cached` per token (its path for a
   decoder TextStep refuses, e.g. LoRA-wrapped): what TextStep buys; and once with TextStep's work
   done through the decoder's modules (`_ModuleStep`, tried for issue 15 and not kept).
3. (`--only step`, not run by default) A whole OwlModel training step at `demo` size (forward,
   backward and AdamW over every parameter) on packed batches shaped like the demo's stages:
   stage 1, 12 rows of 256 tokens of caption samples (1 image + 15 text tokens each, 8 images
   per row); stage 2, 4 rows of 256 tokens with 5 image samples each (1 image + 34 text tokens).
   The model as it is (every linear layer `owl.model.linear.Linear`) against copies whose vision
   encoder and abstractor linears (or all linears) are plain nn.Linear: the same parameters, the
   code before those modules (or any module) used the oneDNN path; and a copy whose attention runs
   under the dense block-diagonal mask instead of per segment (what `SegmentLayout` buys).

Times are this process's CPU time (one torch thread by default), repeats interleaved (baseline,
candidate, baseline, ...), so other jobs on a shared machine do not skew the ratios; tables give the
best repeat's rate and the ratios of the best and of the median repeats. The load average is
printed before and after.

Usage: .venv/bin/python bench/bench_model.py [--batch 8] [--length 256] [--repeats 5] [--threads 1]
       [--only train|generate|step]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import owl.model.generate as generate_module
import owl.model.model as model_module
from owl import IGNORE_INDEX, IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config
from owl.model import linear as linear_module
from owl.model.decoder import RMSNorm, TextStep
from owl.model.linear import Linear
from owl.train.loss import token_loss_sum


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


def _with_hooked_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose RMSNorms carry a no-op forward pre-hook: the MAM's norms then run
    as two norm modules and a `torch.where` (as under ZeRO-3's hooks), not the weight lookup."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.register_forward_pre_hook(lambda *_: None)
    return model


def bench_train_step(
    batch: int, length: int, repeats: int
) -> list[tuple[str, float, float, float]]:
    torch.manual_seed(0)
    ids = torch.randint(0, get_config("demo").decoder.vocab_size, (batch, length))
    models = {
        "transformers LlamaForCausalLM": _hf_llama("demo").train(),
        "owl decoder (owl1, no MAM)": OwlModel(get_config("demo", "owl1")).train(),
        "owl decoder (owl2, MAM)": OwlModel(get_config("demo", "owl2")).train(),
    }
    models["owl2, MAM norms as two norms + torch.where"] = _with_hooked_norms(
        models["owl decoder (owl2, MAM)"]
    )

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


class _ModuleStep:
    """TextStep's work through the decoder's own modules (text branch only, the same rotary
    tables and key mask): one per-layer code path for training and decoding, LoRA-wrapped and
    hooked decoders included. Tried for issue 15 and not kept (slower); measured here so the
    choice can be checked again."""

    supports = staticmethod(lambda decoder: True)

    def __init__(self, decoder: torch.nn.Module, capacity: int) -> None:
        self.decoder, tables = decoder, TextStep(decoder, capacity)
        self.cos, self.sin = tables.cos, tables.sin

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        decoder, end = self.decoder, cache.length + 1
        mask = None if key_mask is None else key_mask[..., :end]
        cos, sin = self.cos[positions], self.sin[positions]
        x = decoder.embed_tokens(tokens[:, None])  # (B, 1, D)
        for idx, layer in enumerate(decoder.layers):
            x = layer(x, None, cos, sin, mask, cache, idx)
        cache.length = end
        return decoder.lm_head(decoder.norm(x))[:, 0]


def bench_generation(
    new_tokens: int, repeats: int, with_image: bool, batch: int = 1
) -> list[tuple[str, float, float, float]]:
    """`batch` copies of a 16-token text prompt (optionally after one image); no EOS, so every run
    makes exactly `new_tokens` tokens per sample. Without the cache each step reruns the whole
    model (images included), which is what generation without a KV cache costs. The cached runs
    take each token through `TextStep` (as `generate` does), through `forward_cached` (TextStep
    refused, as for a LoRA-wrapped decoder: what TextStep buys), or through `_ModuleStep`."""
    torch.manual_seed(0)
    model = OwlModel(get_config("demo")).eval()
    prompt = torch.randint(3, 512, (16,)).tolist()
    images = None
    if with_image:
        prompt = [IMAGE_TOKEN_ID] * model.cfg.num_visual_tokens + prompt
        images = [torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)]

    prompts, images = [prompt] * batch, None if images is None else images * batch
    steps = {
        "no cache (recompute each step)": None,
        "KV cache, forward_cached per token": "refused",
        "KV cache, TextStep through the modules per token (not kept)": _ModuleStep,
        "KV cache, TextStep per token": TextStep,
    }

    def run(name: str) -> Callable[[], object]:
        def call() -> object:
            step, supports = generate_module.TextStep, TextStep.supports
            if steps[name] == "refused":  # generate's path for a decoder TextStep refuses
                TextStep.supports = staticmethod(lambda decoder: False)  # type: ignore[method-assign]
            elif steps[name] is not None:
                generate_module.TextStep = steps[name]
            try:
                return model.generate(
                    prompts, images, max_new_tokens=new_tokens, use_cache=steps[name] is not None
                )
            finally:
                generate_module.TextStep, TextStep.supports = step, supports  # type: ignore[method-assign]

        return call

    outputs = [run(name)() for name in steps]  # warm-up
    if any(out != outputs[0] for out in outputs):
        raise RuntimeError("the generation variants disagree on the greedy tokens")
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, as above
        for name in steps:
            seconds[name].append(_cpu_seconds(run(name)))
    base = seconds["no cache (recompute each step)"]
    return [_row(name, batch * new_tokens, base, v) for name, v in seconds.items()]


def packed_batch(
    model: torch.nn.Module, rows: int, samples_per_row: int, text_tokens: int, length: int
) -> dict[str, torch.Tensor]:
    """`rows` packed rows of `length` tokens, each `samples_per_row` samples of one image (its
    slots) followed by `text_tokens` supervised text tokens; the rest of a row is padding."""
    slots = model.cfg.num_visual_tokens
    sample = slots + text_tokens
    if samples_per_row * sample > length:
        raise ValueError(f"{samples_per_row} samples of {sample} tokens exceed {length}")
    ids = torch.randint(3, model.cfg.decoder.vocab_size, (rows, length))
    segment_ids = torch.zeros(rows, length, dtype=torch.long)
    for k in range(samples_per_row):
        start = k * sample
        ids[:, start : start + slots] = IMAGE_TOKEN_ID
        segment_ids[:, start : start + sample] = k + 1
    labels = ids.masked_fill((ids == IMAGE_TOKEN_ID) | (segment_ids == 0), IGNORE_INDEX)
    size = model.cfg.vision.image_size
    images = torch.randn(rows * samples_per_row, 3, size, size)
    return {"input_ids": ids, "images": images, "segment_ids": segment_ids, "labels": labels}


def _with_nn_linear(model: torch.nn.Module, parts: tuple[str, ...]) -> torch.nn.Module:
    """A copy of `model` whose `Linear` layers under `parts` are plain nn.Linear (same parameters):
    the forward of the code before they took the oneDNN path."""
    model = copy.deepcopy(model)
    for part in parts:
        for module in getattr(model, part).modules():
            if type(module) is Linear:
                module.__class__ = torch.nn.Linear
    return model


DENSE_MASK = "Linear everywhere, attention under the dense mask (before SegmentLayout)"


def bench_model_step(repeats: int) -> list[tuple[str, list[tuple[str, float, float, float]]]]:
    """Training steps (forward, backward, AdamW) of the whole demo model on stage-shaped batches;
    the baseline has nn.Linear in the vision encoder and abstractor (as before they used
    `Linear`). `Linear` takes its oneDNN path here on every CPU (on an Intel CPU the model's
    default is MKL, `owl.model.linear.PREFER_ONEDNN`), so each column is the library it names."""
    prefer, linear_module.PREFER_ONEDNN = linear_module.PREFER_ONEDNN, True
    try:
        return _bench_model_step(repeats)
    finally:
        linear_module.PREFER_ONEDNN = prefer


def _bench_model_step(repeats: int) -> list[tuple[str, list[tuple[str, float, float, float]]]]:
    torch.manual_seed(0)
    model = OwlModel(get_config("demo")).train()
    variants = {
        "nn.Linear in vision + abstractor (baseline)": _with_nn_linear(
            model, ("vision", "abstractor")
        ),
        "Linear everywhere (oneDNN)": model,
        "nn.Linear everywhere": _with_nn_linear(model, ("vision", "abstractor", "decoder")),
        DENSE_MASK: copy.deepcopy(model),
    }
    batches = {
        "stage-1-like: 12 x 256 tokens, 8 caption samples (1 image + 15 tokens) per row": (
            packed_batch(model, rows=12, samples_per_row=8, text_tokens=15, length=256)
        ),
        "stage-2-like: 4 x 256 tokens, 5 samples (1 image + 34 tokens) per row": (
            packed_batch(model, rows=4, samples_per_row=5, text_tokens=34, length=256)
        ),
    }
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in variants.items()}

    def step(name: str, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            layout = model_module.SegmentLayout
            if name == DENSE_MASK:  # SDPA under the (B, 1, T, T) block-diagonal mask
                model_module.SegmentLayout = lambda s: model_module.segment_mask(s, s)
            try:
                logits = variants[name](
                    batch["input_ids"], batch["images"], segment_ids=batch["segment_ids"]
                )
            finally:
                model_module.SegmentLayout = layout
            token_loss_sum(logits, batch["labels"], batch["segment_ids"]).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    tables = []
    for title, batch in batches.items():
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for name in variants:
            step(name, batch)()  # warm-up (and AdamW's state)
        for _ in range(repeats):  # interleaved, as above
            for name in variants:
                seconds[name].append(_cpu_seconds(step(name, batch)))
        tokens = batch["input_ids"].numel()
        base = next(iter(seconds.values()))
        tables.append((title, [_row(name, tokens, base, v) for name, v in seconds.items()]))
    return tables


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
    parser.add_argument(
        "--only",
        choices=["train", "generate", "step"],
        help="run one part only (`step`, the whole-model training step, runs only this way)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU "
        f"{linear_module.cpu_vendor() or '(vendor unknown)'} (`Linear` by default: "
        f"{'oneDNN' if linear_module.PREFER_ONEDNN else 'MKL'}); "
        f"{args.repeats} interleaved repeats by process CPU time; {_load()}\n",
        flush=True,
    )
    if args.only == "step":
        for title, rows in bench_model_step(args.repeats):
            title = f"Training step (forward, backward, AdamW), demo size, {title}"
            print(_table(title, "tokens/s", rows) + "\n", flush=True)
        print(_load())
        return
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
