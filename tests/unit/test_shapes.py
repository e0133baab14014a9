import json
import random
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest
from PIL import Image

from owl.data.shapes import (
    COLOURS,
    POSITIONS,
    WORLD_COLOURS,
    Scene,
    Shape,
    captions,
    qa_pairs,
    render_scene,
    sample_scene,
    text_task,
)
from owl.data.shapes_files import ShapesConfig, write_shapes_dataset

SMALL = ShapesConfig(
    seed=3, num_caption_images=40, num_instruction_images=20, num_text=30, num_eval=8
)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, SMALL)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_differs(tmp_path, shapes_dir):
    again = write_shapes_dataset(tmp_path / "a", SMALL)
    for rel in again.files:
        if rel == "captions.parquet":  # holds absolute file:// URLs: compare everything else
            ours = pq.read_table(shapes_dir / rel).drop(["url"])
            assert pq.read_table(tmp_path / "a" / rel).drop(["url"]).equals(ours)
        else:
            assert (tmp_path / "a" / rel).read_bytes() == (shapes_dir / rel).read_bytes(), rel
    other = tmp_path / "b"
    write_shapes_dataset(other, ShapesConfig(**{**SMALL.__dict__, "seed": 4}))
    assert (other / "instructions.json").read_text() != (
        shapes_dir / "instructions.json"
    ).read_text()


def test_render_puts_each_colour_at_its_position():
    scene = Scene((Shape("square", "red", "left"), Shape("circle", "blue", "top")), 0, 0.3)
    image = render_scene(scene, 32)
    assert image.size == (32, 32)
    for shape in scene.shapes:
        fx, fy = POSITIONS[shape.position]
        assert image.getpixel((int(fx * 32), int(fy * 32))) == COLOURS[shape.colour]
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_captions_and_questions_describe_the_scene():
    scene = Scene((Shape("circle", "red", "left"), Shape("circle", "red", "right")), 0, 0.25)
    assert (
        captions(scene)[0] == "two shapes: a red circle on the left and a red circle on the right."
    )
    pairs = {q: a for _, q, a in qa_pairs(scene)}
    assert pairs["How many shapes are there?"] == "2"
    assert pairs["How many circles are there?"] == "2"
    assert pairs["What colour is the shape on the left?"] == "red"
    assert "Where is the red circle?" not in pairs  # ambiguous: two red circles


def test_sample_scene_positions_are_distinct():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng, 3)
        positions = [s.position for s in scene.shapes]
        assert 1 <= len(positions) <= 3 and len(set(positions)) == len(positions)


def test_caption_url_list_points_at_written_images(shapes_dir):
    table = pq.read_table(shapes_dir / "captions.parquet")
    assert table.column_names == ["url", "caption", "similarity", "punsafe", "pwatermark"]
    assert table.num_rows == SMALL.num_caption_images
    for url in table.column("url").to_pylist()[:5]:
        parsed = urlparse(url)
        assert parsed.scheme == "file"
        assert Image.open(parsed.path).size == (SMALL.image_size, SMALL.image_size)


def test_llava_instructions(shapes_dir):
    records = json.loads((shapes_dir / "instructions.json").read_text())
    assert len(records) == SMALL.num_instruction_images
    for record in records:
        assert (shapes_dir / record["image"]).exists()
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])


def test_text_tasks_are_correct():
    rng = random.Random(0)
    for _ in range(100):
        task = text_task(rng)
        if task["instruction"].startswith("What letter comes after"):
            letter = task["instruction"][-2]
            assert task["output"] == chr(ord(letter) + 1)
        elif task["instruction"].startswith("What letter comes before"):
            letter = task["instruction"][-2]
            assert task["output"] == chr(ord(letter) - 1)
        elif task["instruction"] == "What is the first word of the text?":
            assert task["output"] == task["input"].split()[0]
        elif task["instruction"] == "What is the last word of the text?":
            assert task["output"] == task["input"].split()[-1]
        else:
            thing = task["instruction"].removeprefix("What colour is the ").rstrip("?")
            assert task["output"] == WORLD_COLOURS[thing]


def test_benchmarks_are_well_formed_and_held_out(shapes_dir):
    bench = shapes_dir / "benchmarks"
    vqa = _jsonl(bench / "vqa.jsonl")
    assert len(vqa) == SMALL.num_eval and all(len(r["answers"]) == 10 for r in vqa)
    for record in _jsonl(bench / "multiple_choice.jsonl"):
        assert record["answer"] in "ABCD"[: len(record["options"])]
    text = _jsonl(bench / "text.jsonl")
    assert all(r["type"] == "text" and r["images"] == [] and r["answer"] for r in text)
    train_captions = set(
        pq.read_table(shapes_dir / "captions.parquet").column("caption").to_pylist()
    )
    eval_images = set()
    for record in _jsonl(bench / "caption.jsonl") + vqa:
        assert all((bench / p).exists() for p in record["images"])
        for ref in record.get("references", []):
            assert ref not in train_captions  # held-out layouts never appear in training
        eval_images.add(record["images"][0])
    assert all(p.startswith("images/") for p in eval_images)


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="max_shapes=6"):
        ShapesConfig(max_shapes=6)
    with pytest.raises(ValueError, match="image_size=8"):
        ShapesConfig(image_size=8)


def test_too_many_held_out_layouts_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="held-out layouts"):
        write_shapes_dataset(
            tmp_path, ShapesConfig(max_shapes=1, num_eval=200, num_caption_images=10)
        )


def test_shapes_step_lists_every_file_with_counts(tmp_path):
    from pipelines.step import StepContext
    from pipelines.steps import shapes as shapes_step

    cfg = shapes_step.Config(num_caption_images=6, num_instruction_images=4, num_text=5, num_eval=2)
    ctx = StepContext(step="shapes", out_dir=tmp_path, job_name="test", model=None)
    manifest = shapes_step.run(ctx, cfg, {})
    paths = {f.path for f in manifest.files}
    assert {"captions.parquet", "instructions.json", "benchmarks/vqa.jsonl"} <= paths
    assert sum(p.startswith("images/") for p in paths) == 10
    assert manifest.stats["num_caption_images"] == 6 and manifest.stats["num_eval_text"] == 2
    assert manifest.verify(tmp_path, full=True) == []
    with pytest.raises(ValueError, match="takes no inputs"):
        shapes_step.run(ctx, cfg, {"data": None})


def test_questions_per_image_and_caption_turns_follow_the_config(tmp_path):
    cfg = ShapesConfig(seed=5, num_caption_images=4, num_instruction_images=60, num_text=2,
                       num_eval=2, min_questions=3, max_questions=5, caption_turn_share=1.0)  # fmt: skip
    write_shapes_dataset(tmp_path, cfg)
    for record in json.loads((tmp_path / "instructions.json").read_text()):
        turns = record["conversations"]
        # every conversation opens with a caption turn, then 3..5 questions
        assert turns[0]["value"] == "<image>\nDescribe the image briefly."
        assert turns[1]["value"] in captions_of_any_scene(turns[1]["value"])
        assert 3 <= len(turns) // 2 - 1 <= 5
    cfg = ShapesConfig(seed=5, num_caption_images=4, num_instruction_images=60, num_text=2,
                       num_eval=2, caption_turn_share=0.0)  # fmt: skip
    write_shapes_dataset(tmp_path / "none", cfg)
    records = json.loads((tmp_path / "none" / "instructions.json").read_text())
    turns = [t["value"] for r in records for t in r["conversations"]]
    assert all("Describe the image" not in t for t in turns)


def captions_of_any_scene(text: str) -> list[str]:
    """`text` itself when it reads like a canonical caption ("<count> shape(s): ..."), else []."""
    head = text.split(":")[0]
    return [text] if head.split()[0] in ("one", "two", "three") and "shape" in head else []


@pytest.mark.parametrize(
    "fields",
    [
        {"min_questions": 0},
        {"min_questions": 4, "max_questions": 3},
        {"caption_turn_share": 1.5},
    ],  # fmt: skip
)
def test_bad_question_settings_are_rejected(fields):
    with pytest.raises(ValueError, match=next(iter(fields))):
        ShapesConfig(**fields)


def test_more_vqa_items_come_from_fresh_held_out_scenes_and_leave_training_as_it_was(tmp_path):
    base = ShapesConfig(seed=4, num_caption_images=30, num_instruction_images=30, num_text=5,
                        num_eval=6)  # fmt: skip
    write_shapes_dataset(tmp_path / "base", base)
    more = ShapesConfig(**{**base.__dict__, "num_eval_vqa": 25})
    written = write_shapes_dataset(tmp_path / "more", more)
    for name in ("instructions.json", "text_instructions.json", "benchmarks/caption.jsonl",
                 "benchmarks/multiple_choice.jsonl"):  # fmt: skip
        assert (tmp_path / "base" / name).read_bytes() == (tmp_path / "more" / name).read_bytes()
    # captions.parquet: the same rows but for the folder in the file:// URLs
    base_rows = pq.read_table(tmp_path / "base" / "captions.parquet").drop(["url"])
    assert base_rows.equals(pq.read_table(tmp_path / "more" / "captions.parquet").drop(["url"]))
    vqa = _jsonl(tmp_path / "more" / "benchmarks" / "vqa.jsonl")
    assert len(vqa) == 25 and written.counts["eval_vqa"] == 25
    assert vqa[:6] == _jsonl(tmp_path / "base" / "benchmarks" / "vqa.jsonl")
    assert len({r["id"] for r in vqa}) == 25
    for record in vqa[6:]:
        assert f"benchmarks/{record['images'][0]}" in written.files
        assert (tmp_path / "more" / "benchmarks" / record["images"][0]).exists()
    with pytest.raises(ValueError, match="num_eval_vqa=3"):
        ShapesConfig(num_eval=6, num_eval_vqa=3)


def test_extra_vqa_scenes_avoid_every_training_layout(tmp_path):
    """One-shape scenes with every layout but one in training: each extra item shows that one."""
    from owl.data.shapes import SHAPES
    from owl.data.shapes_files import _extra_vqa

    keep = Shape("circle", "red", "left")
    trained = {frozenset({Shape(k, c, p)}) for k in SHAPES for c in COLOURS for p in POSITIONS}
    trained.discard(frozenset({keep}))
    cfg = ShapesConfig(max_shapes=1, num_eval=0, num_eval_vqa=12)
    records = _extra_vqa(tmp_path, cfg, trained, start=0)
    allowed = {(q, a) for _, q, a in qa_pairs(Scene((keep,), background=0, scale=0.25))}
    assert len(records) == 12
    assert all((r["question"], r["answers"][0]) in allowed for r in records)


def test_videos_are_off_by_default_and_leave_the_other_files_as_they_are(tmp_path, shapes_dir):
    from owl.data.video import sample_frames

    assert not (shapes_dir / "video_instructions.json").exists()
    cfg = ShapesConfig(**{**SMALL.__dict__, "num_videos": 6, "num_eval_videos": 4})
    written = write_shapes_dataset(tmp_path, cfg)
    plain = write_shapes_dataset(tmp_path / "plain", SMALL)
    for rel in plain.files:  # the image files are the same bytes with videos on
        if rel != "captions.parquet":
            assert (tmp_path / rel).read_bytes() == (shapes_dir / rel).read_bytes(), rel
    assert written.counts["videos"] == 6 and written.counts["eval_video_qa"] == 4
    again = write_shapes_dataset(tmp_path / "again", cfg)
    videos = [rel for rel in written.files if rel.endswith(".mp4")]
    assert len(videos) == 10 and again.files == written.files
    assert all((tmp_path / r).read_bytes() == (tmp_path / "again" / r).read_bytes() for r in videos)

    conversations = json.loads((tmp_path / "video_instructions.json").read_text())
    records = _jsonl(tmp_path / "benchmarks" / "video_qa.jsonl")
    asked = [(c["video"], c["conversations"][0]["value"], c["conversations"][1]["value"])
             for c in conversations]  # fmt: skip
    asked += [(f"benchmarks/{r['videos'][0]}", r["question"], r["answer"]) for r in records]
    assert all(r["type"] == "text" and r["prompt"] == "short_answer" for r in records)
    for video, question, direction in asked:
        assert "Which way does the" in question and direction in ("left", "right", "up", "down")
        # The shape's centre in the first and last sampled frame says which way it went.
        first, *_, last = sample_frames((tmp_path / video).read_bytes(), 4)
        (x0, y0), (x1, y1) = _centre(first), _centre(last)
        moved = {"right": x1 - x0, "left": x0 - x1, "down": y1 - y0, "up": y0 - y1}
        assert max(moved, key=moved.get) == direction and moved[direction] > 8
    assert conversations[0]["conversations"][0]["value"].startswith("<video>\n")
    trained = {(c["conversations"][0]["value"], c["conversations"][1]["value"])
               for c in conversations}  # fmt: skip
    held_out = {(r["question"] + " Answer the question using a single word or phrase.",
                 r["answer"]) for r in records}  # fmt: skip
    assert not trained & held_out  # held-out motions are not in the training conversations


def _centre(frame: Image.Image) -> tuple[float, float]:
    """Where the frame differs most from its background (its corner pixel): the shape."""
    import numpy as np

    array = np.asarray(frame).astype(int)
    differs = np.abs(array - array[0, 0]).sum(axis=2) > 60
    ys, xs = np.nonzero(differs)
    return float(xs.mean()), float(ys.mean())
