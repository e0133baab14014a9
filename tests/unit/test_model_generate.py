"""Generation: batched left-padded == one by one, KV cache == no cache, EOS, streaming, sampling."""

from __future__ import annotations

import pytest
import torch

from owl import IMAGE_TOKEN_ID
from owl.model import build_model
from owl.model.generate import sample_next
from owl.model.model import OwlModel

NEW = 12


@pytest.fixture(scope="module")
def model() -> OwlModel:
    torch.manual_seed(0)
    model = build_model("debug-tiny").eval()
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
