"""Batched generation: left padding, KV cache, greedy or temperature/top-p sampling, EOS stop.

Left padding is segment 0 and the real tokens segment 1: padded keys are masked for real queries
and positions start at 0 at each sample's first real token, so each row generates exactly what it
would generate alone.

With the cache, the prompt (images included) runs once through the whole model into a preallocated
KV cache; every later step feeds one generated text token per row through `TextStep` (the
decoder's text branch on plain weight tensors, rotary tables and the key mask built once and
sliced), or through the general cached forward when the decoder is LoRA-wrapped or hooked.
Without the cache every step recomputes the whole sequence, images included.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from owl.model.decoder import KVCache, TextStep
from owl.model.positions import positions_from_segments

if TYPE_CHECKING:
    from owl.model.model import OwlModel


@dataclass
class Prompt:
    """A left-padded batch ready for the model."""

    input_ids: torch.Tensor  # (B, T)
    segments: torch.Tensor  # (B, T) 0 = left padding, 1 = prompt
    images: torch.Tensor | None  # (N, 3, S, S) all images in sample order, or None


def left_pad(
    model: OwlModel, input_ids: list[list[int]], images: list[torch.Tensor] | None
) -> Prompt:
    if not input_ids or any(len(ids) == 0 for ids in input_ids):
        raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
    if images is not None and len(images) != len(input_ids):
        raise ValueError(
            f"images must hold one tensor per prompt ({len(input_ids)}), got {len(images)}; "
            "use an empty (0, 3, S, S) tensor for a prompt without images"
        )
    device = next(model.parameters()).device
    length = max(len(ids) for ids in input_ids)
    pad_id = model.cfg.decoder.pad_token_id
    ids = torch.full((len(input_ids), length), pad_id, dtype=torch.long)
    segments = torch.zeros((len(input_ids), length), dtype=torch.long)
    for row, prompt in enumerate(input_ids):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        segments[row, length - len(prompt) :] = 1
    pixels = None
    if images is not None:
        present = [img for img in images if img is not None and img.shape[0] > 0]
        pixels = torch.cat(present).to(device) if present else None
    return Prompt(ids.to(device), segments.to(device), pixels)


def check_positions(model: OwlModel, prompt_length: int, max_new_tokens: int) -> None:
    """Raise before any work when the longest prompt (image slots included) plus max_new_tokens is
    more than the decoder's max_positions: the rule is prompt + new tokens <= max_positions."""
    limit = model.cfg.decoder.max_positions
    if prompt_length + max_new_tokens <= limit:
        return
    room = limit - prompt_length
    fix = (
        f"lower max_new_tokens to at most {room}, shorten the prompt"
        if room >= 1
        else "shorten the prompt (it alone fills the positions)"
    )
    raise ValueError(
        f"the longest prompt has {prompt_length} tokens (each image counts as "
        f"{model.cfg.num_visual_tokens} slots) and max_new_tokens is {max_new_tokens}: "
        f"{prompt_length + max_new_tokens} positions, more than decoder.max_positions={limit}; "
        f"{fix}, or use a model config with a larger decoder.max_positions"
    )


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from last-position logits (B, V): argmax, or nucleus sampling."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(
    model: OwlModel,
    prompt: Prompt,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), alive (B,) bool) per step; alive = a real new token (not EOS, not after
    it). Stops when every row has produced EOS or after max_new_tokens steps. Greedy when
    temperature == 0, else sampled (nucleus when top_p < 1, reproducible with `seed`); these
    keywords are the options of `generate`, `stream` and OwlModel's methods of the same names."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, segments = prompt.input_ids, prompt.segments
    check_positions(model, ids.shape[1], max_new_tokens)
    batch, device = ids.shape[0], ids.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    positions = positions_from_segments(segments)  # (B, T)
    padded = not bool((segments != 0).all())
    cache = step = None
    if use_cache:
        capacity = ids.shape[1] + max_new_tokens
        dtype = model.decoder.embed_tokens.weight.dtype
        cache = KVCache.allocate(model.cfg.decoder, batch, capacity, device, dtype)
        # Segments of the prompt and of every token to come (1 = real), sliced per step.
        all_segments = F.pad(segments, (0, max_new_tokens), value=1) if padded else None
        key_segments = None if all_segments is None else all_segments[:, : ids.shape[1]]
        logits = model.forward_cached(ids, prompt.images, positions, cache, key_segments)
        if TextStep.supports(model.decoder):
            step = TextStep(model.decoder, capacity)
        key_mask = None if all_segments is None else (all_segments != 0)[:, None, None]
    else:
        logits = model(ids, prompt.images, segment_ids=segments if padded else None)
    logits = logits[:, -1]  # (B, V)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    next_pos = positions[:, -1]  # (B,)
    for index in range(max_new_tokens):
        tokens = sample_next(logits.float(), temperature, top_p, generator)  # (B,)
        tokens = tokens.masked_fill(finished, model.cfg.decoder.pad_token_id)
        if eos_token_id is not None:
            now_eos = tokens == eos_token_id
            yield tokens, ~finished & ~now_eos
            finished = finished | now_eos
            if bool(finished.all()):
                return
        else:
            yield tokens, ~finished
        if index == max_new_tokens - 1:
            return
        next_pos = next_pos + 1
        if step is not None:  # the lean text-token step
            logits = step(tokens, next_pos, cache, key_mask)
        elif cache is not None:  # LoRA-wrapped or hooked decoder: the general cached forward
            key_segments = None if all_segments is None else all_segments[:, : cache.length + 1]
            logits = model.forward_cached(
                tokens[:, None], None, next_pos[:, None], cache, key_segments
            )[:, -1]
        else:  # no cache: recompute the whole sequence, images included
            ids = torch.cat([ids, tokens[:, None]], dim=1)
            segments = torch.cat([segments, torch.ones_like(segments[:, :1])], dim=1)
            logits = model(ids, prompt.images, segment_ids=segments if padded else None)[:, -1]


def generate(
    model: OwlModel,
    input_ids: list[list[int]],
    images: list[torch.Tensor] | None,
    **options: Any,
) -> list[list[int]]:
    """See OwlModel.generate; `options` are `decode`'s keywords."""
    prompt = left_pad(model, input_ids, images)
    # The steps' tokens stay on the device until the end: reading each one back (a host sync per
    # token on a GPU) would stall the next step's kernel launches.
    steps = list(decode(model, prompt, **options))
    outputs: list[list[int]] = [[] for _ in input_ids]
    if not steps:
        return outputs
    tokens = torch.stack([t for t, _ in steps], dim=1).tolist()  # (B, steps)
    alive = torch.stack([a for _, a in steps], dim=1).tolist()
    for out, row, keep in zip(outputs, tokens, alive):
        out.extend(token for token, kept in zip(row, keep) if kept)
    return outputs


def stream(
    model: OwlModel, input_ids: list[int], images: torch.Tensor | None, **options: Any
) -> Iterator[int]:
    """See OwlModel.stream; `options` are `decode`'s keywords."""
    prompt = left_pad(model, [input_ids], None if images is None else [images])
    for tokens, alive in decode(model, prompt, **options):
        if not bool(alive[0]):
            return
        yield int(tokens[0])
