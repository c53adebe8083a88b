"""Perceptual hashes (pHash, dHash) and Hamming-distance search for near-duplicate images.

Both hashes follow the definitions popularised by ``imagehash`` (pHash: signs of the low-frequency
block of a DCT of a grey thumbnail against its median; dHash: signs of horizontal gradients of a
grey thumbnail), written with numpy only so the filter needs no extra dependency.

Hashes are stored packed: one image is a row of ``uint64`` words, so a set of images is a
``(n, words)`` array and Hamming distances are ``popcount(a ^ b)`` summed over words.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from PIL import Image

HASH_KINDS: tuple[str, ...] = ("phash", "dhash")

# pHash thumbnails are this many times larger than the hash side, so the DCT sees enough detail
# for its low frequencies to be stable (imagehash's ``highfreq_factor``).
PHASH_OVERSAMPLE = 4


def hash_size_for_bits(bits: int) -> int:
    """Side of the square bit grid for a ``bits``-bit hash (64 → 8, 256 → 16)."""
    side = math.isqrt(int(bits))
    if side * side != bits or side < 2:
        raise ValueError(f"hash bits must be a square number ≥ 4 (64, 144, 256...), got {bits}")
    return side


def _dct_matrix(n: int) -> np.ndarray:
    # Unnormalised DCT-II basis: every row shares the same scale, so signs against the median
    # come out exactly as with scipy's default ``dct`` (which imagehash uses).
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))


def phash_bits(image: Image.Image, hash_size: int = 8) -> np.ndarray:
    """pHash of ``image`` as a flat bool array of ``hash_size**2`` bits."""
    side = hash_size * PHASH_OVERSAMPLE
    grey = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    basis = _dct_matrix(side)[:hash_size]
    low = basis @ pixels @ basis.T
    return (low > np.median(low)).ravel()


def dhash_bits(image: Image.Image, hash_size: int = 8) -> np.ndarray:
    """dHash (horizontal gradient) of ``image`` as a flat bool array of ``hash_size**2`` bits."""
    grey = image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.int16)
    return (pixels[:, 1:] > pixels[:, :-1]).ravel()


def image_hash(image: Image.Image, kind: str = "phash", hash_size: int = 8) -> np.ndarray:
    """Packed hash of one image: a 1-D ``uint64`` array of ``ceil(hash_size**2 / 64)`` words."""
    if kind == "phash":
        bits = phash_bits(image, hash_size)
    elif kind == "dhash":
        bits = dhash_bits(image, hash_size)
    else:
        raise ValueError(f"unknown hash kind {kind!r}; expected one of {', '.join(HASH_KINDS)}")
    return pack_bits(bits)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a flat bool array into ``uint64`` words (zero-padded to a whole word)."""
    bits = np.asarray(bits, dtype=bool).ravel()
    words = -(-bits.size // 64)
    padded = np.zeros(words * 64, dtype=bool)
    padded[: bits.size] = bits
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


def words_for_bits(bits: int) -> int:
    """Number of ``uint64`` words a packed ``bits``-bit hash occupies."""
    return -(-int(bits) // 64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed hash sets ``a`` (n, w) and ``b`` (m, w) → (n, m)."""
    a = np.atleast_2d(a)
    b = np.atleast_2d(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"hash widths differ: {a.shape[1]} vs {b.shape[1]} words")
    # Word by word into one (n, m) accumulator: no (n, m, w) temporary, ~3× faster for w = 4.
    out = np.zeros((len(a), len(b)), dtype=np.uint16)
    for w in range(a.shape[1]):
        out += np.bitwise_count(a[:, w, None] ^ b[None, :, w])
    return out.astype(np.int32, copy=False)


def _row_chunks(n: int, m: int, budget: int = 4_000_000) -> Iterator[slice]:
    # Keep each (chunk, m) distance block around ``budget`` cells so memory stays bounded
    # (10k synthetic × 50k real would otherwise need gigabytes at once).
    step = max(1, budget // max(1, m))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def nearest(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every query hash, the index of and distance to its nearest reference hash.

    ``query`` is (n, w) and ``reference`` (m, w), both packed. With an empty reference every
    distance is ``-1`` and every index ``-1``.
    """
    n = len(query)
    index = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, -1, dtype=np.int32)
    if n == 0 or len(reference) == 0:
        return index, dist
    for rows in _row_chunks(n, len(reference)):
        d = hamming(query[rows], reference)
        index[rows] = d.argmin(axis=1)
        dist[rows] = d.min(axis=1)
    return index, dist


def greedy_duplicates(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy near-duplicate grouping in row order: the first image of a group is kept.

    Row ``i`` is a duplicate when some earlier *kept* row ``j`` is within ``threshold`` bits; then
    ``dup_of[i] = j`` (the closest such row) and ``dist[i]`` its distance. Kept rows have
    ``dup_of = -1`` and ``dist`` the distance to their nearest earlier row (``-1`` for row 0), which
    shows how close the pool came to the threshold.
    """
    n = len(hashes)
    dup_of = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, -1, dtype=np.int32)
    kept = np.zeros(n, dtype=bool)
    for rows in _row_chunks(n, n):
        d = hamming(hashes[rows], hashes)
        for offset, i in enumerate(range(rows.start, rows.stop)):
            # Only earlier rows compete; whether they are kept was settled in previous iterations.
            earlier = d[offset, :i]
            if i:
                dist[i] = int(earlier.min())
            candidates = np.nonzero((earlier <= threshold) & kept[:i])[0]
            if candidates.size:
                j = int(candidates[np.argmin(earlier[candidates])])
                dup_of[i] = j
                dist[i] = int(earlier[j])
            else:
                kept[i] = True
    return dup_of, dist
