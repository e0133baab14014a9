"""Near-duplicate images by perceptual hash, without comparing all pairs.

Each image gets a 64-bit pHash (`imagehash.phash`: DCT of the 32x32 greyscale image, the 8x8
low frequencies against their median). Two images are near-duplicates when their hashes differ in
at most `radius` bits. A sample is dropped when an image with a *smaller key* lies within the
radius, so every cluster keeps its first occurrence and the result does not depend on shard
boundaries or on the order in which anything ran (in a chain A~B~C with A and C far apart, B and
C both go: each has a smaller neighbour).

Finding the pairs is multi-index hashing: the 64 bits are cut into `radius + 1` bands; two hashes
within `radius` bits agree exactly on at least one band (pigeonhole), so only samples that share
a (band, value) bucket are compared. The work is one row per sample and band plus the
comparisons inside each bucket (`bucket_near_duplicates`), where equal hashes are collapsed first
so a thousand copies of one image cost one comparison row, not a million.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

HASH_BITS = 64
# Distinct hashes compared per step inside a bucket: bounds the (rows x bucket) distance matrix.
_CHUNK = 1024


def phash64(data: bytes) -> int:
    """The 64-bit perceptual hash of an encoded image, as an unsigned integer."""
    import imagehash

    with Image.open(io.BytesIO(data)) as image:
        bits = imagehash.phash(image).hash.flatten()  # (64,) bool, row-major
    return int(np.packbits(bits).view(">u8")[0])


def band_slices(radius: int) -> list[tuple[int, int]]:
    """(shift, width) of each of the `radius + 1` bands, covering the 64 bits."""
    if not 0 <= radius < HASH_BITS // 2:
        raise ValueError(f"near_dup_radius={radius}: must be in [0, {HASH_BITS // 2 - 1}]")
    num_bands = radius + 1
    widths = [HASH_BITS // num_bands + (i < HASH_BITS % num_bands) for i in range(num_bands)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(s), w) for s, w in zip(shifts, widths)]


def band_values(hashes: np.ndarray, radius: int) -> list[np.ndarray]:
    """Per band, the (N,) uint64 value of that band of each hash."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    out = []
    for shift, width in band_slices(radius):
        mask = np.uint64((1 << width) - 1)
        out.append((hashes >> np.uint64(shift)) & mask)
    return out


def bucket_near_duplicates(keys: list[str], hashes: np.ndarray, radius: int) -> list[str]:
    """The keys of one bucket that have a smaller key within `radius` bits (exact copies of a
    hash included). Time: (distinct hashes)^2 / 2 popcounts; memory: `_CHUNK` rows at a time."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    order = np.argsort(np.asarray(keys, dtype=str), kind="stable")
    sorted_keys = [keys[i] for i in order]
    sorted_hashes = hashes[order]
    # First occurrence (smallest key) of each distinct hash; the other copies are duplicates.
    distinct, first = np.unique(sorted_hashes, return_index=True)
    is_first = np.zeros(len(sorted_keys), bool)
    is_first[first] = True
    dropped = [k for k, keep in zip(sorted_keys, is_first) if not keep]
    by_key = np.argsort(first)
    distinct, first = distinct[by_key], first[by_key]  # in order of first occurrence
    for start in range(0, len(distinct), _CHUNK):
        rows = distinct[start : start + _CHUNK]  # (C,)
        earlier = distinct[: start + len(rows)]  # (E,)
        dist = np.bitwise_count(rows[:, None] ^ earlier[None, :])  # (C, E)
        close = (dist <= radius) & (
            np.arange(len(earlier))[None, :] < np.arange(start, start + len(rows))[:, None]
        )
        dropped.extend(sorted_keys[first[start + i]] for i in np.flatnonzero(close.any(axis=1)))
    return dropped
