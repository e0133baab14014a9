"""Tiny files in each benchmark's official schema (written here, nothing downloaded), named as
their owners name them, so docs/benchmarks.md's commands run as written in a folder of them."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from owl.data.video import encode_video


def _image(path: Path, colour=(200, 40, 40), fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, fmt)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_vqav2(root: Path) -> None:
    for image_id in (42, 73):
        _image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    _json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "What colour is it?", "question_id": 42000},
            {"image_id": 73, "question": "How many?", "question_id": 73001},
        ],
    })  # fmt: skip
    answers = {42000: ["red"] * 9 + ["dark red"], 73001: ["2"] * 6 + ["two"] * 4}
    _json(root / "v2_mscoco_val2014_annotations.json", {
        "info": {}, "license": {}, "data_subtype": "val2014",
        "annotations": [
            {"question_id": qid, "image_id": qid // 1000, "question_type": "what",
             "answer_type": "other", "multiple_choice_answer": a[0],
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1}
                         for i, x in enumerate(a)]}
            for qid, a in answers.items()
        ],
    })  # fmt: skip
    _image(root / "test2015" / "COCO_test2015_000000000007.jpg")
    _json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {
        "data_subtype": "test-dev2015",
        "questions": [{"image_id": 7, "question": "Is it red?", "question_id": 7005}],
    })  # fmt: skip


def write_okvqa(root: Path) -> None:
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    _json(root / "OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014",
        "questions": [{"image_id": 42, "question": "What sport?", "question_id": 420}],
    })  # fmt: skip
    _json(root / "mscoco_val2014_annotations.json", {
        "annotations": [{"question_id": 420, "image_id": 42, "answers": [
            {"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": i}
            for i, a in enumerate(["tennis"] * 10, start=1)]}],
    })  # fmt: skip


def write_mmbench(
    root: Path, with_answers: bool = True, name: str = "mmbench_dev_20230712.tsv"
) -> None:
    png = base64.b64encode(_image(root / "_tmp.png", (10, 200, 10), "PNG")).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
              "source", "l2-category", "comment", "split"]  # fmt: skip
    rows = [
        [0, "What colour?", "nan", "red", "green", "", "", "B", "color", png, "x", "attr", "", "dev"],
        [1, "Which shape?", "A drawing.", "circle", "square", "star", "", "A", "shape", png,
         "x", "attr", "", "dev"],
        [1000001, "Which shape?", "A drawing.", "square", "star", "circle", "", "C", "shape",
         "1", "x", "attr", "", "dev"],
    ]  # fmt: skip
    if not with_answers:
        header.remove("answer")
        rows = [r[:7] + r[8:] for r in rows]
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in r) for r in rows]
    (root / name).write_text("\n".join(lines) + "\n")


def write_mme(root: Path) -> None:
    base = root / "MME_Benchmark_release_version"
    _image(base / "existence" / "000000006040.jpg")
    (base / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    _image(base / "artwork" / "images" / "10002.jpg")
    (base / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (base / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Hals? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n"
    )


def write_pope(root: Path) -> None:
    _image(root / "val2014" / "COCO_val2014_000000310196.jpg")
    lines = [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a snowboard in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a dog in the image?", "label": "no"},
    ]  # fmt: skip
    (root / "coco_pope_adversarial.json").write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_all(root: Path) -> None:
    write_vqav2(root)
    write_mmbench(root)
    write_mme(root)
    write_pope(root)
    write_msrvtt_qa(root)
    write_msvd_qa(root)


def write_textvqa(root: Path) -> str:
    _image(root / "train_images/abc123.jpg")
    _json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "abc123", "question": "What brand?",
         "answers": ["nokia"] * 10, "image_classes": []}]})  # fmt: skip
    return f"textvqa:{root}/TextVQA_0.5.1_val.json,{root}/train_images"


def write_vizwiz(root: Path) -> str:
    _image(root / "val/VizWiz_val_00000001.jpg")
    _json(root / "val.json", [{"image": "VizWiz_val_00000001.jpg", "question": "What?",
          "answerable": 1, "answer_type": "other",
          "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10}])  # fmt: skip
    return f"vizwiz:{root}/val.json,{root}/val"


def write_gqa(root: Path) -> str:
    _image(root / "images/n161313.jpg")
    _json(root / "testdev_balanced_questions.json", {"20968379": {
        "imageId": "n161313", "question": "Is the sky blue?", "answer": "yes",
        "fullAnswer": "Yes, the sky is blue.", "isBalanced": True}})  # fmt: skip
    return f"gqa:{root}/testdev_balanced_questions.json,{root}/images"


def write_scienceqa(root: Path) -> str:
    _image(root / "images/test/5/image.png", fmt="PNG")
    _json(root / "problems.json", {
        "5": {"question": "Which is a mammal?", "choices": ["frog", "cat", "fish"], "answer": 1,
              "hint": "Look at the picture.", "image": "image.png", "split": "test",
              "task": "closed choice", "grade": "grade3", "subject": "natural science",
              "topic": "biology", "category": "Classification", "skill": "Identify mammals",
              "lecture": "", "solution": ""},
        "6": {"question": "No image.", "choices": ["a", "b"], "answer": 0, "hint": "",
              "image": None, "split": "test"},
        "7": {"question": "Train.", "choices": ["a", "b"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train"}})  # fmt: skip
    return f"scienceqa:{root}/problems.json,{root}/images"


def write_seed(root: Path) -> str:
    _image(root / "SEED-Bench-image/1454426_2591111986.jpg")
    _json(root / "SEED-Bench.json", {"question_type": {"Instances Counting": 5}, "questions": [
        {"answer": "C", "choice_a": "one", "choice_b": "two", "choice_c": "three",
         "choice_d": "four", "data_id": "1454426_2591111986.jpg", "data_type": "image",
         "question": "How many towels?", "question_id": "101669", "question_type_id": 5},
        {"answer": "A", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
         "data_id": "v1.mp4", "data_type": "video", "question": "?", "question_id": "9",
         "question_type_id": 10}]})  # fmt: skip
    return f"seed:{root}/SEED-Bench.json,{root}/SEED-Bench-image"


def write_coco_karpathy(root: Path) -> str:
    _image(root / "val2014/COCO_val2014_000000391895.jpg")
    _json(root / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
         "split": "test", "cocoid": 391895, "sentids": [0, 1],
         "sentences": [{"raw": "A man rides a bike.", "tokens": []},
                       {"raw": "A cyclist on a road.", "tokens": []}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "imgid": 1,
         "split": "train", "cocoid": 1, "sentences": [{"raw": "x"}]}]})  # fmt: skip
    return f"coco_karpathy:{root}/dataset_coco.json,{root}"


def write_flickr30k(root: Path) -> str:
    _image(root / "images/1000092795.jpg")
    _json(root / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test",
         "sentences": [{"raw": "Two young guys."}]}]})  # fmt: skip
    return f"flickr30k:{root}/dataset_flickr30k.json,{root}/images"


def write_nocaps(root: Path) -> str:
    _image(root / "val/0013ea2087020901.jpg")
    _json(root / "nocaps_val_4500_captions.json", {
        "images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain"}],
        "annotations": [{"image_id": 0, "id": 0, "caption": "A dog."},
                        {"image_id": 0, "id": 1, "caption": "A brown dog."}]})  # fmt: skip
    return f"nocaps:{root}/nocaps_val_4500_captions.json,{root}/val"


def _video(path: Path, container: str) -> None:
    """A 6-frame clip of a square moving right."""
    frames = []
    for i in range(6):
        frame = Image.new("RGB", (32, 24), (255, 255, 255))
        ImageDraw.Draw(frame).rectangle((4 * i, 8, 4 * i + 7, 15), fill=(40, 80, 220))
        frames.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(frames, container))


def write_msrvtt_qa(root: Path) -> str:
    """MSRVTT-QA's MSRVTT-QA/test_qa.json and MSR-VTT's TestVideo/video<N>.mp4 files."""
    for video_id in (7010, 7011):
        _video(root / "TestVideo" / f"video{video_id}.mp4", "mp4")
    _json(root / "MSRVTT-QA" / "test_qa.json", [
        {"answer": "square", "category_id": 0, "id": 158581, "question": "what is moving?",
         "video_id": 7010},
        {"answer": "right", "category_id": 0, "id": 158582, "question": "where does it go?",
         "video_id": 7011},
    ])  # fmt: skip
    return f"msrvtt_qa:{root}/MSRVTT-QA/test_qa.json,{root}/TestVideo"


def write_msvd_qa(root: Path) -> str:
    """MSVD-QA's test_qa.json and youtube_mapping.txt (in MSVD-QA/), MSVD's YouTubeClips/*.avi."""
    _video(root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi", "avi")
    _video(root / "YouTubeClips" / "zzit5b_-ukg_5_20.avi", "avi")
    _json(root / "MSVD-QA" / "test_qa.json", [
        {"answer": "man", "id": 30933, "question": "who pours liquid?", "video_id": 1970},
        {"answer": "square", "id": 30934, "question": "what moves?", "video_id": 1},
    ])  # fmt: skip
    mapping = root / "MSVD-QA" / "youtube_mapping.txt"
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\nzzit5b_-ukg_5_20 vid1970\n")
    return f"msvd_qa:{root}/MSVD-QA/test_qa.json,{mapping},{root}/YouTubeClips"


def every_kind(root: Path) -> dict[str, str]:
    """A spec per importer kind, over files written under `root` (one folder per kind)."""
    write_vqav2(root / "vqav2")
    write_okvqa(root / "okvqa")
    write_mmbench(root / "mmbench")
    write_mme(root / "mme")
    write_pope(root / "pope")
    v, o = root / "vqav2", root / "okvqa"
    return {
        "vqav2": f"vqav2:{v}/v2_OpenEnded_mscoco_val2014_questions.json,"
        f"{v}/v2_mscoco_val2014_annotations.json,{v}/val2014",
        "okvqa": f"okvqa:{o}/OpenEnded_mscoco_val2014_questions.json,"
        f"{o}/mscoco_val2014_annotations.json,{o}/val2014",
        "mmbench": f"mmbench:{root}/mmbench/mmbench_dev_20230712.tsv",
        "mme": f"mme:{root}/mme/MME_Benchmark_release_version",
        "pope": f"pope:{root}/pope/coco_pope_adversarial.json,{root}/pope/val2014",
        "textvqa": write_textvqa(root / "textvqa"),
        "vizwiz": write_vizwiz(root / "vizwiz"),
        "gqa": write_gqa(root / "gqa"),
        "scienceqa": write_scienceqa(root / "scienceqa"),
        "seed": write_seed(root / "seed"),
        "coco_karpathy": write_coco_karpathy(root / "coco"),
        "flickr30k": write_flickr30k(root / "flickr30k"),
        "nocaps": write_nocaps(root / "nocaps"),
        "msrvtt_qa": write_msrvtt_qa(root / "msrvtt_qa"),
        "msvd_qa": write_msvd_qa(root / "msvd_qa"),
    }
