"""A model from others' weights (what a job's init step starts from): an authors' release
converted as a whole, or Hugging Face CLIP and/or LLaMA folders with the rest initialised fresh.
Built on the meta device: loaded weights are assigned, not copied into a random model first, so
a 7B model takes its size in memory once."""

from __future__ import annotations

from pathlib import Path

import torch

from owl.model.abstractor import Abstractor
from owl.model.config import OwlConfig
from owl.model.decoder import Decoder
from owl.model.hf_import import load_clip_vision, load_llama, read_hf_config
from owl.model.model import OwlModel, _init_weights
from owl.model.releases import convert_release
from owl.model.variants import VARIANTS
from owl.model.vision import VisionEncoder
from owl.model.weights import meta_model, model_from_state_dict

# Hugging Face folders, or an authors' release named by its variant.
PRETRAINED_KINDS = ("clip", "llama", *VARIANTS)


def pretrained_model(
    cfg: OwlConfig, folders: dict[str, str], seed: int = 0
) -> tuple[OwlModel, dict[str, object]]:
    """A model from others' weights, given folders {clip, llama, <variant>} (a job's
    `model.pretrained`; empty strings are unset): an authors' release (keyed by its variant)
    converted as a whole, or CLIP and/or LLaMA Hugging Face folders with the rest (always the
    abstractor) initialised fresh from `seed`.
    In fp32 whatever the folders hold (fp16 LLaMA, a bf16 release): one dtype, the one training
    keeps its master weights in. Returns the model and a description (source, what was loaded,
    position interpolation)."""
    model, info = _pretrained_model(cfg, folders, seed)
    info["source_dtypes"] = sorted(
        {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    )
    return model.float(), info


def _pretrained_model(
    cfg: OwlConfig, folders: dict[str, str], seed: int
) -> tuple[OwlModel, dict[str, object]]:
    given = {k: v for k, v in folders.items() if v}
    unknown = sorted(set(given) - set(PRETRAINED_KINDS))
    if unknown:
        raise ValueError(f"model.pretrained: unknown folder kind(s) {unknown}")
    releases = [k for k in VARIANTS if k in given]
    if not given:
        raise ValueError(
            "model.pretrained: no folder set; set clip and/or llama (Hugging Face folders) or "
            f"{' / '.join(VARIANTS)} (the authors' release), or remove the init step"
        )
    if releases and len(given) > 1:
        raise ValueError(
            f"model.pretrained: {releases[0]} is a whole model; do not also set "
            f"{sorted(set(given) - {releases[0]})}"
        )
    if releases:
        return _from_release(cfg, releases[0], given[releases[0]])
    torch.manual_seed(seed)
    clip, llama = given.get("clip"), given.get("llama")
    loaded: dict[str, torch.Tensor] = {}
    info: dict[str, object] = {"source": "hf", "fresh": ["abstractor"]}
    if clip:
        vision = load_clip_vision(cfg, Path(clip))
        loaded.update(vision)
        info["vision_grid"] = _clip_grid(Path(clip), cfg)
    else:
        info["fresh"].insert(0, "vision")
    if llama:
        loaded.update(load_llama(cfg, Path(llama)))
    else:
        info["fresh"].append("decoder")
    return _with_fresh_rest(cfg, loaded), info


def _clip_grid(directory: Path, cfg: OwlConfig) -> str:
    hf = read_hf_config(directory, "CLIP")
    hf = hf.get("vision_config", hf)
    source = hf["image_size"] // hf["patch_size"]
    target = cfg.vision.image_size // cfg.vision.patch_size
    return f"{source}x{source} -> {target}x{target}"


def _from_release(cfg: OwlConfig, kind: str, folder: str) -> tuple[OwlModel, dict[str, object]]:
    if cfg.variant != kind:
        raise ValueError(
            f"model.pretrained.{kind}: a {kind} release, but the job's model is {cfg.variant}"
        )
    release_cfg, state = convert_release(folder, None, kind)
    token_ids = ("pad_token_id",)  # the job's tokenizer decides
    wrong = {
        f"model.{section}.{name}": f"release {value} vs job {getattr(getattr(cfg, section), name)}"
        for section in ("vision", "abstractor", "decoder")
        for name, value in release_cfg.to_dict()[section].items()
        if getattr(getattr(cfg, section), name) != value and name not in token_ids
    }
    if wrong:
        raise ValueError(
            f"model.pretrained.{kind} {folder}: the release does not match the job's model config "
            f"{wrong}; set model.name / model.overrides to the release's values"
        )
    return model_from_state_dict(cfg, state, source=folder), {"source": kind, "fresh": []}


def _with_fresh_rest(cfg: OwlConfig, loaded: dict[str, torch.Tensor]) -> OwlModel:
    """`loaded` assigned; every component (vision, abstractor, decoder) with a weight not in it is
    built fresh (from-scratch init) and then gets the loaded weights it has."""
    model = meta_model(cfg)
    result = model.load_state_dict(loaded, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys  # name maps only emit our keys
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    builders = {
        "vision": lambda: VisionEncoder(cfg.vision, cfg.activation_checkpointing),
        "abstractor": lambda: Abstractor(
            cfg.abstractor, cfg.vision, cfg.decoder.hidden, cfg.activation_checkpointing
        ),
        "decoder": lambda: Decoder(cfg.decoder, cfg.activation_checkpointing),
    }
    for name, build in builders.items():
        module = getattr(model, name)
        if any(p.is_meta for p in module.parameters()):
            kept = {
                k: v
                for k, v in module.state_dict().items()
                if not v.is_meta and f"{name}.{k}" in loaded
            }
            fresh = build()
            fresh.apply(_init_weights)
            fresh.load_state_dict(kept, strict=False)
            setattr(model, name, fresh)
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    model.abstractor.reset_positions(device="cpu")
    return model
