"""Typed, nested model configs and the registry of named sizes.

Everything here is plain data: building a config allocates no weights, so `owl model summary` can
count the parameters of a 7B model on a laptop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from owl.configs import build_dataclass
from owl.model.variants import ModelVariant, VariantName, get_variant

ImageMode = Literal["pad", "resize"]


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT layout (ViT-L/14 by default)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Patches plus the CLS token."""
        return self.num_patches + 1


@dataclass(frozen=True)
class AbstractorConfig:
    """Visual abstractor: learnable queries cross-attending to image tokens."""

    num_queries: int = 64
    width: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    ffn_dim: int = 2816
    # The authors' abstractors (Owl1 and Owl2) build the query, key and post-attention LayerNorms
    # without an eps argument (torch's 1e-5) and only the FFN's inner LayerNorm with the config's
    # eps (1e-6): `norm_eps` is the former, `layer_norm_eps` the latter.
    norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-6
    # Owl2: fixed sin-cos 1-D query and 2-D grid(+CLS) key embeddings. Owl1: none.
    positional_embeddings: bool = True


@dataclass(frozen=True)
class DecoderConfig:
    """LLaMA decoder, optionally with the modality-adaptive module (Owl2)."""

    vocab_size: int = 32000
    hidden: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    ffn_dim: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    # Owl2: per-modality input norm, post-attention norm, k_proj and v_proj in every layer.
    modality_adaptive: bool = True
    tie_embeddings: bool = False
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


@dataclass(frozen=True)
class OwlConfig:
    """The composed model: vision encoder -> abstractor -> decoder."""

    name: str
    variant: VariantName  # a name in owl.model.variants.VARIANTS
    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # How images are brought to a square before resizing: the authors trained Owl2 with `pad`.
    image_mode: ImageMode = "pad"
    activation_checkpointing: bool = False

    @property
    def num_visual_tokens(self) -> int:
        """Tokens one image occupies in the decoder sequence: queries + the end-of-image vector."""
        return self.abstractor.num_queries + 1

    @property
    def variant_spec(self) -> ModelVariant:
        """Everything that differs between the variants (owl.model.variants)."""
        return get_variant(self.variant)

    @property
    def image_placeholder(self) -> str:
        return self.variant_spec.template.placeholder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OwlConfig:
        """Build from a (possibly partial) nested dict, every field type-checked; an unknown key
        or a wrong type is an error naming its path (`model.decoder.hidden`)."""
        decoder = data.get("decoder")
        if isinstance(decoder, dict) and _RETIRED_DECODER_FIELDS & decoder.keys():
            decoder = {k: v for k, v in decoder.items() if k not in _RETIRED_DECODER_FIELDS}
            data = {**data, "decoder": decoder}
        return build_dataclass(cls, data, "model")

    def replace(self, **overrides: Any) -> OwlConfig:
        """Copy with overrides; nested sections may be given as dicts of their fields."""
        return OwlConfig.from_dict(_deep_merge(self.to_dict(), overrides))


# In the config.json of model folders written before these fields were removed (nothing read
# them; the tokenizer gives BOS and EOS): skipped.
_RETIRED_DECODER_FIELDS = frozenset({"bos_token_id", "eos_token_id"})


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
