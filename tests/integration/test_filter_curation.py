"""The filter step's curation rules on a real Ray: perceptual near-duplicates across shards and the
CLIP score (a tiny CLIPModel saved by transformers), on downloaded shards whose expected drops are
known: the near-copies are planted (and their hash distances checked here with imagehash), the
CLIP scores are computed here with transformers' CLIPModel, one sample at a time."""

import io
import tarfile
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from owl.data.manifest import Manifest
from pipelines.step import StepContext, StepInput
from pipelines.steps import filter as filter_step
from tests.unit.curation_fixtures import pattern_png, reference_scores
from tests.unit.tiny_pretrained import save_clip_model

pytestmark = pytest.mark.usefixtures("local_ray")

RADIUS = 4
WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "a",
    "photo",
    "of",
    "the",
    "small",
    "large",
    "sky",
    "tree",
    "car",
    "on",
    "in",
]


def _jpeg(data: bytes, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resized(data: bytes, size: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).resize((size, size), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _brighter(data: bytes) -> bytes:
    buf = io.BytesIO()
    ImageEnhance.Brightness(Image.open(io.BytesIO(data)).convert("RGB")).enhance(1.1).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _samples() -> dict[str, tuple[bytes, str]]:
    """key -> (image, caption): 3 shards of 6. Planted: 0000?0005 an exact copy of 000000002;
    three near-copies, each later (by key) than its original, except pattern 12's whose copy
    comes first, so the original goes."""
    base = {seed: pattern_png(seed) for seed in range(20)}
    images = [base[s] for s in range(12)]  # 000000000..000010005 distinct
    images += [
        _jpeg(base[0], 70),  # 000020000 ~ 000000000
        _resized(base[1], 48),  # 000020001 ~ 000000001
        _brighter(base[12]),  # 000020002, and its original is 000020004
        base[2],  # 000020003: exact copy of 000000002
        base[12],  # 000020004
        base[13],  # 000020005
    ]
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, 4)) for _ in images]
    keys = [f"{shard:05d}{i:04d}" for shard in range(3) for i in range(6)]
    return dict(zip(keys, zip(images, captions)))


NEAR = {"000020000", "000020001", "000020004"}
EXACT = {"000020003"}


def _download_output(root: Path, samples: dict[str, tuple[bytes, str]]) -> StepInput:
    """The download step's output for `samples`: a webdataset tar and img2dataset's parquet per
    shard (6 samples each), and its manifest."""
    (root / "shards").mkdir(parents=True)
    manifest = Manifest(step="download")
    keys = sorted(samples)
    for shard in range(3):
        stem, rows = f"{shard:05d}", []
        with tarfile.open(root / "shards" / f"{stem}.tar", "w") as tar:
            for key in keys[shard * 6 : shard * 6 + 6]:
                image, caption = samples[key]
                info = tarfile.TarInfo(f"{key}.png")
                info.size = len(image)
                tar.addfile(info, io.BytesIO(image))
                width, height = Image.open(io.BytesIO(image)).size
                rows.append(
                    {"key": key, "url": f"http://x/{key}.png", "caption": caption,
                     "status": "success", "width": width, "height": height,
                     "original_width": width, "original_height": height}
                )  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), root / "shards" / f"{stem}.parquet")
        manifest.add_file(root, f"shards/{stem}.tar", rows=6)
        manifest.add_file(root, f"shards/{stem}.parquet", rows=6)
    return StepInput("download", root, manifest)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curation")
    samples = _samples()
    save_clip_model(tmp / "clip")
    keys = sorted(samples)
    images, captions = zip(*(samples[k] for k in keys))
    scores = dict(zip(keys, reference_scores(tmp / "clip", list(images), list(captions))))
    return tmp, samples, _download_output(tmp / "download", samples), scores


def _filter(tmp: Path, data: StepInput, name: str, **rules) -> tuple[Manifest, pa.Table]:
    out = tmp / name
    ctx = StepContext(step="filter", out_dir=out, job_name="test", model=None)
    manifest = filter_step.run(ctx, filter_step.Config(**rules), {"data": data})
    return manifest, pa.concat_tables(pq.read_table(out / f.path) for f in manifest.files)


def test_planted_near_copies_are_within_the_radius_and_the_rest_far_apart(fixture):
    _, samples, _, _ = fixture
    hashes = {k: imagehash.phash(Image.open(io.BytesIO(v[0]))) for k, v in samples.items()}
    close = {(a, b) for a in hashes for b in hashes if a < b and hashes[a] - hashes[b] <= RADIUS}
    assert close == {
        ("000000000", "000020000"), ("000000001", "000020001"), ("000000002", "000020003"),
        ("000020002", "000020004"),
    }  # fmt: skip


def test_near_duplicates_and_clip_threshold_drop_what_is_expected(fixture):
    tmp, samples, data, scores = fixture
    rest = sorted(set(samples) - NEAR - EXACT)
    ranked = sorted(rest, key=lambda k: scores[k])
    # A threshold halfway between the 5th and 6th lowest reference scores: 5 samples go.
    low, high = scores[ranked[4]], scores[ranked[5]]
    assert high - low > 1e-4
    manifest, table = _filter(
        tmp, data, "near-threshold", near_dup_radius=RADIUS, clip_model=str(tmp / "clip"),
        min_clip_score=float((low + high) / 2), clip_batch_size=4,
    )  # fmt: skip
    assert manifest.dropped == {
        "filter.duplicate_image": 1,
        "filter.near_duplicate_image": 3,
        "filter.clip_score": 5,
    }
    assert table.column("key").to_pylist() == sorted(ranked[5:])
    assert table.column_names[-1] == "clip_score"
    np.testing.assert_allclose(
        table.column("clip_score").to_numpy(),
        [scores[k] for k in table.column("key").to_pylist()],
        atol=1e-5,
    )


def test_clip_keep_fraction_keeps_the_best_share(fixture):
    tmp, samples, data, scores = fixture
    manifest, table = _filter(
        tmp, data, "fraction", dedup_image=False, clip_model=str(tmp / "clip"),
        clip_keep_fraction=0.25,
    )  # fmt: skip
    best = sorted(samples, key=lambda k: -scores[k])[:5]  # ceil(0.25 * 18)
    assert manifest.dropped == {"filter.clip_score": 13}
    assert table.column("key").to_pylist() == sorted(best)
