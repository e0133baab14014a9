"""Step `export`: the final model as it is registered and handed out.

Writes `model/`, the folder the runner registers in MLflow:
- our folder (`config.json` + safetensors, `owl.model.load_model` reads it), hard-linked from the
  final training stage (stage2, else stage1), with `adapter/` when that stage trained LoRA (peft's
  format: `peft.PeftModel.from_pretrained(stage-1 model, "model/adapter")`);
- `release/`: the same weights in the authors' layout (their config.json + safetensors, buffers
  included) with the tokenizer (from the `tokenizer` step), preprocessor_config.json and
  generation_config.json, for their code and tools built on it (`release: false` to skip;
  `release_weights: bin` for pytorch_model*.bin);
- `README.md`: the model card: where the weights started, the data (digests, counts), the training
  steps and their settings, the evaluation metrics, and the MLflow run id of every step.
Step bodies do not call MLflow: the run ids come from the input manifests.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from owl.data.manifest import Manifest
from owl.train.config import mixture_weights
from pipelines.mlflow_links import run_url
from pipelines.step import StepContext, StepInput

OUT = "model"
RELEASE = "release"
CARD = "README.md"
# A stage's settings the card shows (paths into its TrainConfig), by their last name; LoRA's
# (shown only when the stage trained adapters) as `lora.r`.
_TRAIN_SETTINGS = ("optimizer.lr", "schedule.max_steps", "schedule.epochs",
                   "batch.micro_batch_size", "batch.grad_accum", "batch.max_length",
                   "memory.zero_stage", "trainable", "lora.r", "lora.alpha",
                   "lora.targets")  # fmt: skip


@dataclass(frozen=True)
class Config:
    # Also write the authors' layout under model/release/.
    release: bool = True
    # Its weights: "safetensors" (their stack then needs the safetensors package), or "bin".
    release_weights: Literal["safetensors", "bin"] = "safetensors"


def final_stage(inputs: dict[str, StepInput]) -> StepInput:
    for role in ("stage2", "stage1"):
        if role in inputs:
            return inputs[role]
    raise ValueError("export: needs a training stage (stage1 or stage2) in the job")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links (no copy of a 7B model on the same filesystem), else copies."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    from owl.model.releases import export_release

    stage = final_stage(inputs)
    out = ctx.out_dir / OUT
    ctx.progress(0, None, f"linking the {stage.name} model")
    _link_tree(stage.dir / "model", out)
    if cfg.release:
        ctx.progress(0, None, "writing the authors' layout")
        tokenizer = inputs["tokenizer"].dir / "tokenizer" if "tokenizer" in inputs else None
        try:
            export_release(out, out / RELEASE, tokenizer_dir=tokenizer, weights=cfg.release_weights)
        except ValueError as exc:
            raise ValueError(f"export: {exc}; or set `export: {{release: false}}`") from exc
    (out / CARD).write_text(model_card(ctx, inputs, stage, out))
    manifest = Manifest(step=ctx.step)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            manifest.add_file(ctx.out_dir, path.relative_to(ctx.out_dir).as_posix())
    manifest.artifacts.append(f"{OUT}/{CARD}")
    manifest.info = {"from": stage.name, "release": cfg.release}
    return manifest


# ---------------------------------------------------------------------------------- the card


def _run_id(step: StepInput) -> str:
    return str(step.manifest.info.get("mlflow_run_id", ""))


def _run_link(ctx: StepContext, step: StepInput) -> str:
    """The step's MLflow run id, as a link to its run in the UI's model-training view."""
    run_id, base = _run_id(step), ctx.extra.get("mlflow_ui", "")
    experiment = ctx.extra.get("mlflow_experiment_id", "")
    if not (run_id and base and experiment):
        return f"`{run_id}`"
    return f"[`{run_id}`]({run_url(base, experiment, run_id)})"


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(ctx: StepContext, inputs: dict[str, StepInput], stage: StepInput, out: Path) -> str:
    """The model card (Markdown): everything here comes from the input manifests and folders."""
    from owl.model.summary import summarize

    model = ctx.model
    params = summarize(model)["total_params"]
    parts = [
        f"# {ctx.job_name}\n",
        f"{model.variant_spec.title} ({model.variant}), size "
        f"`{model.name}`, {params:,} parameters, {model.vision.image_size} px images, "
        f"{model.num_visual_tokens} visual tokens per image. Trained with owl (job `{ctx.job_name}`, "
        f"execution `{ctx.extra.get('execution_id', '')}`); the weights are from step "
        f"`{stage.name}`.\n",
        "## Files\n",
        _files_section(out),
        "## Starting weights\n",
        _init_section(inputs),
        "## Data\n",
        _data_section(inputs),
        "## Training\n",
        _training_section(inputs),
        "## Evaluation\n",
        _evaluation_section(inputs),
        "## Lineage (MLflow run of each step)\n",
        _table(
            [
                (role, step.name, _run_link(ctx, step), f"`{step.manifest.digest[:16]}`")
                for role, step in sorted(inputs.items())
            ],
            ("input", "step", "MLflow run id", "output digest"),
        ),  # fmt: skip
        "",
        f"Registered in MLflow by `owl run`; `owl audit model {ctx.job_name}@current` walks back "
        "from it to the URL lists and pretrained folders.",
    ]
    return "\n".join(parts) + "\n"


def _files_section(out: Path) -> str:
    rows = [
        ("`config.json`, `model*.safetensors`", "owl format: `owl.model.load_model(path)`"),
    ]
    if (out / "adapter").is_dir():
        rows.append(
            ("`adapter/`", "LoRA adapter in peft's format: "
             "`peft.PeftModel.from_pretrained(stage1_model, path + '/adapter')`")
        )  # fmt: skip
    if (out / RELEASE).is_dir():
        rows.append((f"`{RELEASE}/`", "the authors' checkpoint layout (their config.json)"))
    table = _table(rows, ("file", "what")) + "\n"
    return table + (_release_line(out / RELEASE) if (out / RELEASE).is_dir() else "")


def _release_line(release: Path) -> str:
    """Which of the authors' stacks the release folder was checked against, and what it needs."""
    from owl.model.variants import variant_of_release

    model_type = json.loads((release / "config.json").read_text())["model_type"]
    loader = variant_of_release(model_type).release.loader
    files = sorted(p.name for p in release.iterdir())
    weights = "`pytorch_model*.bin`" if any(f.endswith(".bin") for f in files) else (
        "`model*.safetensors` (needs the `safetensors` package)")  # fmt: skip
    tokenizer = "the tokenizer" if "tokenizer_config.json" in files else "no tokenizer"
    return (
        f"\n`{RELEASE}/` holds {weights}, {tokenizer}, `preprocessor_config.json` and "
        f"`generation_config.json`; its files were checked against transformers "
        f"{loader.transformers} with tokenizers {loader.tokenizers}, the versions the authors' "
        f"`{loader.package}` package runs on (docs/model.md).\n"
    )


def _init_section(inputs: dict[str, StepInput]) -> str:
    if "init" not in inputs:
        return "No init step in the job: fresh initialisation, or `stage1.init_model`.\n"
    folders = inputs["init"].manifest.info.get("pretrained", {})
    rows = [(kind, f"`{f['path']}`", f"`{f['sha256']}`") for kind, f in folders.items()]
    return _table(rows, ("kind", "folder", "content sha256")) + "\n"


def _data_section(inputs: dict[str, StepInput]) -> str:
    def row(label: str, step: str, summary: dict[str, Any]) -> tuple:
        return (label, step, f"{summary['rows']:,}", f"{summary['tokens']:,}", summary["shards"],
                f"`{summary['digest'][:16]}`")  # fmt: skip

    rows = [
        row(role, inputs[role].name, inputs[role].manifest.data_summary())
        for role in ("captions", "instructions")
        if role in inputs
    ]
    listed = {r[1] for r in rows}
    for role in ("stage1", "stage2"):  # datasets a stage mixed in (`data.mix`), as it recorded them
        mixture = inputs[role].manifest.info.get("mixture", {}) if role in inputs else {}
        for name, entry in mixture.items():
            if "step" not in entry or entry["step"] in listed:
                continue
            listed.add(entry["step"])
            rows.append(row(f"{role} mix: {name}", entry["step"], entry))
    if not rows:
        return "Not recorded (the tokenize steps are not inputs of this export).\n"
    return _table(rows, ("data", "step", "rows", "tokens", "shards", "digest")) + "\n"


def _training_section(inputs: dict[str, StepInput]) -> str:
    rows = []
    for role in ("stage1", "stage2"):
        if role not in inputs:
            continue
        manifest = inputs[role].manifest
        stats = manifest.stats
        settings = manifest.info.get("train_config", {})
        lora = manifest.info.get("trainable_parameters", {}).get("lora", {}).get("trainable")
        chosen = ", ".join(
            f"{_setting_label(path)}={value}"
            for path in _TRAIN_SETTINGS
            if (lora or not path.startswith("lora."))
            and (value := _setting(settings, path)) is not None
        )
        rows.append((role, f"{stats.get('steps', 0):.0f}", f"{stats.get('tokens', 0):,.0f}",
                     f"{stats.get('final_loss', float('nan')):.4f}", chosen))  # fmt: skip
    return (
        _table(rows, ("stage", "steps", "tokens", "final loss", "settings"))
        + "\n"
        + (_mixture_section(inputs))
    )


def _setting(settings: dict[str, Any], path: str) -> Any:
    """The value at `path` (`optimizer.lr`) of a stage's recorded config; None when absent."""
    for part in path.split("."):
        if not isinstance(settings, dict) or part not in settings:
            return None
        settings = settings[part]
    return settings


def _setting_label(path: str) -> str:
    return path if path.startswith("lora.") else path.rpartition(".")[2]


def _mixture_section(inputs: dict[str, StepInput]) -> str:
    """The datasets each stage drew together (`mix`): weights and shares as configured, and the
    samples of each the stage trained on (its manifest's `mixture`); "" when no stage mixes."""
    rows = []
    for role in ("stage1", "stage2"):
        if role not in inputs:
            continue
        info = inputs[role].manifest.info
        settings = info.get("train_config", {})
        data = settings.get("data", {})
        weights = mixture_weights(data.get("mix") or {}, data.get("data_weight", 1.0))
        drawn = {name: e["drawn"] for name, e in info.get("mixture", {}).items()}
        total, drawn_total = sum(weights.values()), sum(drawn.values()) or 1
        for name, weight in weights.items():
            count = drawn.get(name)
            counted = ("", "") if count is None else (f"{count:,}", f"{count / drawn_total:.1%}")
            rows.append((role, name, f"{weight:g}", f"{weight / total:.1%}", *counted))
    if not rows:
        return ""
    columns = ("stage", "dataset", "weight", "share", "samples drawn", "drawn share")
    return (
        "\nData mixture (each shuffle buffer draws from every dataset by weight; samples drawn: "
        "those the stage trained on):\n\n" + _table(rows, columns) + "\n"
    )


def _evaluation_section(inputs: dict[str, StepInput]) -> str:
    """One row per metric; a headline metric with its 95% bootstrap interval beside it."""
    from owl.eval.uncertainty import with_intervals

    rows = []
    for role in ("evaluate", "evaluate_stage1"):
        if role in inputs:
            stats = {k: v for k, v in inputs[role].manifest.stats.items() if "seconds" not in k}
            rows += [
                (role, name, f"{value:.4g}", f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
                for name, value, ci in with_intervals(stats)
            ]
    if not rows:
        return "No evaluation step in the job.\n"
    table = _table(rows, ("step", "metric", "value", "95% interval"))
    return table + "\n\n95% intervals: percentile bootstrap over the items (docs/benchmarks.md).\n"
