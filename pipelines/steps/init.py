"""Step `init`: the model stage 1 starts from, built from the job's pretrained folders.

Reads `model.pretrained` ({clip, llama} Hugging Face folders, or {owl2} / {owl1} the authors'
release) and the job's model config; writes `model/` (an `owl.model.load_model` folder), which
stage 1 takes through its `init` role. From CLIP + LLaMA: the ViT's positions interpolated from
the checkpoint's grid to the config's (bicubic, CLS kept), Owl2's visual MAM copies initialised
from the text weights, the abstractor fresh from the job seed. From a release: converted as a
whole (buffers checked, eps as in the release) and checked against the job's model config.

The folders' content digests are part of the step's cache key (the runner digests every local path
in `model.pretrained`), and the manifest lists them under `info["pretrained"]` so lineage records
them as MLflow dataset inputs: `owl audit model` ends at the weights a model started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from owl.data.manifest import Manifest
from pipelines.step import StepContext, StepInput

OUT = "model"


@dataclass(frozen=True)
class Config:
    """No settings of its own: what it reads is `model.pretrained` and the model config."""


def run(ctx: StepContext, cfg: Config, inputs: dict[str, StepInput]) -> Manifest:
    from owl.model.pretrained import pretrained_model
    from owl.model.weights import save_model
    from pipelines.cache import input_digests

    folders = {k: v for k, v in ctx.extra.get("pretrained", {}).items() if v}
    for kind, folder in folders.items():
        if not Path(folder).expanduser().is_dir():
            raise ValueError(f"model.pretrained.{kind}: {folder}: no such folder")
    ctx.progress(0, None, f"loading {', '.join(f'{k}={v}' for k, v in folders.items()) or '-'}")
    expanded = {k: str(Path(v).expanduser()) for k, v in folders.items()}
    model, described = pretrained_model(ctx.model, expanded, seed=ctx.seed)
    ctx.progress(0, None, "saving the starting model")
    save_model(model, ctx.out_dir / OUT)
    manifest = Manifest(step=ctx.step)
    for path in sorted((ctx.out_dir / OUT).rglob("*")):
        if path.is_file():
            manifest.add_file(ctx.out_dir, path.relative_to(ctx.out_dir).as_posix())
    digests = input_digests(Path(ctx.extra["storage"]), list(folders.values()))
    manifest.info = {
        "pretrained": {
            kind: {"path": folder, "sha256": digests[folder]} for kind, folder in folders.items()
        },
        **described,
    }
    manifest.stats = {
        "params": float(sum(p.numel() for p in model.parameters())),
        "params_fresh": float(
            sum(
                p.numel()
                for name in described.get("fresh", [])
                for p in getattr(model, name).parameters()
            )
        ),
    }
    return manifest
