"""Hashing for the validator: 64-bit hashes of texts (duplicates, overlap) and SHA-256 of files (fingerprint).

Texts are compared by hash so that no text is ever kept: a polynomial hash of the UTF-8 bytes modulo
2**64 (computed with numpy prefix sums over Arrow's string buffers, ~2-3 ns per byte, no Python per row),
finished with the splitmix64 mixer over the hash and the length. Two different texts are counted as equal
with probability ~ n**2 / 2**65 for n texts (1e-6 at 6M rows); texts differing in a single byte never
collide. The hash tables cost 3 x 8 bytes x :data:`HASH_SLICE_BYTES` = 6 MiB.

The fingerprint is the one promotion later compares, identical to
:func:`trainer.storage.dataset_fingerprint`: the scanner hashes the bytes as the parser reads them
(:class:`trainer.storage.HashingReader`); :func:`sha256_and_size` is the second read for a file whose parsing
stopped early, or for parquet, whose reads are not sequential.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trainer.storage import HashingReader, combine_fingerprint, open_binary

__all__ = [
    "HASH_SLICE_BYTES",
    "TextHasher",
    "count_overlap",
    "fingerprint",
    "sha256_and_size",
    "sort_and_count_duplicates",
]

#: Bytes of string data hashed per vectorised step (sizes the power tables).
HASH_SLICE_BYTES = 1 << 18
#: Hashes compared per step when counting duplicates and overlap (bounds the temporary masks).
COMPARE_SLICE = 1 << 20

_U64 = np.uint64
_BASE = _U64(0x9E3779B97F4A7C15)  # odd, so invertible modulo 2**64
_BASE_INV = _U64(pow(int(_BASE), -1, 1 << 64))
_LEN_MIX = _U64(0xD6E8FEB86659FD93)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)


class TextHasher:
    """Vectorised 64-bit hashes of the strings of an Arrow string array (see the module docstring).

    For a slice of the data buffer with bytes ``b_k`` at positions ``k``, ``S = cumsum((b_k+1) * B**k)``;
    the hash of the string at ``[s, e)`` is ``(S[e] - S[s]) * B**-s``, i.e. ``sum (b+1) * B**j`` over its
    own positions ``j``: independent of where the string sits in the buffer. One hasher is reused for
    every batch, so its tables are built once.
    """

    def __init__(self, slice_bytes: int = HASH_SLICE_BYTES) -> None:
        self._slice = slice_bytes
        self._grow(slice_bytes)

    def _grow(self, size: int) -> None:
        self._pow = np.cumprod(np.full(size + 1, _BASE, dtype=_U64))
        self._pow[1:] = self._pow[:-1].copy()
        self._pow[0] = 1
        self._inv = np.cumprod(np.full(size + 1, _BASE_INV, dtype=_U64))
        self._inv[1:] = self._inv[:-1].copy()
        self._inv[0] = 1
        self._work = np.empty(size + 1, dtype=_U64)
        self._size = size

    def hash(self, arr: pa.Array) -> np.ndarray:
        """One ``uint64`` per string of ``arr``, a string or large_string array."""
        n = len(arr)
        out = np.empty(n, dtype=_U64)
        if n == 0:
            return out
        offset_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[arr.offset : arr.offset + n + 1].astype(
            np.int64
        )
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
        i = 0
        while i < n:
            base = offsets[i]
            j = int(np.searchsorted(offsets, base + self._slice, side="right")) - 1
            j = min(max(j, i + 1), n)
            m = int(offsets[j] - base)
            if m > self._size:  # one string longer than a slice
                self._grow(1 << (m - 1).bit_length())
            prefix = self._work[: m + 1]
            prefix[0] = 0
            body = prefix[1:]
            np.add(data[base : base + m], 1, out=body, dtype=_U64)
            np.multiply(body, self._pow[:m], out=body)
            np.cumsum(body, out=body)
            starts = offsets[i:j] - base
            ends = offsets[i + 1 : j + 1] - base
            h = (prefix[ends] - prefix[starts]) * self._inv[starts]
            h += (ends - starts).astype(_U64) * _LEN_MIX
            # splitmix64 finaliser
            h ^= h >> _U64(30)
            h *= _M1
            h ^= h >> _U64(27)
            h *= _M2
            h ^= h >> _U64(31)
            out[i:j] = h
            i = j
        return out


def sort_and_count_duplicates(chunks: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Merge hash chunks into one sorted array and count the hashes beyond each value's first.

    ``chunks`` is emptied as it is copied, so the peak is the merged array plus one chunk, not twice the
    hashes; neighbours are compared in slices of :data:`COMPARE_SLICE`.
    """
    total = sum(len(c) for c in chunks)
    merged = np.empty(total, dtype=_U64)
    pos = 0
    while chunks:
        chunk = chunks.pop(0)
        merged[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    merged.sort()
    distinct = 1 if total else 0
    for start in range(1, total, COMPARE_SLICE):
        stop = min(start + COMPARE_SLICE, total)
        distinct += int(np.count_nonzero(merged[start:stop] != merged[start - 1 : stop - 1]))
    return merged, total - distinct


def count_overlap(train_sorted: np.ndarray, validation: np.ndarray) -> int:
    """How many of ``validation``'s hashes occur in ``train_sorted`` (sorted), searched slice by slice."""
    if not len(train_sorted) or not len(validation):
        return 0
    found = 0
    for start in range(0, len(validation), COMPARE_SLICE):
        part = validation[start : start + COMPARE_SLICE]
        idx = np.searchsorted(train_sorted, part)
        idx[idx == len(train_sorted)] = 0
        found += int(np.count_nonzero(train_sorted[idx] == part))
    return found


def sha256_and_size(uri: str, s3_endpoint_url: str | None) -> tuple[str, int] | None:
    """``(sha256 hex, bytes)`` of a file in a fresh, sequential read; ``None`` if it cannot be read."""
    try:
        with open_binary(uri, s3_endpoint_url) as raw:
            reader = HashingReader(raw)
            return reader.drain(), reader.bytes_read
    except Exception:
        return None


def fingerprint(train_sha256: str | None, validation_sha256: str | None) -> str:
    """The dataset fingerprint (``sha256:<hex>``) from the two files' SHA-256; "" if either is unknown."""
    if not (train_sha256 and validation_sha256):
        return ""
    return combine_fingerprint([("train", train_sha256), ("validation", validation_sha256)])
