"""The model variants, one object each: everything that differs between mPLUG-Owl (`owl1`) and
mPLUG-Owl2 (`owl2`), in one place that the rest of owl reads instead of comparing names.

| what differs                                   | field                     | read by                    |
|------------------------------------------------|---------------------------|----------------------------|
| the decoder's modality-adaptive module (MAM)   | `release.multiway`        | registry (`get_config`)    |
| the abstractor's sin-cos positions             | `release.positions`       | registry (`get_config`)    |
| the conversation template, image placeholder   | `template`                | owl.data.templates, config |
| trainable groups of stage 1 and stage 2        | `stage_groups`            | owl.train.stages           |
| the authors' release: key layout, config.json, | `release`                 | owl.model.releases,        |
| the stack it loads with, `owl convert` name    |                           | release_files, init, CLI   |
| the name in prose (`mPLUG-Owl2`)               | `title`                   | model card, messages       |

`VARIANTS` is the registry; the names a job file, `OwlConfig` and the CLI accept come from it
(`VariantName`). Plain data: no torch, so a job file is validated without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from owl.model.config import OwlConfig


@dataclass(frozen=True)
class Template:
    """A conversation layout (owl.data.templates turns it into pieces)."""

    placeholder: str
    system: str  # "" for none
    system_sep: str  # between the system text and the first user turn
    user_prefix: str  # starts every user turn
    image_line: str  # owl1 puts each leading image on its own "Human:" line; "" = inline
    assistant_prefix: str  # ends the prompt: generation starts right after it
    reply_sep: str  # between the assistant prefix and the reply text (supervised)


@dataclass(frozen=True)
class Loader:
    """The authors' stack a release of one variant is made for."""

    package: str
    transformers: str
    tokenizers: str


@dataclass(frozen=True)
class ReleaseLayout:
    """The authors' released checkpoint of a variant: where it puts each component, how its
    config.json nests, and the stack that loads it (facts read at X-PLUG/mPLUG-Owl)."""

    convert_command: str  # `owl convert <this> SRC DST`
    model_type: str  # config.json's model_type
    base_size: str  # registry size a converted release starts from (token ids, image mode)
    decoder: str  # prefix of embed_tokens / layers / norm
    lm_head: str
    vision: str
    abstractor: str
    queries: str
    multiway: bool  # the decoder's modality-adaptive k/v/norms, as `.multiway.{0,1}`
    positions: bool  # the abstractor's sin-cos position buffers
    # transformers 4.28.1's LlamaConfig (Owl1's stack): no rope_theta, no num_key_value_heads.
    old_llama: bool
    loader: Loader
    # Where config.json holds the vision, abstractor and text sections (() = the top level).
    sections: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    # config.json from its (vision, abstractor, text) sections, with the variant's own extras.
    config_json: Callable[[OwlConfig, dict, dict, dict], dict[str, Any]]


@dataclass(frozen=True)
class ModelVariant:
    name: str
    title: str  # the paper's name
    template: Template
    stage_groups: tuple[frozenset[str], frozenset[str]]  # trainable groups of stage 1, 2
    release: ReleaseLayout

    def __post_init__(self) -> None:
        if not self.name.isidentifier():  # a job's `model.pretrained.<name>` is a field
            raise ValueError(f"variant name {self.name!r}: use a Python identifier")

    @property
    def modality_adaptive(self) -> bool:
        return self.release.multiway

    @property
    def abstractor_positions(self) -> bool:
        return self.release.positions


def _owl2_config_json(cfg: OwlConfig, vision: dict, abstractor: dict, text: dict) -> dict:
    v, a, d = cfg.vision, cfg.abstractor, cfg.decoder
    abstractor.update(
        num_learnable_queries=a.num_queries,
        grid_size=v.image_size // v.patch_size,
        use_cls_token=True,
        add_v2t_pos_emb=False,
    )
    vision.update(use_cls_token=True, use_post_layernorm=True)
    return {
        **text,
        "architectures": ["MPLUGOwl2LlamaForCausalLM"],
        "model_type": "mplug_owl2",
        "visual_config": {"visual_model": vision, "visual_abstractor": abstractor},
        # Read by their builder (context length) and process_images (pad or stretch).
        "max_sequence_length": d.max_positions,
        "image_aspect_ratio": cfg.image_mode,
    }


def _owl1_config_json(cfg: OwlConfig, vision: dict, abstractor: dict, text: dict) -> dict:
    return {
        "architectures": ["MplugOwlForConditionalGeneration"],
        "model_type": "mplug-owl",
        "vision_config": vision,
        "visual_abstractor_config": abstractor,
        "text_config": text,
        "num_query_tokens": cfg.abstractor.num_queries,
    }


OWL1_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

OWL1 = ModelVariant(
    name="owl1",
    title="mPLUG-Owl",
    # <s>{system}\nHuman: <image>\nHuman: {q}\nAI: {a}</s>\nHuman: {q2}\nAI: {a2}</s>
    template=Template(
        placeholder="<image>",
        system=OWL1_SYSTEM,
        system_sep="",
        user_prefix="\nHuman: ",
        image_line="\nHuman: <image>",
        assistant_prefix="\nAI:",
        reply_sep=" ",
    ),
    # Stage 1: vision + abstractor, the LLM frozen. Stage 2: LoRA adapters on the LLM (+ the
    # abstractor with `train_abstractor_in_stage2`), vision frozen.
    stage_groups=(frozenset({"vision", "abstractor"}), frozenset({"lora"})),
    release=ReleaseLayout(
        convert_command="mplug-owl",
        model_type="mplug-owl",
        base_size="owl1-llama-7b",
        decoder="language_model.model.",
        lm_head="language_model.lm_head.weight",
        vision="vision_model.",
        abstractor="abstractor.",
        queries="query_tokens",
        multiway=False,
        positions=False,
        old_llama=True,
        loader=Loader("mplug_owl", "4.28.1", "0.13.3"),
        sections=(("vision_config",), ("visual_abstractor_config",), ("text_config",)),
        config_json=_owl1_config_json,
    ),
)

OWL2 = ModelVariant(
    name="owl2",
    title="mPLUG-Owl2",
    # <s>[system ]USER: <|image|>{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>
    template=Template(
        placeholder="<|image|>",
        system="",
        system_sep=" ",
        user_prefix="USER: ",
        image_line="",
        assistant_prefix=" ASSISTANT:",
        reply_sep=" ",
    ),
    # Stage 1: vision + abstractor + the decoder's visual copies (`*_visual`: MAM norms, k, v).
    # Stage 2: everything.
    stage_groups=(
        frozenset({"vision", "abstractor", "decoder_visual"}),
        frozenset({"vision", "abstractor", "decoder_text", "decoder_visual"}),
    ),
    release=ReleaseLayout(
        convert_command="mplug-owl2",
        model_type="mplug_owl2",
        base_size="owl2-llama2-7b",
        decoder="model.",
        lm_head="lm_head.weight",
        vision="model.vision_model.",
        abstractor="model.visual_abstractor.",
        queries="model.visual_abstractor.query_embeds",
        multiway=True,
        positions=True,
        old_llama=False,
        loader=Loader("mplug_owl2", "4.31.0", "0.13.3"),
        sections=(("visual_config", "visual_model"), ("visual_config", "visual_abstractor"), ()),
        config_json=_owl2_config_json,
    ),
)

VARIANTS: dict[str, ModelVariant] = {v.name: v for v in (OWL1, OWL2)}

# The names a config field accepts (checked by owl.configs like any Literal).
VariantName = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]


def get_variant(name: str) -> ModelVariant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def variant_of_release(model_type: str) -> ModelVariant:
    """The variant whose release config.json has this `model_type`."""
    for variant in VARIANTS.values():
        if variant.release.model_type == model_type:
            return variant
    known = [v.release.model_type for v in VARIANTS.values()]
    raise ValueError(f"model_type {model_type!r} is no release we know; known: {known}")
