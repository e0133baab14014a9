"""LLaMA decoder with the optional modality-adaptive module (MAM) of mPLUG-Owl2.

With the MAM each layer has two copies of the input norm, the post-attention norm, k_proj and
v_proj: the plain names are the text branch (so LLaMA weights map 1:1) and the `*_visual` names the
visual branch. Query, output projection, MLP, RoPE, embeddings, final norm and lm_head are shared.
Both branches run on every token and the explicit modality mask picks per token (`torch.where` for
k/v; the two norms share the normalization and differ only in the weight, looked up per token): the
module sequence is the same whatever the batch holds (ZeRO-3 traces stay consistent across ranks,
unlike the authors' release which skipped an empty branch).

Linear layers are `owl.model.linear.Linear`: nn.Linear whose fp32 CPU products go through oneDNN
(MKL on an Intel CPU, where it is the faster).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from owl.model.config import DecoderConfig
from owl.model.linear import Linear


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 (bf16-safe) and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x32 * rsqrt(mean(x32^2) + eps)).to(dtype), before the weight: torch's rms_norm upcasts
        to fp32 inside and casts back; the weight is applied after the cast, as LLaMA does."""
        return F.rms_norm(x, self.weight.shape, eps=self.eps)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for positions (B, T) -> cos, signed sin (B, T, 1, d), computed in fp32.

    The rotation's sign is folded into the sine table (its first half negated), so `apply_rope`
    is two products and a roll. Built once per forward and shared by every layer."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (exponent.float() / head_dim))  # (d/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, d/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (B, T, d)
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x (B, T, h, d): the LLaMA / Hugging Face convention.

    x * cos + roll(x, d/2) * signed_sin is x * cos + cat(-x2, x1) * sin bit for bit (only the
    sign of a product moves), with one elementwise op fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _hooked(module: nn.Module) -> bool:
    """True when forward (pre-)hooks are registered on `module` (ZeRO-3 gathers parameters in a
    forward pre-hook): code that reads its weights directly instead of calling it must not."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _plain_norms(*norms: nn.Module) -> bool:
    """True when each module is exactly RMSNorm without hooks (backward ones included), so its
    weight can be used directly; a hooked one must be called instead."""
    return all(type(m) is RMSNorm and not (_hooked(m) or m._backward_hooks) for m in norms)


@dataclass
class KVCache:
    """Preallocated keys/values per layer, each (B, kv_heads, max_len, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(
        cls, cfg: DecoderConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        return cls(keys, [torch.zeros_like(k) for k in keys])

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, T, d) after the cached ones; return all keys/values so far."""
        end = self.length + k.shape[2]
        capacity = self.keys[layer].shape[2]
        if end > capacity:
            raise ValueError(f"KV cache holds {capacity} positions, asked for {end}")
        self.keys[layer].narrow(2, self.length, k.shape[2]).copy_(k)
        self.values[layer].narrow(2, self.length, v.shape[2]).copy_(v)
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)


class SegmentLayout:
    """Attention within segments of packed rows, computed per segment instead of under a mask.

    Faster than SDPA under the dense mask on packed rows (measured: BENCHMARKS.md, "The decoder's
    forward paths"); same outputs and gradients (tests/unit/test_segment_layout.py).

    A packed row of T tokens under a (T, T) block-diagonal mask costs a dense T x T attention,
    most of it on pairs the mask throws away. Here every segment (sample) of the batch becomes
    one row of a *bucket* of segments of similar length, each bucket is one causal SDPA call,
    and the outputs go back to their places: the cost follows the sum of squared sample
    lengths. A bucket pads a segment after its last token, so causal attention never lets a
    real token see the padding. Padding tokens of the batch (segment 0) get a zero output.

    Built once per forward from segment_ids (B, T) and shared by every layer: one gather in
    (all buckets' slots, in order) and one gather out per attention call.
    """

    def __init__(self, segment_ids: torch.Tensor, *, slack: float = 1.25, min_length: int = 32):
        length = segment_ids.shape[1]
        flat = segment_ids.reshape(-1)  # (B*T,)
        device = flat.device
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::length] = True  # a segment never continues into the next row
        start = torch.nonzero(starts).flatten()
        count = torch.diff(start, append=start.new_tensor([flat.numel()]))
        real = flat[start] > 0
        start, count = start[real], count[real]
        order = torch.argsort(count, descending=True, stable=True)
        start, count = start[order], count[order]
        self.size = flat.numel()
        self.shapes: list[tuple[int, int]] = []  # (segments, width) per bucket
        gathers, valids = [], []
        for lo, hi in _buckets(count.tolist(), slack=slack, min_length=min_length):
            width = int(count[lo])
            offsets = torch.arange(width, device=device)  # (L,)
            valid = offsets < count[lo:hi, None]  # (n, L)
            gathers.append(torch.where(valid, start[lo:hi, None] + offsets, 0).flatten())
            valids.append(valid.flatten())
            self.shapes.append((hi - lo, width))
        slots = sum(n * width for n, width in self.shapes)
        self.gather = torch.cat(gathers) if gathers else flat.new_zeros(0)  # (slots,)
        valid = torch.cat(valids) if valids else torch.zeros(0, dtype=torch.bool, device=device)
        # Slot of each token's output; padding tokens read slot `slots`, a zero row.
        self.scatter = torch.full((self.size,), slots, dtype=torch.long, device=device)
        self.scatter[self.gather[valid]] = torch.nonzero(valid).flatten()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, T, h, d), positions already rotated -> attention output (B, T, h, d)."""
        heads, dim = q.shape[2:]
        sizes = [n * width for n, width in self.shapes]
        slotted = [t.reshape(self.size, heads, dim)[self.gather].split(sizes) for t in (q, k, v)]
        outputs = []
        for (n, width), qb, kb, vb in zip(self.shapes, *slotted, strict=True):
            qb, kb, vb = (t.view(n, width, heads, dim).transpose(1, 2) for t in (qb, kb, vb))
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)  # (n, h, L, d)
            outputs.append(out.transpose(1, 2).reshape(n * width, heads, dim))
        outputs.append(q.new_zeros(1, heads, dim))
        return torch.cat(outputs)[self.scatter].view(q.shape)


def _buckets(lengths: list[int], *, slack: float, min_length: int) -> list[tuple[int, int]]:
    """Split lengths (sorted longest first) into runs [lo, hi), each padded to its first length.

    A run grows while its padded attention cost (n * L_max^2) stays within `slack` times the
    cost of its segments alone (sum of L^2), and always once L_max <= min_length (short calls
    cost more in overhead than in padding)."""
    runs, lo, squares = [], 0, 0
    for i, n in enumerate(lengths):
        widest = lengths[lo]
        if i > lo and widest > min_length and (i - lo + 1) * widest**2 > slack * (squares + n * n):
            runs.append((lo, i))
            lo, squares = i, 0
        squares += n * n
    if lengths:
        runs.append((lo, len(lengths)))
    return runs


AttentionMask = torch.Tensor | SegmentLayout | None
"""(B, 1, T, S) bool (True = may attend), a SegmentLayout, or None for plain causal."""


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.hidden % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(
                f"decoder.hidden ({cfg.hidden}) must be divisible by decoder.num_heads "
                f"({cfg.num_heads}), and num_heads by decoder.num_kv_heads ({cfg.num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        kv_width = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden, cfg.hidden, bias=False)
        self.k_proj = Linear(cfg.hidden, kv_width, bias=False)
        self.v_proj = Linear(cfg.hidden, kv_width, bias=False)
        self.o_proj = Linear(cfg.hidden, cfg.hidden, bias=False)
        if cfg.modality_adaptive:
            self.k_proj_visual = Linear(cfg.hidden, kv_width, bias=False)
            self.v_proj_visual = Linear(cfg.hidden, kv_width, bias=False)

    def _keys_values(
        self, x: torch.Tensor, visual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k_proj(x), self.v_proj(x)  # (B, T, kv_width)
        if visual is not None:  # MAM: both branches on every token, select per token
            k = torch.where(visual, self.k_proj_visual(x), k)
            v = torch.where(visual, self.v_proj_visual(x), v)
        return k, v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D) already normed (per modality)
        visual: torch.Tensor | None,  # (B, T, 1) bool, None without MAM
        cos: torch.Tensor,  # (B, T, 1, d)
        sin: torch.Tensor,  # signed, see rope_cos_sin
        mask: AttentionMask,
        cache: KVCache | None,
        layer_idx: int,
    ) -> torch.Tensor:
        batch, length, hidden = x.shape
        k, v = self._keys_values(x, visual)
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)  # (B, T, h, d)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)  # (B, T, kv, d)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.num_heads // self.num_kv_heads  # grouped KV: query head i reads kv head i // rep
        if isinstance(mask, SegmentLayout):
            assert cache is None, "a SegmentLayout is for full sequences, not cached steps"
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            out = mask.attend(q, k, v)  # (B, T, h, d)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, *, T, d)
            if cache is not None:
                k, v = cache.append(layer_idx, k, v)  # (B, kv, S, d)
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and length > 1
            ).transpose(1, 2)  # (B, T, h, d)
        return self.o_proj(out.reshape(batch, length, hidden))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden, cfg.ffn_dim, bias=False)
        self.up_proj = Linear(cfg.hidden, cfg.ffn_dim, bias=False)
        self.down_proj = Linear(cfg.ffn_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if cfg.modality_adaptive:
            self.input_norm_visual = RMSNorm(cfg.hidden, cfg.rms_norm_eps)
            self.post_attn_norm_visual = RMSNorm(cfg.hidden, cfg.rms_norm_eps)

    def _norm(self, x: torch.Tensor, visual: torch.Tensor | None, which: str) -> torch.Tensor:
        text = getattr(self, which)
        if visual is None:
            return text(x)
        visual_norm = getattr(self, f"{which}_visual")
        if _plain_norms(text, visual_norm):
            # Buys ~1.1x on owl2's forward+backward (BENCHMARKS.md, "Model"), bit-identical forward
            # (tests/unit/test_decoder_fast_paths.py): both branches normalize x the same way and
            # differ only in the weight, so normalize once and look each token's weight up (row 0
            # text, row 1 visual). A hooked norm (ZeRO-3) must be called: two norms and a select.
            weights = torch.stack([text.weight, visual_norm.weight])  # (2, D)
            return F.embedding(visual[..., 0].long(), weights) * text.normalize(x)
        return torch.where(visual, visual_norm(x), text(x))

    def forward(
        self,
        x: torch.Tensor,
        visual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        h = self._norm(x, visual, "input_norm")
        x = x + self.attn(h, visual, cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self._norm(x, visual, "post_attn_norm"))


class Decoder(nn.Module):
    """Token embeddings in, logits out. `modality` (B, T) bool marks visual tokens (MAM input)."""

    def __init__(self, cfg: DecoderConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        embeds: torch.Tensor,  # (B, T, D)
        modality: torch.Tensor,  # (B, T) bool, True = visual
        position_ids: torch.Tensor,  # (B, T)
        mask: AttentionMask = None,  # None = causal, no padding
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        visual = modality[..., None] if self.cfg.modality_adaptive else None  # (B, T, 1)
        x = embeds
        for idx, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, visual, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, visual, cos, sin, mask, cache, idx)
        if cache is not None:
            cache.length += embeds.shape[1]
        return self.lm_head(self.norm(x))  # (B, T, V)


class TextStep:
    """One generated token per row through the decoder, for the cached decode loop.

    More tokens/s than `forward_cached` (measured: BENCHMARKS.md, "The decoder's forward paths"),
    with the same logits and cache bit for bit at the sizes tested
    (test_model_generate.py; where `Linear` takes oneDNN, past its size it rounds differently from
    F.linear).
    It computes what Decoder.forward computes for a text token appended to the cached sequence,
    with less work per token (at small widths a decode step is mostly per-operator overhead):
    - text branch only: a generated token is never visual, so the MAM's visual norms and k/v
      copies are skipped (training forward passes still run both branches);
    - the weights are read once as plain tensors (shared storage, no copies): no module calls or
      parameter dispatch per layer (the same step calling the modules is slower: BENCHMARKS.md);
      activations stay (B, D), one token per row;
    - rotary tables for every position up to the cache's capacity are computed once;
    - keys/values are written in place into the preallocated cache;
    - grouped KV heads go through SDPA's `enable_gqa` instead of repeating the whole cache.
    Only for decoders whose modules are plain Linear / RMSNorm / ... without hooks
    (`supports`); LoRA-wrapped or hooked decoders (peft, ZeRO-3) run Decoder.forward with the cache
    instead."""

    def __init__(self, decoder: Decoder, capacity: int) -> None:
        cfg = decoder.cfg
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.hidden, self.eps = (cfg.hidden,), cfg.rms_norm_eps
        self.embed = decoder.embed_tokens.weight.detach()
        self.layers = [
            tuple(
                w.detach()
                for w in (
                    layer.input_norm.weight,
                    layer.attn.q_proj.weight,
                    layer.attn.k_proj.weight,
                    layer.attn.v_proj.weight,
                    layer.attn.o_proj.weight,
                    layer.post_attn_norm.weight,
                    layer.mlp.gate_proj.weight,
                    layer.mlp.up_proj.weight,
                    layer.mlp.down_proj.weight,
                )
            )
            for layer in decoder.layers
        ]
        self.norm = decoder.norm.weight.detach()
        self.lm_head = decoder.lm_head.weight.detach()
        positions = torch.arange(capacity, device=self.embed.device)[None]  # (1, L)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.embed.dtype)
        # (L, 1, 1, d): indexing with positions (B,) gives (B, 1, 1, d) for (B, h, 1, d) heads.
        self.cos, self.sin = cos[0, :, None], sin[0, :, None]  # sin signed, as apply_rope's

    @staticmethod
    def supports(decoder: Decoder) -> bool:
        """True when every decoder module is a plain one, without hooks, that this step reproduces."""
        plain = (Decoder, DecoderLayer, Attention, MLP, RMSNorm, Linear, nn.Embedding)
        return all(
            type(module) in (*plain, nn.ModuleList) and not _hooked(module)
            for module in decoder.modules()
        )

    def __call__(
        self,
        tokens: torch.Tensor,  # (B,) text token ids
        positions: torch.Tensor,  # (B,) their rotary positions
        cache: KVCache,
        key_mask: torch.Tensor | None,  # (B, 1, 1, capacity) bool, True = may attend; None = all
    ) -> torch.Tensor:
        """Logits (B, V) for the new tokens; the cache grows by one position."""
        batch, start = tokens.shape[0], cache.length
        end = start + 1
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[positions], self.sin[positions]  # (B, 1, 1, d)
        mask = None if key_mask is None else key_mask[..., :end]
        x = F.embedding(tokens, self.embed)  # (B, D)
        for idx, (norm_in, wq, wk, wv, wo, norm_post, gate, up, down) in enumerate(self.layers):
            h = norm_in * F.rms_norm(x, self.hidden, eps=self.eps)
            # One token per row: (B, h * d) viewed as (B, h, 1, d) are the usual attention heads.
            q = F.linear(h, wq).view(batch, heads, 1, head_dim)
            k = F.linear(h, wk).view(batch, kv_heads, 1, head_dim)
            keys, values = cache.keys[idx], cache.values[idx]
            keys[:, :, start:end] = apply_rope(k, cos, sin)
            values[:, :, start:end] = F.linear(h, wv).view(batch, kv_heads, 1, head_dim)
            out = F.scaled_dot_product_attention(
                apply_rope(q, cos, sin),
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=mask,
                enable_gqa=kv_heads != heads,
            )  # (B, h, 1, d)
            x = x + F.linear(out.view(batch, heads * head_dim), wo)
            h = norm_post * F.rms_norm(x, self.hidden, eps=self.eps)
            x = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
        cache.length = end
        return F.linear(self.norm * F.rms_norm(x, self.hidden, eps=self.eps), self.lm_head)
