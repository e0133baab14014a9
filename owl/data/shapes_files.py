"""The synthetic "shapes" source written in the formats users bring (`write_shapes_dataset`, the
`shapes` step). The scenes, their captions and questions are owl.data.shapes. From scenes we write:
- `captions.parquet`: url (`file://` path of a PNG/JPEG under images/), caption, similarity,
  punsafe, pwatermark: a LAION-style URL list;
- `instructions.json`: LLaVA conversations (`<image>` in the first human turn) with colour, shape,
  count and position questions and short answers;
- `text_instructions.json`: Alpaca records of small deterministic text tasks;
- `benchmarks/{vqa,caption,multiple_choice,text}.jsonl` (+ benchmarks/images/): held-out items
  from scenes whose layout never appears in the training files.
Off by default (`num_videos`, `num_eval_videos`), tiny videos of one shape moving across the
frame (left, right, up or down; mp4), drawn from a random stream of their own so the files above
do not change with them:
- `video_instructions.json` (+ videos/): LLaVA conversations with a `video` and a `<video>`
  placeholder: "Which way does the red circle move?" -> "right", "What shape moves?" -> "circle";
- `benchmarks/video_qa.jsonl` (+ benchmarks/videos/): held-out movement questions, open-ended
  (type text, exact match), as the MSRVTT-QA / MSVD-QA importers write them.
Everything is a function of the seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from owl.data.shapes import (
    CAPTION_PROMPT,
    COLOURS,
    MOVES,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    VQA_SUFFIX,
    WHERE,
    Motion,
    Scene,
    alpaca_prompt,
    captions,
    motion_questions,
    pick_question,
    qa_pairs,
    render_motion,
    render_scene,
    sample_motion,
    sample_scene,
    text_task,
    yes_no_pairs,
)
from owl.data.video import encode_video


@dataclass
class ShapesConfig:
    seed: int = 0
    image_size: int = 32
    # Fewer unique scenes get memorised by the demo's training (BENCHMARKS.md, "Numbers moved out
    # of the code"). jobs/demo.yaml sets its own counts.
    num_caption_images: int = 2000
    num_instruction_images: int = 4000
    num_text: int = 1000
    num_eval: int = 50  # items per benchmark type
    # VQA items, if more than num_eval (0: num_eval): the rest come from fresh scenes whose layout
    # is in no training file, drawn apart so the training files stay the same. 100 items leave
    # +-0.05 of sampling noise on an accuracy; 500 about +-0.02.
    num_eval_vqa: int = 0
    max_shapes: int = 3
    jpeg_every: int = 4  # every n-th training image is written as JPEG, the others as PNG
    # Questions per instruction image, drawn uniformly in [min, max]: more answers per image is
    # more supervision for the same vision-encoder work.
    min_questions: int = 1
    max_questions: int = 3
    # Share of conversations that start with a caption turn ("Describe the image briefly.").
    caption_turn_share: float = 0.25
    # Videos of a moving shape (off by default: the demo's files stay as they are).
    num_videos: int = 0  # training conversations, video_instructions.json
    num_eval_videos: int = 0  # held-out questions, benchmarks/video_qa.jsonl
    video_frames: int = 8  # frames per video written (the model samples its own from them)

    def __post_init__(self) -> None:
        if not 1 <= self.min_questions <= self.max_questions:
            raise ValueError(
                f"min_questions={self.min_questions}, max_questions={self.max_questions}: "
                "need 1 <= min_questions <= max_questions"
            )
        if not 0.0 <= self.caption_turn_share <= 1.0:
            raise ValueError(f"caption_turn_share={self.caption_turn_share}: must be in [0, 1]")
        if not 1 <= self.max_shapes <= len(POSITIONS):
            raise ValueError(f"max_shapes={self.max_shapes}: must be in 1..{len(POSITIONS)}")
        if self.num_eval_vqa and self.num_eval_vqa < self.num_eval:
            raise ValueError(
                f"num_eval_vqa={self.num_eval_vqa}: must be 0 (= num_eval) or >= num_eval "
                f"({self.num_eval})"
            )
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size}: must be >= 16 to draw shapes")
        if self.num_videos < 0 or self.num_eval_videos < 0 or self.video_frames < 2:
            raise ValueError(
                f"num_videos={self.num_videos}, num_eval_videos={self.num_eval_videos}, "
                f"video_frames={self.video_frames}: need counts >= 0 and >= 2 frames"
            )


@dataclass
class ShapesOutput:
    files: list[str] = field(default_factory=list)  # relative to the output folder
    counts: dict[str, int] = field(default_factory=dict)


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _training_scenes(rng: random.Random, num: int, max_shapes: int, held_out: set) -> list[Scene]:
    scenes: list[Scene] = []
    attempts = 0
    while len(scenes) < num:
        attempts += 1
        if attempts > 100 * (num + 10):
            raise ValueError(
                f"cannot draw {num} training scenes outside the {len(held_out)} held-out layouts "
                "with max_shapes={max_shapes}: raise max_shapes or lower num_eval"
            )
        scene = sample_scene(rng, max_shapes)
        if scene.layout not in held_out:
            scenes.append(scene)
    return scenes


def _write_images(out: Path, folder: str, prefix: str, scenes: list[Scene], cfg: ShapesConfig,
                  jpeg_every: int) -> list[str]:  # fmt: skip
    """Render and save scenes; returns their paths relative to `out`."""
    paths = []
    for i, scene in enumerate(scenes):
        is_jpeg = jpeg_every > 0 and i % jpeg_every == jpeg_every - 1
        rel = f"{folder}/{prefix}{i:06d}.{'jpg' if is_jpeg else 'png'}"
        _save(render_scene(scene, cfg.image_size), out / rel, "JPEG" if is_jpeg else "PNG")
        paths.append(rel)
    return paths


def _write_captions(out: Path, scenes: list[Scene], paths: list[str], rng: random.Random) -> None:
    rows = {
        "url": [(out / p).resolve().as_uri() for p in paths],
        "caption": [captions(s)[rng.randrange(3)] for s in scenes],
        "similarity": [round(rng.uniform(0.3, 0.45), 4) for _ in scenes],
        "punsafe": [round(rng.uniform(0.0, 0.05), 4) for _ in scenes],
        "pwatermark": [round(rng.uniform(0.0, 0.2), 4) for _ in scenes],
    }
    pq.write_table(pa.table(rows), out / "captions.parquet")


def _conversation(scene: Scene, rng: random.Random, cfg: ShapesConfig) -> list[dict[str, str]]:
    pairs = qa_pairs(scene) + yes_no_pairs(scene, rng)
    picked: list[tuple[str, str, str]] = []
    for _ in range(rng.randint(cfg.min_questions, cfg.max_questions)):
        left = [p for p in pairs if p not in picked]
        if not left:
            break
        picked.append(pick_question(left, rng))
    # The short-answer instruction the evaluation appends to VQA questions (as in LLaVA-665k).
    chosen = [(k, q if k == "yes_no" else f"{q} {VQA_SUFFIX}", a) for k, q, a in picked]
    if rng.random() < cfg.caption_turn_share:
        chosen.insert(0, ("caption", "Describe the image briefly.", captions(scene)[0]))
    turns = []
    for i, (_, question, answer) in enumerate(chosen):
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)


def _vqa_answers(question_kind: str, answer: str) -> list[str]:
    """Ten annotator answers as in VQAv2: mostly the short answer, some phrased differently."""
    if question_kind == "position":
        return [answer] * 7 + [WHERE[answer]] * 3
    if question_kind == "count":
        return [answer] * 8 + [NUMBER_WORDS[int(answer)]] * 2
    return [answer] * 10


def _benchmark_records(scenes: list[Scene], images: list[str], rng: random.Random,
                       num_eval: int) -> dict[str, list[dict]]:  # fmt: skip
    """vqa / caption / multiple_choice records, one scene each, images relative to benchmarks/."""
    records: dict[str, list[dict]] = {"vqa": [], "caption": [], "multiple_choice": []}
    for i in range(num_eval):
        records["vqa"].append(_vqa_record(i, scenes[i], images[i], rng))
        scene, image = scenes[num_eval + i], [images[num_eval + i]]
        records["caption"].append({"id": f"caption-{i:05d}", "type": "caption", "images": image,
                                   "question": CAPTION_PROMPT, "references": captions(scene)})  # fmt: skip
        scene, image = scenes[2 * num_eval + i], [images[2 * num_eval + i]]
        records["multiple_choice"].append(_multiple_choice(f"mc-{i:05d}", scene, image, rng))
    return records


def _multiple_choice(item_id: str, scene: Scene, image: list[str], rng: random.Random) -> dict:
    shape = rng.choice(scene.shapes)
    if rng.random() < 0.5:
        question, answer, pool = f"What shape is {WHERE[shape.position]}?", shape.kind, SHAPES
    else:
        question, answer = f"What colour is the shape {WHERE[shape.position]}?", shape.colour
        pool = tuple(sorted(COLOURS))
    options = [answer] + rng.sample([o for o in pool if o != answer], min(3, len(pool) - 1))
    rng.shuffle(options)
    letter = "ABCD"[options.index(answer)]
    return {"id": item_id, "type": "multiple_choice", "images": image, "question": question,
            "options": options, "answer": letter, "hint": captions(scene)[0].split(":")[0].capitalize() + "."}  # fmt: skip


def _extra_vqa(out: Path, cfg: ShapesConfig, trained: set, start: int) -> list[dict]:
    """VQA records beyond the first num_eval: fresh scenes outside every training layout, from an
    rng of their own (the training files do not change with their number)."""
    rng = random.Random(f"{cfg.seed}-extra-vqa")
    records: list[dict] = []
    attempts = 0
    while start + len(records) < cfg.num_eval_vqa:
        attempts += 1
        if attempts > 1000 * cfg.num_eval_vqa:
            raise ValueError(
                f"cannot draw {cfg.num_eval_vqa - start} more VQA scenes outside the training "
                f"layouts with max_shapes={cfg.max_shapes}: lower num_eval_vqa"
            )
        scene = sample_scene(rng, cfg.max_shapes)
        if scene.layout in trained:
            continue
        i = start + len(records)
        rel = f"images/vqa{i:06d}.png"
        _save(render_scene(scene, cfg.image_size), out / "benchmarks" / rel, "PNG")
        records.append(_vqa_record(i, scene, rel, rng))
    return records


def _vqa_record(i: int, scene: Scene, image: str, rng: random.Random) -> dict:
    """Benchmark VQA item `i`: one question about `scene`, its kind drawn first (`pick_question`)."""
    kind, question, answer = pick_question(qa_pairs(scene), rng)
    return {"id": f"vqa-{i:05d}", "type": "vqa", "images": [image], "question": question,
            "answers": _vqa_answers(kind, answer)}  # fmt: skip


def _write_videos(out: Path, folder: str, motions: list[Motion], cfg: ShapesConfig) -> list[str]:
    paths = []
    for i, motion in enumerate(motions):
        rel = f"{folder}/vid{i:06d}.mp4"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        frames = render_motion(motion, cfg.image_size, cfg.video_frames)
        (out / rel).write_bytes(encode_video(frames, "mp4"))
        paths.append(rel)
    return paths


def _write_video_sets(out: Path, cfg: ShapesConfig) -> tuple[list[str], dict[str, int]]:
    """The video conversations and the video benchmark (files written, counts); none when both
    counts are 0. Held-out motions differ from every training one in (shape, colour, direction)."""
    if not cfg.num_videos and not cfg.num_eval_videos:
        return [], {}
    rng = random.Random(f"{cfg.seed}-videos")
    held_out = [sample_motion(rng) for _ in range(cfg.num_eval_videos)]
    seen = {(m.kind, m.colour, m.direction) for m in held_out}
    if cfg.num_videos and len(seen) == len(SHAPES) * len(COLOURS) * len(MOVES):
        raise ValueError(f"num_eval_videos={cfg.num_eval_videos} holds out every motion: lower it")
    training: list[Motion] = []
    while len(training) < cfg.num_videos:
        motion = sample_motion(rng)
        if (motion.kind, motion.colour, motion.direction) not in seen:
            training.append(motion)
    files: list[str] = []
    if cfg.num_videos:
        paths = _write_videos(out, "videos", training, cfg)
        conversations = []
        for i, (motion, path) in enumerate(zip(training, paths)):
            pairs = motion_questions(motion)
            picked = [pairs[0]] + [p for p in pairs[1:] if rng.random() < 0.5]
            turns = []
            for n, (question, answer) in enumerate(picked):
                text = f"{question} {VQA_SUFFIX}"
                turns.append({"from": "human", "value": f"<video>\n{text}" if n == 0 else text})
                turns.append({"from": "gpt", "value": answer})
            conversations.append({"id": f"video-{i:06d}", "video": path, "conversations": turns})
        _write_json(out / "video_instructions.json", conversations)
        files += ["video_instructions.json", *paths]
    if cfg.num_eval_videos:
        paths = _write_videos(out / "benchmarks", "videos", held_out, cfg)
        records = [{"id": f"video-qa-{i:05d}", "type": "text", "videos": [path],
                    "question": motion_questions(motion)[0][0], "answer": motion.direction,
                    "prompt": "short_answer"}
                   for i, (motion, path) in enumerate(zip(held_out, paths))]  # fmt: skip
        _write_jsonl(out / "benchmarks" / "video_qa.jsonl", records)
        files += ["benchmarks/video_qa.jsonl", *(f"benchmarks/{p}" for p in paths)]
    return files, {"videos": cfg.num_videos, "eval_video_qa": cfg.num_eval_videos}


def write_shapes_dataset(out_dir: str | Path, cfg: ShapesConfig) -> ShapesOutput:
    """Write the whole synthetic source under `out_dir`; returns the files written and counts."""
    out = Path(out_dir)
    rng = random.Random(cfg.seed)
    eval_scenes = [sample_scene(rng, cfg.max_shapes) for _ in range(3 * cfg.num_eval)]
    held_out = {s.layout for s in eval_scenes}
    caption_scenes = _training_scenes(rng, cfg.num_caption_images, cfg.max_shapes, held_out)
    instruction_scenes = _training_scenes(rng, cfg.num_instruction_images, cfg.max_shapes, held_out)

    caption_paths = _write_images(out, "images", "cap", caption_scenes, cfg, cfg.jpeg_every)
    _write_captions(out, caption_scenes, caption_paths, rng)
    instruction_paths = _write_images(out, "images", "ins", instruction_scenes, cfg, cfg.jpeg_every)
    instructions = [
        {"id": f"shapes-{i:06d}", "image": path, "conversations": _conversation(scene, rng, cfg)}
        for i, (scene, path) in enumerate(zip(instruction_scenes, instruction_paths))
    ]
    _write_json(out / "instructions.json", instructions)
    _write_json(out / "text_instructions.json", [text_task(rng) for _ in range(cfg.num_text)])

    eval_paths = _write_images(out / "benchmarks", "images", "eval", eval_scenes, cfg, 0)
    records = _benchmark_records(eval_scenes, eval_paths, rng, cfg.num_eval)
    text_records = []
    for i in range(cfg.num_eval):
        task = text_task(rng)
        text_records.append({"id": f"text-{i:05d}", "type": "text", "images": [],
                             "question": alpaca_prompt(task), "answer": task["output"]})  # fmt: skip
    records["text"] = text_records
    trained = {s.layout for s in caption_scenes + instruction_scenes}
    records["vqa"] += _extra_vqa(out, cfg, trained, start=len(records["vqa"]))
    extra_paths = [r["images"][0] for r in records["vqa"][cfg.num_eval :]]
    for name, items in records.items():
        _write_jsonl(out / "benchmarks" / f"{name}.jsonl", items)

    files = ["captions.parquet", "instructions.json", "text_instructions.json"]
    files += [f"benchmarks/{name}.jsonl" for name in records]
    files += caption_paths + instruction_paths
    files += [f"benchmarks/{p}" for p in eval_paths + extra_paths]
    counts = {
        "caption_images": len(caption_scenes),
        "instruction_images": len(instruction_scenes),
        "text_instructions": cfg.num_text,
        **{f"eval_{name}": len(items) for name, items in records.items()},
    }
    video_files, video_counts = _write_video_sets(out, cfg)
    return ShapesOutput(files=files + video_files, counts={**counts, **video_counts})
