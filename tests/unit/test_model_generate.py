"""Generation: batched left-padded == one by one, KV cache == no cache (the lean decode step and
the general cached path), EOS, streaming, sampling."""

from __future__ import annotations

import pytest
import torch

from owl import IMAGE_TOKEN_ID
from owl.model import OwlModel, get_config, linear
from owl.model.decoder import KVCache, TextStep
from owl.model.generate import left_pad, sample_next
from owl.model.lora import apply_lora, merge_lora
from owl.model.positions import positions_from_segments

NEW = 12


@pytest.fixture(scope="module")
def model() -> OwlModel:
    torch.manual_seed(0)
    model = OwlModel(get_config("debug-tiny")).eval()
    with torch.no_grad():  # larger weights than the init: distinct, non-repeating greedy picks
        for param in model.parameters():
            param.mul_(4.0)
    return model


def _prompt(model: OwlModel, num_text: int, num_images: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    k = model.cfg.num_visual_tokens
    ids: list[int] = [1]
    for _ in range(num_images):
        ids += [IMAGE_TOKEN_ID] * k + torch.randint(3, 256, (2,), generator=generator).tolist()
    return ids + torch.randint(3, 256, (num_text,), generator=generator).tolist()


@pytest.fixture(scope="module")
def prompts(model: OwlModel) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Three prompts of different lengths holding 2, 0 and 1 images."""
    counts = [2, 0, 1]
    ids = [_prompt(model, n, c, seed) for seed, (n, c) in enumerate(zip([3, 9, 5], counts))]
    images = [torch.randn(c, 3, 32, 32, generator=torch.Generator().manual_seed(c)) for c in counts]
    return ids, images


def test_batched_left_padded_equals_one_by_one(model: OwlModel, prompts) -> None:
    ids, images = prompts
    batched = model.generate(ids, images, max_new_tokens=NEW)
    alone = [model.generate([p], [img], max_new_tokens=NEW)[0] for p, img in zip(ids, images)]
    assert batched == alone
    assert all(len(out) == NEW for out in batched)
    assert len({tuple(out) for out in batched}) == 3


def test_kv_cache_equals_recomputing_everything(model: OwlModel, prompts) -> None:
    ids, images = prompts
    cached = model.generate(ids, images, max_new_tokens=NEW)
    recomputed = model.generate(ids, images, max_new_tokens=NEW, use_cache=False)
    assert cached == recomputed


def test_stops_at_eos_per_sample(model: OwlModel, prompts) -> None:
    ids, images = prompts
    free = model.generate(ids, images, max_new_tokens=NEW)
    eos = free[0][3]  # sample 0 stops before its 4th token, the others wherever eos appears
    stopped = model.generate(ids, images, max_new_tokens=NEW, eos_token_id=eos)
    for full, cut in zip(free, stopped):
        expected = full[: full.index(eos)] if eos in full else full
        assert cut == expected
    assert len(stopped[0]) == free[0].index(eos) <= 3


def test_stream_yields_what_generate_returns(model: OwlModel, prompts) -> None:
    ids, images = prompts
    streamed = list(model.stream(ids[0], images[0], max_new_tokens=NEW))
    assert streamed == model.generate([ids[0]], [images[0]], max_new_tokens=NEW)[0]


def test_sampling_is_reproducible_with_a_seed(model: OwlModel, prompts) -> None:
    ids, images = prompts
    options = {"max_new_tokens": NEW, "temperature": 1.5, "top_p": 0.9}
    first = model.generate(ids, images, seed=7, **options)
    assert first == model.generate(ids, images, seed=7, **options)
    assert first != model.generate(ids, images, max_new_tokens=NEW)  # not greedy


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    drawn = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail never drawn


def test_one_image_tensor_per_prompt_is_required(model: OwlModel, prompts) -> None:
    ids, images = prompts
    with pytest.raises(ValueError, match="one tensor per prompt"):
        model.generate(ids, images[:2], max_new_tokens=2)


@pytest.mark.parametrize("variant", ["owl1", "owl2"])
def test_text_step_logits_equal_a_full_recompute(variant: str) -> None:
    """The lean decode step (text branch only, plain weights, GQA via SDPA) against the whole
    model recomputed on the sequence so far, after a left-padded prefill holding images."""
    torch.manual_seed(0)
    model = OwlModel(get_config("debug-tiny", variant)).eval()
    assert TextStep.supports(model.decoder)
    k = model.cfg.num_visual_tokens
    rows = [
        [1, *[IMAGE_TOKEN_ID] * k, 5, 6, 7],
        [1, 9, *[IMAGE_TOKEN_ID] * k, 4, *[IMAGE_TOKEN_ID] * k],
    ]
    prompt = left_pad(model, rows, [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)])
    ids, segments, new = prompt.input_ids, prompt.segments, 20
    cache = KVCache.allocate(model.cfg.decoder, 2, ids.shape[1] + new, ids.device, torch.float32)
    all_segments = torch.nn.functional.pad(segments, (0, new), value=1)
    positions = positions_from_segments(segments)
    step = TextStep(model.decoder, ids.shape[1] + new)
    with torch.no_grad():
        model.forward_cached(ids, prompt.images, positions, cache, segments)
        tokens = torch.randint(3, 256, (new, 2), generator=torch.Generator().manual_seed(1))
        for index in range(new):
            logits = step(
                tokens[index], positions[:, -1] + index + 1, cache, all_segments[:, None, None] != 0
            )
            ids = torch.cat([ids, tokens[index][:, None]], dim=1)
            full = model(ids, prompt.images, segment_ids=all_segments[:, : ids.shape[1]])[:, -1]
            assert (logits - full).abs().max() <= 1e-5, index
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("prefer_onednn", [True, False])  # `Linear` elsewhere / on Intel CPUs
@pytest.mark.parametrize(
    ("name", "variant"), [("debug-tiny", "owl1"), ("debug-tiny", "owl2"), ("demo", "owl2")]
)
def test_text_step_is_bit_identical_to_forward_cached(
    name: str, variant: str, prefer_onednn: bool, monkeypatch
) -> None:
    """TextStep (text branch only, plain weight tensors, rotary tables and key mask built once,
    GQA through SDPA) against the path it replaces, `forward_cached` on the same token (both MAM
    branches, modules called, tables and mask per step), after a left-padded prefill holding
    images: the same logits and the same cache, bit for bit, with (debug-tiny) and without
    (demo) grouped KV heads, with either library under `Linear` (owl.model.linear)."""
    monkeypatch.setattr(linear, "PREFER_ONEDNN", prefer_onednn)
    torch.manual_seed(0)
    model = OwlModel(get_config(name, variant)).eval()
    k, size, vocab = model.cfg.num_visual_tokens, model.cfg.vision.image_size, 256
    rows = [[1, *[IMAGE_TOKEN_ID] * k, 5, 6, 7], [1, 9, *[IMAGE_TOKEN_ID] * k, 4]]
    prompt = left_pad(model, rows, [torch.randn(1, 3, size, size), torch.randn(1, 3, size, size)])
    ids, segments, new = prompt.input_ids, prompt.segments, 12
    capacity = ids.shape[1] + new
    all_segments = torch.nn.functional.pad(segments, (0, new), value=1)
    positions = positions_from_segments(segments)
    caches = [KVCache.allocate(model.cfg.decoder, 2, capacity, ids.device, torch.float32)
              for _ in range(2)]  # fmt: skip
    step = TextStep(model.decoder, capacity)
    tokens = torch.randint(3, vocab, (new, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for cache in caches:
            model.forward_cached(ids, prompt.images, positions, cache, segments)
        for index in range(new):
            pos = positions[:, -1] + index + 1
            ours = step(tokens[index], pos, caches[0], all_segments[:, None, None] != 0)
            end = caches[1].length + 1
            general = model.forward_cached(
                tokens[index][:, None], None, pos[:, None], caches[1], all_segments[:, :end]
            )[:, -1]
            assert torch.equal(ours, general), (index, (ours - general).abs().max())
    assert caches[0].length == caches[1].length == capacity
    for ours, general in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        assert torch.equal(ours, general)


def test_text_step_refuses_wrapped_or_hooked_decoders() -> None:
    """TextStep reads weights directly, so it takes only plain modules without hooks: a hook
    (ZeRO-3 gathers parameters in one) or a LoRA wrapper sends generate to `forward_cached`."""
    torch.manual_seed(0)
    model = OwlModel(get_config("debug-tiny")).eval()
    assert TextStep.supports(model.decoder)
    hook = model.decoder.layers[1].post_attn_norm.register_forward_pre_hook(lambda *_: None)
    assert not TextStep.supports(model.decoder)
    hook.remove()
    assert TextStep.supports(model.decoder)
    assert not TextStep.supports(apply_lora(model, dropout=0.0).decoder)


def test_cache_equals_no_cache_over_many_steps_with_images(model: OwlModel, prompts) -> None:
    """Long greedy runs (the fast step fed back its own tokens for 100 steps) over left-padded
    prompts holding 2, 0 and 1 images, and one image-only prompt alone."""
    ids, images = prompts
    cached = model.generate(ids, images, max_new_tokens=100)
    assert cached == model.generate(ids, images, max_new_tokens=100, use_cache=False)
    assert all(len(set(out)) > 20 for out in cached)  # not a short loop repeated
    k = model.cfg.num_visual_tokens
    alone = [[IMAGE_TOKEN_ID] * k + [7]], [torch.randn(1, 3, 32, 32)]
    assert model.generate(*alone, max_new_tokens=64) == model.generate(
        *alone, max_new_tokens=64, use_cache=False
    )


def test_lora_wrapped_decoder_generates_through_the_general_cached_path() -> None:
    torch.manual_seed(0)
    model = apply_lora(OwlModel(get_config("debug-tiny")), dropout=0.0).eval()
    with torch.no_grad():  # non-zero adapters, so the LoRA branch changes the logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    assert not TextStep.supports(model.decoder)
    k = model.cfg.num_visual_tokens
    ids = [[1, *[IMAGE_TOKEN_ID] * k, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    images = [torch.randn(1, 3, 32, 32), torch.zeros(0, 3, 32, 32)]
    cached = model.generate(ids, images, max_new_tokens=30)
    assert cached == model.generate(ids, images, max_new_tokens=30, use_cache=False)
    merged = merge_lora(model)
    assert TextStep.supports(merged.decoder)
    assert merged.generate(ids, images, max_new_tokens=30) == cached


def test_prompt_plus_new_tokens_beyond_max_positions_is_refused(model: OwlModel, prompts) -> None:
    ids, images = prompts
    limit = model.cfg.decoder.max_positions  # 512 for debug-tiny
    longest = max(len(p) for p in ids)  # image slots included
    room = limit - longest
    with pytest.raises(ValueError) as error:
        model.generate(ids, images, max_new_tokens=room + 1)
    message = str(error.value)
    assert f"longest prompt has {longest} tokens" in message
    assert f"max_new_tokens is {room + 1}" in message
    assert f"decoder.max_positions={limit}" in message
    assert f"lower max_new_tokens to at most {room}" in message
    with pytest.raises(ValueError, match="max_positions"):
        next(model.stream(ids[0], images[0], max_new_tokens=limit, use_cache=False))
    with pytest.raises(ValueError, match="it alone fills the positions"):
        model.generate([[5] * limit], None, max_new_tokens=1)
    near = [[5] * (limit - 2)]
    with pytest.raises(ValueError, match="at most 2"):
        model.generate(near, None, max_new_tokens=3)
    assert len(model.generate(near, None, max_new_tokens=2)[0]) == 2  # exactly at the limit
