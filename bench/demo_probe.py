"""Does the demo model learn? Both training stages of the demo in one process, then the held-out
benchmarks, without Ray or DeepSpeed, so settings can be tried in minutes.

It emulates what the pipeline runs (2 data-parallel workers, 1 torch thread each) with one process,
one thread and the global batch of the two workers, through the same library code: shapes data,
BPE tokenizer, templates, packing, loss, stage parameter selection and AdamW groups, the warm-up +
cosine schedule, greedy generation and the benchmark scores. Prints, after each stage: held-out VQA
accuracy, the same with every image blank (must fall to the question-type prior), text-only
accuracy, and the speed (ms/step, with the load average: the machine may be shared).

    .venv/bin/python bench/demo_probe.py --variant owl2
    .venv/bin/python bench/demo_probe.py --variant owl1 --stage1-steps 300 --stage2-steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from owl.data.image import preprocess_images
from owl.data.packing import Sample, collate, pack_rows
from owl.data.shapes import (
    CAPTION_PROMPT,
    COLOURS,
    SHAPES,
    VQA_SUFFIX,
    WHERE,
    Scene,
    Shape,
    qa_pairs,
)
from owl.data.shapes_files import ShapesConfig, write_shapes_dataset
from owl.data.sources import SourceSpec, read_source, record_texts
from owl.data.templates import PLACEHOLDER_RE, DropSample
from owl.data.tokenize import encode_captions, encode_conversations
from owl.data.tokenizer import train_bpe_tokenizer
from owl.eval.benchmarks import BenchmarkRecord, read_benchmark
from owl.eval.generate import predict
from owl.eval.metrics import vqa_accuracy
from owl.eval.scoring import sample_score, score
from owl.model import OwlModel, get_config
from owl.model.config import OwlConfig
from owl.model.variants import VARIANTS
from owl.train.config import TrainConfig, lr_multiplier
from owl.train.loss import num_supervised, token_loss_sum
from owl.train.stages import lora_kwargs, param_groups, select_trainable

# The VQA rule the demo scores its shapes benchmark with (jobs/demo.yaml, docs/benchmarks.md).
RULE = "normalized"

# ShapesConfig fields the probe exposes as flags.
SHAPES_FIELDS = ("num_caption_images", "num_instruction_images", "num_text", "max_shapes",
                 "min_questions", "max_questions", "caption_turn_share")  # fmt: skip


@dataclass
class Corpus:
    """Tokenized samples of one stage; `images[i]` indexes rows of `pixels`."""

    samples: list[Sample]
    images: list[list[int]]
    pixels: torch.Tensor  # (N, 3, S, S)


@dataclass
class StageArgs:
    steps: int
    lr: float
    abstractor_lr: float
    warmup: int
    batch_rows: int  # global: micro batch per worker x workers
    max_length: int
    trainable: str  # "paper" (the variant's recipe) or "all"


def build_corpora(
    out: Path, model_cfg: OwlConfig, vocab_size: int, max_lengths: tuple[int, int]
) -> tuple[object, Corpus, Corpus]:
    """Tokenizer, stage-1 captions and stage-2 instructions (multimodal + text-only)."""
    captions = pq.read_table(out / "captions.parquet").to_pydict()
    specs = [
        SourceSpec("llava", str(out / "instructions.json")),
        SourceSpec("alpaca", str(out / "text_instructions.json")),
    ]
    records = [r for spec in specs for r in read_source(spec)]
    texts = list(captions["caption"]) + [
        PLACEHOLDER_RE.sub(" ", t) for r in records for t in record_texts(r)
    ]
    tokenizer = train_bpe_tokenizer(texts, vocab_size, out / "tokenizer")
    num_visual = model_cfg.num_visual_tokens
    encoded = encode_captions(
        tokenizer, captions["caption"], num_visual_tokens=num_visual, max_length=max_lengths[0]
    )
    paths = [u.removeprefix("file://") for u in captions["url"]]
    stage1 = _corpus(encoded, [[p] for p in paths], model_cfg)
    encoded = encode_conversations(
        tokenizer, [(r.turns, len(r.images)) for r in records], variant=model_cfg.variant,
        num_visual_tokens=num_visual, max_length=max_lengths[1],
    )  # fmt: skip
    stage2 = _corpus(encoded, [r.images for r in records], model_cfg)
    return tokenizer, stage1, stage2


def _corpus(encoded: list, image_paths: list[list[str]], cfg: OwlConfig) -> Corpus:
    samples, images, files = [], [], []
    for enc, paths in zip(encoded, image_paths):
        if isinstance(enc, DropSample):
            continue
        kept = paths[: enc.num_images]
        images.append(list(range(len(files), len(files) + len(kept))))
        files.extend(kept)
        samples.append(Sample(enc.input_ids, enc.labels, []))
    pixels = preprocess_images([Path(f).read_bytes() for f in files], cfg.vision.image_size,
                               cfg.image_mode)  # fmt: skip
    return Corpus(samples, images, pixels)


def batches(corpus: Corpus, args: StageArgs, seed: int) -> Iterator[dict]:
    """Endless packed batches of `batch_rows` rows; rows of a new shuffle follow the last one."""
    rng = random.Random(seed)
    lengths = [len(s.input_ids) for s in corpus.samples]
    counts = [len(i) for i in corpus.images]
    pending: list[list[int]] = []
    while True:
        order = list(range(len(corpus.samples)))
        rng.shuffle(order)
        pending += pack_rows(order, lengths, counts, max_length=args.max_length,
                             max_images_per_row=8)  # fmt: skip
        while len(pending) >= args.batch_rows:
            chunk, pending = pending[: args.batch_rows], pending[args.batch_rows :]
            batch = collate([[corpus.samples[i] for i in row] for row in chunk], pad_id=0)
            image_index = [j for row in chunk for i in row for j in corpus.images[i]]
            batch["images"] = corpus.pixels[image_index] if image_index else None
            yield batch


def set_trainable(model: OwlModel, stage: int, trainable: str, cfg: TrainConfig) -> None:
    """The variant's recipe for this stage (`paper`), or every parameter (`all`)."""
    if trainable == "all":
        model.requires_grad_(True)
    else:
        select_trainable(model, model.cfg.variant, stage, lora=lora_kwargs(cfg))


def train_stage(model: OwlModel, corpus: Corpus, args: StageArgs, stage: int, seed: int) -> float:
    """Train `args.steps` steps; returns ms per step."""
    cfg = TrainConfig(stage=stage).replace(
        optimizer={
            "lr": args.lr,
            "abstractor_lr": args.abstractor_lr,
            "weight_decay": 0.0,
            "betas": (0.9, 0.98),
        },
        schedule={"max_steps": args.steps},
    )
    set_trainable(model, stage, args.trainable, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=cfg.betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, warmup=args.warmup, total=args.steps, min_ratio=0.1),
    )
    model.train()
    data = batches(corpus, args, seed)
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        batch = next(data)
        logits = model(batch["input_ids"], batch["images"], position_ids=batch["position_ids"],
                       segment_ids=batch["segment_ids"])  # fmt: skip
        count = num_supervised(batch["labels"], batch["segment_ids"])
        loss = token_loss_sum(logits, batch["labels"], batch["segment_ids"]) / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0:
            recent = sum(losses[-20:]) / len(losses[-20:])
            print(f"  stage {stage} step {step + 1}/{args.steps} loss {recent:.3f} "
                  f"({trainable:,} trainable)", flush=True)  # fmt: skip
    return 1000 * (time.perf_counter() - start) / max(1, args.steps)


_ITEM_RE = re.compile(
    r"\b(?:a|an) ("
    + "|".join(COLOURS)
    + r") ("
    + "|".join(SHAPES)
    + r") ("
    + "|".join(WHERE.values())
    + ")",
    re.IGNORECASE,
)
_POSITION_OF = {phrase: position for position, phrase in WHERE.items()}


def answer_from_caption(caption: str, question: str) -> str:
    """Answer a shapes VQA question from a caption such as "two shapes: a red circle on the left
    and ..." ("" when the caption does not answer it)."""
    shapes = tuple(
        Shape(kind.lower(), colour.lower(), _POSITION_OF[where.lower()])
        for colour, kind, where in _ITEM_RE.findall(caption)
    )
    if not shapes:
        return ""
    scene = Scene(shapes, background=0, scale=0.25)
    for _, asked, answer in qa_pairs(scene):
        if asked == question:
            return answer
    # A question about a shape or colour the caption does not list: counts are zero, else unknown.
    return "0" if question.startswith("How many") else ""


def question_kind(question: str) -> str:
    """The shapes source's question kinds, read back from the question text."""
    for prefix, kind in (("How many", "count"), ("What shape", "shape"),
                         ("What colour", "colour"), ("Where", "position")):  # fmt: skip
        if question.startswith(prefix):
            return kind
    return "other"


def seen_vqa(out: Path, limit: int) -> list[BenchmarkRecord]:
    """The first VQA question of `limit` training conversations, asked alone with the image, as
    benchmark records: accuracy on scenes the model trained on, beside the held-out one, tells
    over- from under-fitting."""
    records = []
    for item in json.loads((out / "instructions.json").read_text()):
        turns = item["conversations"]
        asked = [(q["value"], a["value"]) for q, a in zip(turns[::2], turns[1::2])
                 if q["value"].endswith(VQA_SUFFIX)]  # fmt: skip
        if not asked:
            continue
        question, answer = asked[0]
        question = question.removeprefix("<image>\n").removesuffix(VQA_SUFFIX).strip()
        records.append(BenchmarkRecord(id=item["id"], type="vqa", source="instructions.json",
                                       images=(str(out / item["image"]),), question=question,
                                       answers=(answer,) * 10))  # fmt: skip
        if len(records) == limit:
            break
    return records


def evaluate(model: OwlModel, tokenizer, bench_dir: Path, limit: int) -> dict[str, float]:
    model.eval()
    seen = seen_vqa(bench_dir.parent, 2 * limit)
    seen_score = score(seen, predict(model, tokenizer, seen, batch_size=25), vqa_rule=RULE)[
        "vqa.accuracy"
    ]
    vqa = read_benchmark(bench_dir / "vqa.jsonl")  # the first `limit`, then the extra items
    text = read_benchmark(bench_dir / "text.jsonl", limit)
    predictions = predict(model, tokenizer, vqa, batch_size=25)
    by_kind: dict[str, list[float]] = {}
    for record, prediction in zip(vqa, predictions):
        by_kind.setdefault(question_kind(record.question), []).append(
            sample_score(record, prediction, RULE)
        )
    all_vqa = score(vqa, predictions, vqa_rule=RULE)["vqa.accuracy"]
    blank = score(
        vqa, predict(model, tokenizer, vqa, batch_size=25, blank_images=True), vqa_rule=RULE
    )
    # The same questions answered from the model's own caption of each image: how much of the
    # scene the vision path gets right, whatever the model has learned about answering.
    all_vqa_records = vqa
    vqa, predictions = vqa[:limit], predictions[:limit]  # the first `limit`, as the demo has
    as_caption = [dataclasses.replace(r, question=CAPTION_PROMPT, type="caption") for r in vqa]
    described = predict(
        model, tokenizer, as_caption, batch_size=25, max_new_tokens_by_type={"caption": 60}
    )
    for r, p in list(zip(vqa, described))[:3]:
        print(f"    caption: {p['prediction']!r} | {r.question} -> {r.answers[0]}", flush=True)
    via_caption = [
        vqa_accuracy(answer_from_caption(p["prediction"], r.question), r.answers, RULE)
        for r, p in zip(vqa, described)
    ]
    return {
        "vqa": score(vqa, predictions, vqa_rule=RULE)["vqa.accuracy"],
        f"vqa_{len(all_vqa_records)}": all_vqa,
        "vqa_seen": seen_score,
        "vqa_via_caption": sum(via_caption) / max(1, len(via_caption)),
        **{f"vqa.{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())},
        f"vqa_{len(all_vqa_records)}_blank": blank["vqa.accuracy"],
        "text": score(text, predict(model, tokenizer, text, batch_size=25))["text.accuracy"],
    }


def stage_args(ns: argparse.Namespace, stage: int) -> StageArgs:
    get = lambda name: getattr(ns, f"stage{stage}_{name}")  # noqa: E731
    return StageArgs(steps=get("steps"), lr=get("lr"), abstractor_lr=get("abstractor_lr"),
                     warmup=get("warmup"), batch_rows=get("batch"), max_length=get("max_length"),
                     trainable=get("trainable"))  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default="owl2")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--vision-pos-init", choices=("model", "normal-0.02", "clip"),
                        default="model",
                        help="ViT position embedding init: the model's (2-D sin-cos), N(0, 0.02) "
                        "(the model's before 63f6135), or CLIP's N(0, width^-0.5)")  # fmt: skip
    parser.add_argument("--model-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a model config field, e.g. vision.num_layers=3")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--eval-items", type=int, default=100)
    parser.add_argument("--extra-eval", type=int, default=400,
                        help="more held-out VQA items (vqa_N: the benchmark's plus these)")  # fmt: skip
    defaults = ShapesConfig()
    for field in SHAPES_FIELDS:
        value = getattr(defaults, field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    for stage, steps, lr, batch, length, trainable in (
        (1, 300, 2e-3, 32, 256, "all"),
        (2, 300, 1e-3, 32, 256, "all"),
    ):
        parser.add_argument(f"--stage{stage}-steps", type=int, default=steps)
        parser.add_argument(f"--stage{stage}-lr", type=float, default=lr)
        parser.add_argument(f"--stage{stage}-abstractor-lr", type=float, default=0.0)
        parser.add_argument(f"--stage{stage}-warmup", type=int, default=30)
        parser.add_argument(f"--stage{stage}-batch", type=int, default=batch,
                            help="global rows per step (micro batch x 2 workers)")  # fmt: skip
        parser.add_argument(f"--stage{stage}-max-length", type=int, default=length)
        parser.add_argument(f"--stage{stage}-trainable", choices=("paper", "all"),
                            default=trainable)  # fmt: skip
    return parser.parse_args()


def main() -> None:
    ns = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(ns.seed)
    overrides: dict[str, dict] = {}
    for item in ns.model_set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = json.loads(value)
    model_cfg = get_config(ns.model, ns.variant, **overrides)
    shapes = dataclasses.replace(ShapesConfig(), seed=ns.seed, num_eval=ns.eval_items,
                                 image_size=model_cfg.vision.image_size,
                                 num_eval_vqa=ns.eval_items + ns.extra_eval,
                                 **{k: getattr(ns, k) for k in SHAPES_FIELDS})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_shapes_dataset(out, shapes)
        lengths = (ns.stage1_max_length, ns.stage2_max_length)
        tokenizer, stage1, stage2 = build_corpora(out, model_cfg, ns.vocab_size, lengths)
        print(f"{ns.variant}: {len(stage1.samples)} caption samples, {len(stage2.samples)} "
              f"instruction samples, vocab {len(tokenizer)}, "
              f"{sum(p.numel() for p in OwlModel(model_cfg).parameters()):,} parameters")  # fmt: skip
        model = OwlModel(model_cfg)
        pos = model.vision.position_embedding
        with torch.no_grad():
            if ns.vision_pos_init == "normal-0.02":
                pos.normal_(std=0.02)
            elif ns.vision_pos_init == "clip":
                pos.normal_(std=pos.shape[1] ** -0.5)
        for stage, corpus in ((1, stage1), (2, stage2)):
            args = stage_args(ns, stage)
            load_before = os.getloadavg()[0]
            ms = train_stage(model, corpus, args, stage, ns.seed + stage)
            load = (load_before + os.getloadavg()[0]) / 2
            metrics = evaluate(model, tokenizer, out / "benchmarks", ns.eval_items)
            print(f"after stage {stage} ({args}): " + "  ".join(f"{k} {v:.3f}" for k, v in
                  metrics.items()) + f"  | {ms:.0f} ms/step at load {load:.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
