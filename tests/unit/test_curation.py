"""The curation rules' library parts: CLIP score (against transformers' CLIPModel computed here,
its own way), keep-top-fraction, perceptual hashes (against imagehash) and the banded
near-duplicate search (against all pairs)."""

import io

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from owl.data.clip_score import ClipScorer, check_clip_folder, keep_top_fraction
from owl.data.near_dup import band_slices, band_values, bucket_near_duplicates, phash64
from pipelines.steps._filter_near_dup import _bucket_rows, _partition_drops
from pipelines.steps.filter import Config
from tests.unit.curation_fixtures import pattern_png, reference_scores
from tests.unit.tiny_pretrained import save_clip_and_llama, save_clip_model


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "clip"
    save_clip_model(folder)
    return folder


def test_clip_scores_match_transformers_computed_independently(clip_folder):
    images = [pattern_png(i, size=24 + 8 * i) for i in range(5)]
    captions = ["a red square", "two blue circles on grey", "x", "a photo of a cat", "green"]
    scorer = ClipScorer(clip_folder)
    batched = scorer.scores(images, captions)
    assert batched.dtype == np.float32 and batched.shape == (5,)
    np.testing.assert_allclose(batched, reference_scores(clip_folder, images, captions), atol=1e-5)
    # A sample's score does not depend on its batch (captions padded to the full context).
    assert scorer.scores(images[2:3], captions[2:3])[0] == pytest.approx(batched[2], abs=1e-6)
    assert scorer.scores([], []).shape == (0,)


def test_clip_folder_must_hold_both_towers(tmp_path, clip_folder):
    check_clip_folder(clip_folder, "filter.clip_model")
    save_clip_and_llama(tmp_path / "vision", tmp_path / "llama")
    with pytest.raises(ValueError, match=r"filter.clip_model: .*without its text tower"):
        check_clip_folder(tmp_path / "vision", "filter.clip_model")
    with pytest.raises(ValueError, match="not a Hugging Face CLIP folder"):
        check_clip_folder(tmp_path / "nothing", "filter.clip_model")


def test_init_reads_the_vision_tower_of_a_full_clip_model(clip_folder):
    from transformers import CLIPModel

    from owl.model.hf_import import load_clip_vision
    from owl.model.registry import get_config

    ours = load_clip_vision(get_config("debug-tiny"), clip_folder)  # text tower left out
    vision = CLIPModel.from_pretrained(clip_folder).vision_model
    assert all(name.startswith("vision.") for name in ours)
    torch.testing.assert_close(
        ours["vision.patch_embed.weight"], vision.embeddings.patch_embedding.weight
    )
    torch.testing.assert_close(ours["vision.post_norm.bias"], vision.post_layernorm.bias)


def test_keep_top_fraction_keeps_the_best_and_breaks_ties_by_key():
    keys = ["e", "a", "d", "b", "c"]
    scores = np.array([0.1, 0.5, 0.5, 0.9, -0.2])
    assert keep_top_fraction(keys, scores, 0.4) == {"e", "d", "c"}  # keeps b, then a (tie: a < d)
    assert keep_top_fraction(keys, scores, 0.5) == {"e", "c"}  # ceil(2.5) = 3 kept
    assert keep_top_fraction(keys, scores, 1.0) == set()
    with pytest.raises(ValueError, match="keep_top_fraction"):
        keep_top_fraction(keys, scores, 0.0)


def test_phash64_is_imagehash_phash_as_an_integer():
    for seed in range(4):
        data = pattern_png(seed)
        assert f"{phash64(data):016x}" == str(imagehash.phash(Image.open(io.BytesIO(data))))


def test_bands_cover_the_hash_so_close_hashes_share_one():
    for radius in (0, 1, 4, 7):
        slices = band_slices(radius)
        assert len(slices) == radius + 1 and sum(w for _, w in slices) == 64
        assert slices[0][0] == 0 and all(s + w == t for (s, w), (t, _) in zip(slices, slices[1:]))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 200, dtype=np.uint64)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, 4, replace=False)) for _ in base])
    near = base ^ flips.astype(np.uint64)  # 4 bits away from base
    assert all(b.dtype == np.uint64 for b in band_values(base, 4))
    shared = np.any([b == n for b, n in zip(band_values(base, 4), band_values(near, 4))], axis=0)
    assert shared.all()
    with pytest.raises(ValueError, match="near_dup_radius"):
        band_slices(32)


def _all_pairs(keys, hashes, radius):
    hashes = np.asarray(hashes, dtype=np.uint64)
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    rank = np.asarray(keys)
    return {
        keys[i] for i in np.flatnonzero(((dist <= radius) & (rank[None, :] < rank[:, None])).any(1))
    }


def test_banded_search_finds_what_all_pairs_finds():
    """Planted copies 0-3 bits away; partitions of the shuffle searched one by one."""
    rng = np.random.default_rng(1)
    hashes = list(rng.integers(0, 2**63, 300, dtype=np.uint64))
    for i in range(60):  # copies 0..3 bits away, and exact copies
        flip = sum(1 << int(b) for b in rng.choice(64, i % 4, replace=False))
        hashes.append(np.uint64(int(hashes[i * 3]) ^ flip))
    keys = [f"{k:05d}" for k in rng.permutation(len(hashes))]
    hashes = np.array(hashes, dtype=np.uint64)
    table = pa.table({"key": keys, "phash": pa.array(hashes, pa.uint64())})
    for radius in (0, 2, 3):
        rows = _bucket_rows(table, radius=radius, num_partitions=3)  # the step's shuffle, here
        found = set()
        for part in range(3):
            in_part = rows.filter(pc.equal(rows.column("partition"), part))
            found.update(_partition_drops(in_part, radius=radius).column("key").to_pylist())
        expected = _all_pairs(keys, hashes, radius)
        assert found == expected and len(expected) >= 15 * (radius > 0)


def test_filter_config_checks_the_curation_fields():
    with pytest.raises(ValueError, match="need clip_model"):
        Config(min_clip_score=0.2)
    with pytest.raises(ValueError, match="not both"):
        Config(clip_model="/x", min_clip_score=0.2, clip_keep_fraction=0.5)
    with pytest.raises(ValueError, match="clip_keep_fraction"):
        Config(clip_model="/x", clip_keep_fraction=1.5)
    with pytest.raises(ValueError, match="near_dup_radius"):
        Config(near_dup_radius=-1)
    assert Config(near_dup_radius=4, clip_model="/x", clip_keep_fraction=0.3).near_dup_radius == 4


def test_a_bucket_keeps_the_smallest_key_of_each_cluster():
    h = 0x0123456789ABCDEF
    keys = ["b", "a", "c", "d", "e"]
    hashes = np.array([h, h, h ^ 0b11, h ^ 0xFF00, h ^ 0b11], dtype=np.uint64)
    assert sorted(bucket_near_duplicates(keys, hashes, 2)) == ["b", "c", "e"]  # "a" is first
    assert sorted(bucket_near_duplicates(keys, hashes, 0)) == ["b", "e"]  # exact copies only
