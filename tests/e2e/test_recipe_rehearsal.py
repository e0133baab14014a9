"""The 7B recipes, jobs/owl2-llama2-7b.yaml and jobs/owl1-llama-7b.yaml, rehearsed end to end
through the real `owl` command.

Each job file is used as it is; `--set` gives it paths to data this test writes in the formats
users bring, a miniature `model.overrides`, and the cluster's scale (workers, CPUs, GPUs,
stage-1 micro-batch, steps: the recipes' 64 GPUs and tens of thousands of steps do not fit CI).
Everything else is the recipe's: learning rates, ZeRO stages, gradient accumulation, activation
checkpointing, layer-wise LR decay (Owl2), LoRA and the abstractor trained beside it (Owl1), max
lengths, image size and resize mode, filter rules.

Data, written once for both recipes: tiny Hugging Face CLIP and LLaMA folders saved by
transformers (the LLaMA folder carries the tokenizer), a LAION-style parquet of http URLs served
on loopback by this test, LLaVA-style JSON with multi-turn, multi-image and text-only samples,
ShareGPT and Alpaca text instructions (each recipe's stage 2 mixes the LLaVA-style data with them,
a second tokenize step, as its job file declares), and every benchmark of each recipe's evaluate section as
written, in its official schema, at the recipe's paths moved under the test's folder. The
two `owl run`s go at the same time (each with its own local Ray), so CI pays for the slower one
plus what they contend for, not for both in a row.
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
JOBS = {"owl2": "jobs/owl2-llama2-7b.yaml", "owl1": "jobs/owl1-llama-7b.yaml"}
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = ("square", "bar")
VISION_LAYERS = 2
LLAVA_REPEATS = 60  # 6 images x 60 x 3 records (multi-turn, two images, text only)
SHARED = "/mnt/shared"  # where the recipes' benchmark files live; the test writes its own there
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


def _laion(root: Path, base: str) -> tuple[Path, list[str]]:
    rows = [
        {"url": f"{base}/{c}-{s}-{shift}.png", "caption": f"a {c} {s} on a white background",
         "punsafe": 0.01, "pwatermark": 0.02}
        for shift in range(0, 88, 8) for c in COLOURS for s in SHAPES
    ]  # fmt: skip
    folder = root / "pretrain-urls"
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
    # Enough records that Owl2's stage 2, run by its `epochs: 1` (no max_steps), makes at least 2
    # optimizer steps of 2 workers x micro-batch 2 x grad_accum 8 rows (~4 with the text-only mix;
    # 240 repeats made 16 steps, 154 s of the test's ~300 s).
    records = []
    for k, (path, colour, shape) in enumerate(names * LLAVA_REPEATS):
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


def _text_instructions(root: Path) -> tuple[Path, Path, list[str]]:
    """ShareGPT conversations (Vicuna's, Baize's format) and Alpaca records, as Owl1's stage 2
    mixes them with LLaVA."""
    sharegpt, alpaca = [], []
    for k, colour in enumerate(list(COLOURS) * 4):
        sharegpt.append({
            "id": f"sg{k}",
            "conversations": [
                {"from": "human", "value": f"What colour is a {colour} square?"},
                {"from": "gpt", "value": f"It is {colour}."},
                {"from": "human", "value": "Say it again."},
                {"from": "gpt", "value": f"{colour}."},
            ],
        })  # fmt: skip
        alpaca.append({"instruction": f"Name a {colour} shape.", "input": "",
                       "output": f"A {colour} bar."})  # fmt: skip
    folder = root / "text"
    folder.mkdir()
    (folder / "sharegpt_90k.json").write_text(json.dumps(sharegpt))
    (folder / "alpaca_data.json").write_text(json.dumps(alpaca))
    texts = [t["value"] for r in sharegpt for t in r["conversations"]]
    texts += [f"{r['instruction']} {r['output']}" for r in alpaca]
    return folder / "sharegpt_90k.json", folder / "alpaca_data.json", texts


def _args(sets: dict) -> list[str]:
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
    return args


def _owl_all(commands: dict[str, list[str]], logs: Path) -> dict[str, dict]:
    """`owl ARGS --json` for every entry at the same time; each with its own Ray temp folder
    (two local clusters side by side), its output in `logs/`."""
    import contextlib
    import shutil
    import tempfile

    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:
        procs = {}
        for name, args in commands.items():
            ray_tmp = tempfile.mkdtemp(prefix=f"r{name}-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
            files.callback(shutil.rmtree, ray_tmp, ignore_errors=True)  # after the runs end
            env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp)
            out = files.enter_context(open(logs / f"{name}.json", "w"))
            err = files.enter_context(open(logs / f"{name}.err", "w"))
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pipelines.cli", *args, "--json"],
                cwd=ROOT, env=env, stdout=out, stderr=err,
            )  # fmt: skip
        for proc in procs.values():
            proc.wait()
    results = {}
    for name, proc in procs.items():
        stdout, stderr = ((logs / f"{name}.{ext}").read_text() for ext in ("json", "err"))
        assert proc.returncode == 0, (
            f"owl {commands[name][:2]} ({name}) failed:\n{stderr[-6000:]}\n{stdout[-3000:]}"
        )
        results[name] = json.loads(stdout)
    return results


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, object]:
    """Everything both recipes read, written once; the image server runs for the module."""
    from owl.data.tokenizer import train_bpe_tokenizer
    from tests.unit import official_files, tiny_pretrained

    root = tmp_path_factory.mktemp("recipes")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        urls, captions = _laion(root, f"http://127.0.0.1:{server.server_port}")
        instructions, image_folder, texts = _llava(root)
        sharegpt, alpaca, more_texts = _text_instructions(root)
        weights = root / "weights"
        clip = weights / "clip-vit-large-patch14"
        # Owl2's miniature keeps grouped KV heads (2 of 4); Owl1's has none (see _miniature), so
        # its LLaMA folder has as many KV heads as heads: the init step checks they agree.
        llama = {"owl2": weights / "llama-2-7b", "owl1": weights / "llama-7b"}
        for variant, folder in llama.items():
            tiny_pretrained.save_clip_and_llama(
                clip, folder, vision_layers=VISION_LAYERS, vocab_size=320,
                num_kv_heads=_miniature(variant)["decoder"]["num_kv_heads"],
            )  # fmt: skip
            train_bpe_tokenizer(captions + texts + more_texts, vocab_size=300, out_dir=folder)
        official = official_files.every_kind(root / "official")
        yield {
            "root": root,
            "clip": str(clip),
            "llama": {variant: str(folder) for variant, folder in llama.items()},
            "urls": str(urls),
            "llava": {
                "format": "llava",
                "path": str(instructions),
                "image_folder": str(image_folder),
            },
            "sharegpt": {"format": "sharegpt", "path": str(sharegpt)},
            "alpaca": {"format": "alpaca", "path": str(alpaca)},
            "benchmarks": {v: _recipe_benchmarks(JOBS[v], root, official) for v in JOBS},
        }
    finally:
        server.shutdown()


def _miniature(variant: str) -> dict:
    """Owl2 keeps grouped KV heads; Owl1's release layout refuses them (transformers 4.28.1's
    LLaMA, which the authors' Owl1 runs on, has none), and its export writes that layout."""
    if variant == "owl2":
        return MINIATURE
    decoder = {**MINIATURE["decoder"], "num_kv_heads": MINIATURE["decoder"]["num_heads"]}
    return {**MINIATURE, "decoder": decoder}


def _recipe_benchmarks(job: str, root: Path, official: dict[str, str]) -> list[str]:
    """The recipe's `evaluate.benchmarks` as written, its SHARED mount point moved under `root`,
    with a tiny official file (or folder) written at every path it names: the one of the same
    name among `official` (tests/unit/official_files.py, a folder per kind)."""
    import shutil

    from owl.eval.importers import parse_spec

    entries = yaml.safe_load((ROOT / job).read_text())["evaluate"]["benchmarks"]
    moved = [entry.replace(SHARED, str(root / "shared")) for entry in entries]
    for entry in moved:
        _, kind, paths = parse_spec(entry)
        source = Path(official[kind].split(":", 1)[1].split(",")[0]).parent
        for path in map(Path, paths):
            found = source if source.name == path.name else next(source.rglob(path.name))
            if found.is_dir():  # folders shared by benchmarks (COCO's val2014) are merged
                shutil.copytree(found, path, dirs_exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(found, path)
    return moved


def _sets(data: dict, variant: str) -> dict:
    scale = {  # each key a field of the stage (`--set stage1.resources.num_workers=2`)
        "resources.num_workers": 2,
        "resources.cpus_per_worker": 1,
        "resources.gpus_per_worker": 0,
    }
    text_sources = {  # the recipes' text-only instructions, in the formats they name
        "owl2": [data["sharegpt"]],
        "owl1": [data["alpaca"], data["sharegpt"]],
    }[variant]
    return {
        "storage": str(data["root"] / f"storage-{variant}"),
        "model.pretrained.clip": data["clip"],
        "model.pretrained.llama": data["llama"][variant],
        "model.overrides": _miniature(variant),
        "download.url_list": data["urls"],
        "download.processes_count": 1,
        "download.thread_count": 4,
        "tokenizer.path": data["llama"][variant],
        # stage 2 mixes two datasets (the recipe's weights): multimodal and text-only
        "tokenize_instructions.sources": [data["llava"]],
        "tokenize_text.sources": text_sources,
        "stage1": {**scale, "batch.micro_batch_size": 2, "schedule.max_steps": 2},
        # Owl2's stage 2 runs by the recipe's epochs and warmup_ratio; Owl1's (LoRA) by steps.
        "stage2": {**scale, **({} if variant == "owl2" else {"schedule.max_steps": 2})},
        "evaluate.benchmarks": data["benchmarks"][variant],
        "evaluate.num_workers": 1,
        "evaluate.gpus_per_worker": 0,
    }


@pytest.fixture(scope="module")
def recipes(data) -> dict[str, dict]:
    """Both recipes run (at the same time), then each model's audit: {variant: {storage, result,
    audit}}. Step durations are printed (pytest -s shows them)."""
    import time

    args = {variant: _args(_sets(data, variant)) for variant in JOBS}
    started = time.monotonic()
    runs = _owl_all({v: ["run", JOBS[v], *args[v]] for v in JOBS}, data["root"] / "logs" / "run")
    ran = time.monotonic() - started
    audits = _owl_all(
        {v: ["audit", "model", f"{Path(JOBS[v]).stem}@current", "--job", JOBS[v], *args[v]]
         for v in JOBS},
        data["root"] / "logs" / "audit",
    )  # fmt: skip
    print(
        f"\nrecipes: both `owl run`s {ran:.0f} s, audits {time.monotonic() - started - ran:.0f} s"
    )
    for variant, result in runs.items():
        steps = " ".join(f"{s['step']}={s['duration_s']:.0f}" for s in result["steps"])
        print(f"  {variant}: {steps}")
    return {
        v: {"storage": data["root"] / f"storage-{v}", "result": runs[v], "audit": audits[v]}
        for v in JOBS
    }


def _manifest(run: dict, step: str) -> tuple[Path, dict]:
    key = next(s["key"] for s in run["result"]["steps"] if s["step"] == step)
    out = run["storage"] / "steps" / step / key
    return out, json.loads((out / "manifest.json").read_text())


def _state(run: dict, step: str) -> dict[str, torch.Tensor]:
    from owl.model import load_model

    return load_model(_manifest(run, step)[0] / "model").state_dict()


@pytest.mark.parametrize("variant", list(JOBS))
def test_the_recipe_runs_every_step_and_registers(recipes, variant: str) -> None:
    result = recipes[variant]["result"]
    assert result["ok"], result["error"]
    states = {s["step"]: s["state"] for s in result["steps"]}
    assert set(states.values()) == {"done"}
    assert {"init", "download", "filter", "tokenizer", "stage1", "stage2", "evaluate",
            "export"} <= set(states)  # fmt: skip
    assert result["registered_model"]["name"] == Path(JOBS[variant]).stem


RECIPE_METRICS = {  # per benchmark the recipe lists: a metric its kind must report
    "vqav2_testdev": "vqa.unanswered", "vqav2_val": "vqa.accuracy",
    "okvqa_val": "vqa.accuracy_ci95_low", "gqa_testdev": "text.accuracy",
    "textvqa_val": "vqa.accuracy", "coco_karpathy_test": "caption.CIDEr",
    "flickr30k_test": "caption.METEOR", "mmbench_dev": "multiple_choice.circular_accuracy",
    "mme": "yes_no.perception",
}  # fmt: skip


@pytest.mark.parametrize("variant", list(JOBS))
def test_the_recipes_own_benchmarks_are_evaluated(recipes, data, variant: str) -> None:
    """Every benchmark of the recipe's evaluate section, imported from official files and
    scored with its owners' metric (official PTB tokenizer and METEOR: Java is present)."""
    names = [entry.split("=", 1)[0] for entry in data["benchmarks"][variant]]
    metrics = recipes[variant]["result"]["metrics"]
    assert len(names) >= 4
    for name in names:
        assert f"{name}.{RECIPE_METRICS[name]}" in metrics, (name, sorted(metrics)[:20])
    if "vqav2_testdev" in names:
        out, manifest = _manifest(recipes[variant], "evaluate")
        assert "submissions/vqav2_testdev.json" in manifest["artifacts"]
        assert (
            json.loads((out / "submissions" / "vqav2_testdev.json").read_text())[0]["question_id"]
            == 7005
        )


def test_owl2_stage2_runs_by_epochs_and_warmup_ratio(recipes) -> None:
    _, stage2 = _manifest(recipes["owl2"], "stage2")
    schedule = stage2["info"]["train_config"]["schedule"]
    assert (schedule["max_steps"], schedule["epochs"], schedule["warmup_ratio"]) == (0, 1, 0.03)
    assert stage2["stats"]["steps"] >= 2  # one pass over the packed rows, in optimizer steps


@pytest.mark.parametrize("variant", list(JOBS))
def test_stage1_freezes_the_language_model_and_trains_the_vision_side(recipes, variant) -> None:
    run = recipes[variant]
    init, trained = _state(run, "init"), _state(run, "stage1")
    same = {k for k in init if torch.equal(init[k], trained[k])}
    text = {k for k in init if k.startswith("decoder.") and "_visual" not in k}
    assert text and text <= same  # the language model bit for bit
    for prefix in ("vision.", "abstractor."):
        assert any(k.startswith(prefix) and k not in same for k in init)
    visual = {k for k in init if "_visual" in k}
    if variant == "owl2":
        assert visual and not visual <= same  # Owl2's visual MAM copies moved
    else:
        assert not visual  # Owl1 has no modality-adaptive module
    engine = _manifest(run, "stage1")[1]["info"]["deepspeed"]
    accum = yaml.safe_load((ROOT / JOBS[variant]).read_text())["stage1"]["batch"]["grad_accum"]
    assert accum == 8  # the recipes' stage-1 accumulation (Owl2's micro 16 x 8 fits a 40 GB A100)
    assert engine["zero_stage"] == 2 and engine["gradient_accumulation_steps"] == accum


def test_owl2_stage2_runs_zero3_with_layerwise_decay_inside_deepspeed(recipes) -> None:
    _, stage2 = _manifest(recipes["owl2"], "stage2")
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


def test_owl1_stage2_lora_changes_only_adapters_and_the_abstractor(recipes) -> None:
    """The recipe's LoRA (r=8, alpha=32 on q/v) with the abstractor trained beside it (the paper):
    the exported weights (the adapters merged, the recipe's default) differ from stage 1's only in
    the abstractor and the q/v projections; the peft adapter folder loads with peft itself on the
    stage-1 model and gives the exported model's logits."""
    from peft import PeftModel

    from owl import IMAGE_TOKEN_ID
    from owl.model import load_model
    from owl.model.lora import ADAPTER_CONFIG

    run = recipes["owl1"]
    stage2_dir, stage2 = _manifest(run, "stage2")
    engine = stage2["info"]["deepspeed"]
    assert engine["zero_stage"] == 2 and engine["gradient_accumulation_steps"] == 8
    table = stage2["info"]["trainable_parameters"]
    assert table["lora"]["trainable"] > 0
    assert table["abstractor"]["trainable"] == table["abstractor"]["total"] > 0
    assert table["vision"]["trainable"] == table["decoder_text"]["trainable"] == 0
    start, merged = _state(run, "stage1"), _state(run, "stage2")
    assert start.keys() == merged.keys()
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    lora = {k for k in changed if k.endswith((".attn.q_proj.weight", ".attn.v_proj.weight"))}
    assert lora and any(k.startswith("abstractor.") for k in changed)
    assert changed - lora <= {k for k in start if k.startswith("abstractor.")}

    export_dir, _ = _manifest(run, "export")
    adapter = export_dir / "model" / "adapter"
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (8, 32, ["abstractor"])
    base = load_model(_manifest(run, "stage1")[0] / "model")
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    exported = load_model(export_dir / "model").eval()
    k = exported.cfg.num_visual_tokens
    ids = torch.randint(3, 300, (1, k + 12), generator=torch.Generator().manual_seed(0))
    ids[0, 2 : 2 + k] = IMAGE_TOKEN_ID
    size = exported.cfg.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (peft(ids, pixels) - exported(ids, pixels)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", list(JOBS))
def test_export_and_audit_reach_the_url_list_and_pretrained_folders(recipes, variant) -> None:
    run = recipes[variant]
    export_dir, _ = _manifest(run, "export")
    assert (export_dir / "model" / "README.md").exists()
    assert (export_dir / "model" / "release" / "config.json").exists()
    chain = json.dumps(run["audit"])
    assert "download" in chain and "stage1" in chain and "stage2" in chain
    assert "pretrained.clip" in chain and "pretrained.llama" in chain


@pytest.mark.parametrize("variant", list(JOBS))
def test_stage2_trains_from_the_recipes_two_dataset_mixture(recipes, variant) -> None:
    """The job file's mixture: the multimodal `data` input and the text-only `tokenize_text`
    step, with the recipe's weights; every sample trained on is counted to its dataset."""
    recipe = yaml.safe_load((ROOT / JOBS[variant]).read_text())["stage2"]
    _, stage2 = _manifest(recipes[variant], "stage2")
    mixture = stage2["info"]["mixture"]
    weights = {"data": recipe["data"]["data_weight"], **recipe["data"]["mix"]}
    assert {name: entry["weight"] for name, entry in mixture.items()} == weights
    drawn = {name: entry["drawn"] for name, entry in mixture.items()}
    assert min(drawn.values()) > 0
    assert sum(drawn.values()) == stage2["stats"]["samples"]
    assert stage2["stats"]["drawn.tokenize_text"] == drawn["tokenize_text"]
    if variant == "owl2":  # one epoch over `data`: the text share is the configured one
        share = drawn["tokenize_text"] / sum(drawn.values())
        assert abs(share - weights["tokenize_text"] / sum(weights.values())) < 0.02, drawn
    # The card's data table has the text-only step with its counts (as stage 2 recorded them).
    export_dir, _ = _manifest(recipes[variant], "export")
    text = mixture["tokenize_text"]
    row = f"| stage2 mix: tokenize_text | tokenize_text | {text['rows']:,} | {text['tokens']:,} |"
    assert text["rows"] > 0 and row in (export_dir / "model" / "README.md").read_text()


def test_an_edit_to_either_dataset_invalidates_stage2(recipes, data) -> None:
    """Owl1's plan after its run: everything cached; with one byte more in either dataset's
    source file, that tokenize step and stage 2 (and what follows) are to be computed again,
    the other tokenize step stays cached."""
    from pipelines.jobspec import load_job
    from pipelines.plan import plan

    sets = [a for a in _args(_sets(data, "owl1")) if a != "--set"]
    cached = {
        p.name: p.cached for p in plan(load_job(ROOT / JOBS["owl1"], sets), estimate_memory=False)
    }
    assert all(cached.values()), cached
    for edited, other in (("llava", "tokenize_text"), ("sharegpt", "tokenize_instructions")):
        path = Path(data[edited]["path"])
        original = path.read_bytes()
        try:
            path.write_bytes(original + b" ")  # the same JSON, another content digest
            job = load_job(ROOT / JOBS["owl1"], sets)
            cached = {p.name: p.cached for p in plan(job, estimate_memory=False)}
        finally:
            path.write_bytes(original)
        source = "tokenize_instructions" if edited == "llava" else "tokenize_text"
        assert not cached[source] and not cached["stage2"] and not cached["export"], edited
        assert cached[other] and cached["stage1"], edited
