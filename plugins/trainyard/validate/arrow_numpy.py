"""Moving data between Arrow arrays and numpy without pyarrow's pandas probe.

pyarrow probes for pandas (and imports it, ~0.3 s and ~40 MB) whenever it converts a Python or numpy
value into an Arrow scalar or array; the scanner moves data through these helpers instead, which read
and build the buffers directly. ``test_validation_does_not_import_pandas`` guards it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "as_string",
    "bool_array",
    "offset_buffer",
    "string_array",
    "true_mask",
    "valid_mask",
    "value_buffer",
]


def offset_buffer(arr: pa.Array) -> np.ndarray:
    """The ``len(arr) + 1`` offsets of a string or large_string array (a view, no copy)."""
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr) + 1]


def value_buffer(arr: pa.Array, dtype: type) -> np.ndarray:
    """The value buffer of a fixed-width array (undefined under nulls: mask with :func:`valid_mask`)."""
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr)]


def valid_mask(arr: pa.Array) -> np.ndarray:
    """True where ``arr`` is not null."""
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return pc.is_valid(arr).to_numpy(zero_copy_only=False)


def true_mask(arr: pa.Array) -> np.ndarray:
    """Boolean array to numpy, null as False."""
    return pc.and_kleene(pc.is_valid(arr), arr).to_numpy(zero_copy_only=False)


def bool_array(mask: np.ndarray) -> pa.Array:
    """A numpy boolean mask as an Arrow boolean array (for ``filter``)."""
    bits = pa.py_buffer(np.packbits(mask, bitorder="little").tobytes())
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, bits])


def string_array(values: tuple[str, ...]) -> pa.Array:
    """``pa.array(values)`` without pyarrow's pandas probe (importing pandas costs ~0.3 s)."""
    encoded = [v.encode() for v in values]
    offsets = np.cumsum([0, *(len(e) for e in encoded)], dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(encoded))
    )


def as_string(arr: pa.Array) -> pa.Array:
    """``arr`` as a string or large_string array (dictionaries decoded, other types cast)."""
    kind = arr.type
    if pa.types.is_dictionary(kind):
        arr = arr.dictionary_decode()
        kind = arr.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return arr
    return arr.cast(pa.string())
