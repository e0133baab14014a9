"""jobs/owl2-llama2-7b.yaml rehearsed end to end through the real `owl` command.

The job file is used as it is; `--set` gives it paths to data this test writes in the formats
users bring, a miniature `model.overrides`, and the cluster's scale (workers, CPUs, GPUs,
stage-1 micro-batch, steps: the recipe's 64 GPUs and 40000 steps do not fit CI). Everything else is the
recipe's: learning rates, ZeRO stages, gradient accumulation, activation checkpointing,
layer-wise LR decay, max lengths, image size and resize mode, filter rules.

Data: tiny Hugging Face CLIP and LLaMA folders saved by transformers (the LLaMA folder carries
the tokenizer), a LAION-style parquet of http URLs served on loopback by this test, LLaVA-style
JSON with multi-turn, multi-image and text-only samples, VQAv2 and MMBench files in their
official schemas.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
JOB = "jobs/owl2-llama2-7b.yaml"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = ("square", "bar")
VISION_LAYERS = 2
MINIATURE = {
    "vision": {"image_size": 64, "patch_size": 8, "width": 32, "num_layers": VISION_LAYERS,
               "num_heads": 2, "mlp_dim": 64},
    "abstractor": {"num_queries": 4, "width": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64},
    "decoder": {"vocab_size": 320, "hidden": 64, "num_layers": 2, "num_heads": 4,
                "num_kv_heads": 2, "ffn_dim": 96},
}  # fmt: skip


def _picture(colour: str, shape: str, shift: int = 0, size: int = 256) -> bytes:
    """A shape on white; `shift` moves it (distinct images: the filter drops duplicates)."""
    image = np.full((size, size, 3), 245, dtype=np.uint8)
    if shape == "square":
        image[40 + shift : 168 + shift, 64:192] = COLOURS[colour]
    else:
        image[60 + shift : 116 + shift, 16:240] = COLOURS[colour]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _Images(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        colour, shape, shift = (self.path.strip("/").removesuffix(".png").split("-") + ["", ""])[:3]
        if colour not in COLOURS or shape not in SHAPES or not shift.isdigit():
            self.send_error(404)
            return
        body = _picture(colour, shape, int(shift))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _pretrained(root: Path, texts: list[str]) -> dict[str, str]:
    from owl.data.tokenize import train_bpe_tokenizer
    from tests.unit import tiny_pretrained

    clip, llama = root / "clip-vit-large-patch14", root / "llama-2-7b"
    tiny_pretrained.save_clip_and_llama(clip, llama, vision_layers=VISION_LAYERS, vocab_size=320)
    train_bpe_tokenizer(texts, vocab_size=300, out_dir=llama)
    return {"clip": str(clip), "llama": str(llama)}


def _laion(root: Path, base: str) -> tuple[Path, list[str]]:
    rows = [
        {"url": f"{base}/{c}-{s}-{shift}.png", "caption": f"a {c} {s} on a white background",
         "punsafe": 0.01, "pwatermark": 0.02}
        for shift in range(0, 88, 8) for c in COLOURS for s in SHAPES
    ]  # fmt: skip
    folder = root / "owl2-pretrain-urls"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "laion-part-00000.parquet")
    return folder, [r["caption"] for r in rows]


def _llava(root: Path) -> tuple[Path, Path, list[str]]:
    images = root / "llava" / "images" / "coco" / "train2017"
    images.mkdir(parents=True)
    names = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        name = f"{i:012d}.jpg"
        Image.open(io.BytesIO(_picture(colour, shape))).convert("RGB").save(images / name)
        names.append((f"coco/train2017/{name}", colour, shape))
    records = []  # enough to fill more rows of 2048 tokens than 2 workers x 2 rows need
    for k, (path, colour, shape) in enumerate(names * 10):
        records.append({  # multi-turn, one image
            "id": f"mt{k}", "image": path,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": f"It is {colour}."},
                {"from": "human", "value": "And what shape is it?"},
                {"from": "gpt", "value": f"A {shape}."},
            ],
        })  # fmt: skip
        other = names[(k + 1) % len(names)]
        records.append({  # two images in one sample
            "id": f"mi{k}", "image": [path, other[0]],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nDo they have the same colour?"},
                {"from": "gpt", "value": "Yes." if other[1] == colour else "No."},
            ],
        })  # fmt: skip
        records.append({  # text only, as the 665k mix holds ShareGPT conversations
            "id": f"t{k}",
            "conversations": [
                {"from": "human", "value": f"Name a {colour} thing."},
                {"from": "gpt", "value": f"A {colour} {shape}."},
            ],
        })  # fmt: skip
    path = root / "llava" / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records))
    texts = [turn["value"].replace("<image>", " ") for r in records for turn in r["conversations"]]
    return path, root / "llava" / "images", texts


def _owl(*args: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, f"owl {' '.join(args)} failed:\n{proc.stderr[-8000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    from tests.unit import official_files

    root = tmp_path_factory.mktemp("owl2-recipe")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        urls, captions = _laion(root, f"http://127.0.0.1:{server.server_port}")
        instructions, image_folder, texts = _llava(root)
        pretrained = _pretrained(root / "weights", captions + texts)
        bench = root / "bench"
        official_files.write_vqav2(bench / "vqav2")
        official_files.write_mmbench(bench / "mmbench")
        vqav2 = bench / "vqav2"
        benchmarks = [
            f"vqav2_val=vqav2:{vqav2}/v2_OpenEnded_mscoco_val2014_questions.json,"
            f"{vqav2}/v2_mscoco_val2014_annotations.json,{vqav2}/val2014",
            f"mmbench_dev=mmbench:{next((bench / 'mmbench').glob('*.tsv'))}",
        ]
        scale = {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0}
        sets = {
            "storage": str(root / "storage"),
            "model.pretrained.clip": pretrained["clip"],
            "model.pretrained.llama": pretrained["llama"],
            "model.overrides": MINIATURE,
            "download.url_list": str(urls),
            "download.processes_count": 1,
            "download.thread_count": 4,
            "tokenizer.path": pretrained["llama"],
            "tokenize_instructions.sources": [
                {"format": "llava", "path": str(instructions), "image_folder": str(image_folder)}
            ],
            "stage1": {**scale, "micro_batch_size": 2, "max_steps": 2},
            "stage2": {**scale, "max_steps": 2},
            "evaluate.benchmarks": benchmarks,
            "evaluate.num_workers": 1,
            "evaluate.gpus_per_worker": 0,
        }
        args = []
        for key, value in sets.items():
            if isinstance(value, dict) and key in ("stage1", "stage2"):
                args += [a for k, v in value.items() for a in ("--set", f"{key}.{k}={v}")]
            else:
                text = (
                    value
                    if isinstance(value, str)
                    else yaml.safe_dump(value, default_flow_style=True).strip()
                )
                args += ["--set", f"{key}={text}"]
        result = _owl("run", JOB, *args)
        status = _owl("status", JOB, *args)
        audit = _owl("audit", "model", "owl2-llama2-7b@current", "--job", JOB, *args)
    finally:
        server.shutdown()
    return root / "storage", result, status, audit


def _manifest(storage: Path, status: dict, step: str) -> tuple[Path, dict]:
    key = next(s["key"] for s in status["steps"] if s["step"] == step)
    out = storage / "steps" / step / key
    return out, json.loads((out / "manifest.json").read_text())


def test_the_recipe_runs_every_step_and_registers(rehearsal) -> None:
    _, result, status, _ = rehearsal
    assert result["ok"], result["error"]
    states = {s["step"]: s["state"] for s in result["steps"]}
    assert set(states.values()) == {"done"}
    assert {"init", "download", "filter", "tokenizer", "stage1", "stage2", "evaluate",
            "export"} <= set(states)  # fmt: skip
    assert result["registered_model"]["name"] == "owl2-llama2-7b"
    assert any(k.startswith("vqav2_val.") for k in result["metrics"])
    assert any(k.startswith("mmbench_dev.") for k in result["metrics"])


def test_stage1_freezes_the_language_model_and_trains_the_vision_side(rehearsal) -> None:
    from owl.model import load_model

    storage, _, status, _ = rehearsal
    init = load_model(_manifest(storage, status, "init")[0] / "model").state_dict()
    stage1_dir, stage1 = _manifest(storage, status, "stage1")
    trained = load_model(stage1_dir / "model").state_dict()
    same = {k for k in init if torch.equal(init[k], trained[k])}
    text = {k for k in init if k.startswith("decoder.") and "_visual" not in k}
    assert text and text <= same  # the language model bit for bit
    for prefix in ("vision.", "abstractor."):
        assert any(k.startswith(prefix) and k not in same for k in init)
    visual = {k for k in init if "_visual" in k}
    assert visual and not visual <= same  # Owl2's visual MAM copies moved
    engine = stage1["info"]["deepspeed"]
    assert engine["zero_stage"] == 2 and engine["gradient_accumulation_steps"] == 4


def test_stage2_runs_zero3_with_layerwise_decay_inside_deepspeed(rehearsal) -> None:
    storage, _, status, _ = rehearsal
    _, stage2 = _manifest(storage, status, "stage2")
    engine = stage2["info"]["deepspeed"]
    assert engine["zero_stage"] == 3 and engine["gradient_accumulation_steps"] == 8
    lrs = sorted({round(g["initial_lr"], 12) for g in engine["param_groups"]}, reverse=True)
    base = (
        2.0e-5  # the recipe's stage-2 lr; ViT depth d gets 0.9 ** d (post-norm 0, embeddings L+1)
    )
    expected = [round(base * 0.9**d, 12) for d in range(VISION_LAYERS + 2)]
    assert lrs == expected
    assert stage2["stats"]["parameters_held_rank0"] < 0.6 * sum(
        g["total"] for g in stage2["info"]["trainable_parameters"].values()
    )


def test_export_and_audit_reach_the_url_list_and_pretrained_folders(rehearsal) -> None:
    storage, _, status, audit = rehearsal
    export_dir, _ = _manifest(storage, status, "export")
    assert (export_dir / "model" / "README.md").exists()
    chain = json.dumps(audit)
    assert "download" in chain and "stage1" in chain and "stage2" in chain
    assert "pretrained.clip" in chain and "pretrained.llama" in chain
