"""Tiny artefacts for the evaluation tests: a BPE tokenizer, a random debug-tiny model saved with
`save_model`, and one small benchmark file per type with images on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from owl.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from owl.model import OwlModel, get_config, save_model

CORPUS = [
    "USER: What colour is the shape? ASSISTANT: red",
    "Answer the question using a single word or phrase.",
    "Provide a one-sentence caption for the provided image.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer yes or no. yes no A B C D",
    "a red circle on the left, two blue squares, a green triangle at the top",
]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def make_tokenizer(directory: Path) -> Path:
    train_bpe_tokenizer(CORPUS * 4, vocab_size=300, out_dir=directory)
    return directory


def make_model(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random debug-tiny model whose vocabulary fits the tokenizer; `tokenizer/` copied in."""
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = get_config("debug-tiny", decoder={"vocab_size": len(tokenizer)})
    torch.manual_seed(seed)
    save_model(OwlModel(cfg), directory)
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    return directory


def make_benchmarks(directory: Path, num_per_type: int = 3) -> dict[str, Path]:
    """vqa, caption, multiple_choice, yes_no and text JSONL files with shared images."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i, name in enumerate(names):
        Image.new("RGB", (20 + 4 * i, 16), COLOURS[name]).save(directory / "images" / f"{name}.png")
    rows: dict[str, list[dict]] = {
        t: [] for t in ("vqa", "caption", "multiple_choice", "yes_no", "text")
    }
    for i in range(num_per_type):
        colour = names[i % len(names)]
        image = [f"images/{colour}.png"]
        rows["vqa"].append(
            {
                "id": f"v{i}",
                "type": "vqa",
                "images": image,
                "question": "What colour is the shape?",
                "answers": [colour] * 10,
            }
        )
        rows["caption"].append(
            {
                "id": f"c{i}",
                "type": "caption",
                "images": image,
                "references": [f"a {colour} square", f"{colour} square"],
            }
        )
        rows["multiple_choice"].append(
            {
                "id": f"m{i}",
                "type": "multiple_choice",
                "images": image,
                "question": "What colour is the shape?",
                "options": names,
                "answer": "ABC"[i % len(names)],
                "hint": "" if i % 2 else "Look at the image.",
            }
        )
        for answer in ("yes", "no"):
            asked = colour if answer == "yes" else names[(i + 1) % len(names)]
            rows["yes_no"].append(
                {
                    "id": f"y{i}{answer}",
                    "type": "yes_no",
                    "images": image,
                    "question": f"Is the shape {asked}?",
                    "answer": answer,
                    "pair_id": f"p{i}",
                }
            )
        rows["text"].append(
            {
                "id": f"t{i}",
                "type": "text",
                "images": [],
                "question": f"Say {colour}.",
                "answer": colour,
            }
        )
    paths = {}
    for record_type, records in rows.items():
        paths[record_type] = directory / f"{record_type}.jsonl"
        paths[record_type].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
