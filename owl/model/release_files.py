"""The files beside the weights that the authors' loaders read from a release folder.

What their users call (X-PLUG/mPLUG-Owl, read for facts, nothing copied):
- mPLUG-Owl2 pins transformers 4.31.0 and tokenizers < 0.14. Its `load_pretrained_model` runs
  `AutoTokenizer.from_pretrained(path, use_fast=False)`, `MPLUGOwl2LlamaForCausalLM.from_pretrained`
  and `CLIPImageProcessor.from_pretrained(path)`, and takes the context length from the config's
  `max_sequence_length` (else 2048). Its `process_images` pads an image to a square with the
  processor's mean colour when the model config's `image_aspect_ratio` is "pad" (stretches it to a
  square otherwise) before the processor; `tokenizer_image_token` expects the tokenizer to put BOS
  first and strips it from the pieces after each image.
- mPLUG-Owl (Owl1) pins transformers 4.28.1. Its README loads `MplugOwlForConditionalGeneration`,
  `MplugOwlImageProcessor` (a CLIPImageProcessor) and `AutoTokenizer` from the folder, and wraps
  them in `MplugOwlProcessor`, which stretches each image to `size["shortest_edge"]` square
  (bicubic), puts BOS first itself, tokenizes the text between images without special tokens and
  gives each `<image>` 65 positions unless `media_info` says otherwise.

So a release folder gets: the tokenizer the model was trained with in a form tokenizers 0.13 reads
(LLaMA's sentencepiece `tokenizer.model` with a `LlamaTokenizer` config when the tokenizer folder
has one; else its `tokenizer.json`, rewritten in the 0.13 format, as a `PreTrainedTokenizerFast`
that puts BOS first, as LLaMA's does), `preprocessor_config.json` (CLIPImageProcessor fields: the
model's image size, CLIP's mean and std, bicubic) and `generation_config.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from owl.data.image import CLIP_MEAN, CLIP_STD
from owl.model.config import OwlConfig

BICUBIC = 3  # PIL.Image.BICUBIC, as CLIPImageProcessor's `resample`
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def preprocessor_config(cfg: OwlConfig) -> dict:
    """CLIPImageProcessor's fields (transformers 4.28 / 4.31) for the model's images: resize the
    shorter side to the image size (bicubic), centre crop to a square of it, scale to [0, 1],
    normalise with CLIP's mean and std: on the square images their code hands it, this is our
    `preprocess_images` (a plain bicubic resize to the square)."""
    size = cfg.vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def generation_config(release: dict) -> dict:
    """generation_config.json: the token ids of the release config (greedy, as their evaluation)."""
    text = release.get("text_config", release)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {**{key: text[key] for key in ids}, "do_sample": False}


# ---------------------------------------------------------------------------------- tokenizer

_OLD_BPE_FIELDS = {"type", "dropout", "unk_token", "continuing_subword_prefix",
                   "end_of_word_suffix", "fuse_unk", "byte_fallback", "vocab", "merges"}  # fmt: skip
_OLD_BYTE_LEVEL_FIELDS = {"type", "add_prefix_space", "trim_offsets", "use_regex"}


def write_tokenizer(src: Path, dst: Path, max_length: int) -> str:
    """The tokenizer folder `src` (the tokenizer step's output) into `dst` in the form the
    authors' transformers reads; returns the class their AutoTokenizer builds."""
    tokenizer_config = {**SPECIAL_TOKENS, "pad_token": "<unk>", "model_max_length": max_length}
    if (src / "tokenizer.model").exists():  # LLaMA's sentencepiece model: their own tokenizer
        shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")
        tokenizer_class = "LlamaTokenizer"
        tokenizer_config.update(add_bos_token=True, add_eos_token=False)
    elif (src / "tokenizer.json").exists():
        data = legacy_tokenizer_json(json.loads((src / "tokenizer.json").read_text()), src)
        (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n")
        tokenizer_class = "PreTrainedTokenizerFast"
    else:
        raise ValueError(f"tokenizer {src}: no tokenizer.model or tokenizer.json")
    tokenizer_config["tokenizer_class"] = tokenizer_class
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    specials = {**SPECIAL_TOKENS, "pad_token": "<unk>"}
    (dst / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return tokenizer_class


def legacy_tokenizer_json(data: dict, src: Path) -> dict:
    """A byte-level BPE `tokenizer.json` (what the tokenizer step trains) in the format tokenizers
    0.13 parses: merges as "a b" strings, no fields it does not know; and a post-processor that
    puts BOS first, as LLaMA's tokenizer does (their Owl2 code relies on it). Other tokenizer
    types have no checked old form: an error names the part."""
    model = data["model"]
    parts = {"model": model, "pre_tokenizer": data.get("pre_tokenizer"),
             "decoder": data.get("decoder")}  # fmt: skip
    expected = {"model": "BPE", "pre_tokenizer": "ByteLevel", "decoder": "ByteLevel"}
    for name, part in parts.items():
        if not part or part.get("type") != expected[name]:
            kind = part.get("type") if part else None
            raise ValueError(
                f"tokenizer {src}: tokenizer.json {name} is {kind}, not {expected[name]}: only a "
                "byte-level BPE (or a folder with LLaMA's tokenizer.model) is written in the form "
                "the authors' transformers reads"
            )
    if data.get("normalizer") is not None:
        raise ValueError(f"tokenizer {src}: tokenizer.json has a normalizer; expected none")
    merges = []
    for merge in model["merges"]:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in piece for piece in pair):
            raise ValueError(f"tokenizer {src}: merge {merge!r} has no 'a b' string form")
        merges.append(" ".join(pair))
    bos_id = model["vocab"][SPECIAL_TOKENS["bos_token"]]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        **data,
        "model": {**{k: v for k, v in model.items() if k in _OLD_BPE_FIELDS}, "merges": merges},
        "pre_tokenizer": _keep(data["pre_tokenizer"], _OLD_BYTE_LEVEL_FIELDS),
        "decoder": _keep(data["decoder"], _OLD_BYTE_LEVEL_FIELDS),
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [bos_id], "tokens": ["<s>"]}},
        },  # fmt: skip
    }


def _keep(part: dict, fields: set[str]) -> dict:
    return {k: v for k, v in part.items() if k in fields}


# ------------------------------------------------------------------------------------- folder


def write_release_files(
    cfg: OwlConfig, release: dict, dst: Path, tokenizer_dir: Path | None
) -> list[str]:
    """preprocessor_config.json, generation_config.json and (given its folder) the tokenizer;
    returns the names written."""
    files = {
        "preprocessor_config.json": preprocessor_config(cfg),
        "generation_config.json": generation_config(release),
    }
    for name, content in files.items():
        (dst / name).write_text(json.dumps(content, indent=2) + "\n")
    written = list(files)
    if tokenizer_dir is not None:
        write_tokenizer(Path(tokenizer_dir), dst, cfg.decoder.max_positions)
        written += sorted(
            p.name for p in dst.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))
        )
    return written
