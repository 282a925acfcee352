"""``validate_data``: a streaming, memory-bounded validator for a train/validation dataset.

One pass over each split (local path or ``s3://``) computes every statistic the checks in
:class:`~trainyard.config.pipeline_schema.DataChecks` need, and the dataset fingerprint that promotion later
compares (identical to :func:`trainer.storage.dataset_fingerprint`):

* CSV is parsed with ``pyarrow.csv.open_csv`` block by block (``block_size`` bytes) from the stream of
  :func:`trainer.storage.open_binary`, wrapped in :class:`trainer.storage.HashingReader`, so the bytes
  the parser reads are the bytes that are hashed: one read of the file does both.
* Parquet is read with ``ParquetFile(...).iter_batches(columns=[text, label])`` (only the two columns,
  buffered column-chunk reads); its SHA-256 is a second sequential read, like ``file_sha256``.

Memory bound
------------
Texts are never kept. Per split the validator keeps label counters (one integer per declared label,
up to :data:`MAX_EXAMPLES` unknown-label examples) and one 64-bit hash per non-blank text:

* retained: **8 bytes per non-null, non-blank row** of both splits (train hashes stay until the
  overlap with validation is known);
* transient, at the end of a split: the hash chunks are copied into one array chunk by chunk (freed as
  they are copied), sorted in place, and compared with their neighbours in slices of
  :data:`_FINAL_SLICE` rows, so the peak is ~8 bytes/row plus one batch;
* constant: the CSV parser's blocks (Arrow reads ahead on an I/O thread; :class:`_PacedHashingReader`
  keeps it within :data:`READ_AHEAD_BLOCKS` blocks of the batch being checked, instead of Arrow's 32),
  one batch's Arrow arrays and numpy masks, and the hash tables (3 x 8 bytes x
  :data:`_HASH_SLICE_BYTES` = 6 MiB). For parquet: one batch of :data:`PARQUET_BATCH_ROWS` rows,
  ``block_size`` of read buffer, and the decoded pages of the current row group's two columns.

Measured (2 cores, default 4 MiB blocks; includes ~78 MB for the interpreter, pyarrow and numpy):
peak RSS 208 MB for a 37 MB / 0.5M-row CSV, 244 MB for 153 MB / 2M rows, 289 MB for 464 MB / 6M rows;
the growth is the 8 bytes/row plus allocator slack. ``block_size=1 << 20`` lowers the constant by
~50 MB at the same speed.

Texts are compared by a 64-bit hash: a polynomial hash of the UTF-8 bytes modulo 2**64 (computed with
numpy prefix sums over Arrow's string buffers, ~2-3 ns per byte, no Python per row), finished with the
splitmix64 mixer over the hash and the length. Two different texts are counted as equal with
probability ~ n**2 / 2**65 for n texts (1e-6 at 6M rows); texts differing in a single byte never
collide. Duplicates and train/validation overlap compare texts after stripping surrounding whitespace;
null and blank texts are left out of both (they have their own checks).

Semantics
---------
* CSV: an empty unquoted field is null; a quoted empty field ``""`` is an empty text. No other
  spelling ("NA", "null") is null: these are legitimate texts.
* The label column may hold label names (strings) or integer class ids ``0..n-1`` (ints, or strings of
  digits in CSV). A value that is neither is an unknown label.
* Fractions are of the split's rows; class shares are of the rows with a known label.

Imports pyarrow and numpy only (the module is imported inside the ``validate_data`` task), and takes
care not to trigger pyarrow's lazy pandas import (see :func:`_values` and friends).
"""

from __future__ import annotations

import difflib
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.spec import DataSpec
from trainer.storage import HashingReader, combine_fingerprint, open_binary
from trainyard.config.pipeline_schema import DataChecks

__all__ = [
    "CHECK_NAMES",
    "CheckResult",
    "DataReport",
    "DataValidationError",
    "SplitStats",
    "require_valid",
    "validate_dataset",
]

#: Every check name a report may hold, in report order.
CHECK_NAMES = (
    "readable",
    "required_columns",
    "min_rows",
    "null_fraction",
    "empty_text_fraction",
    "label_values",
    "min_class_share",
    "duplicate_fraction",
    "overlap_fraction",
)
#: Unknown label values quoted in a report, per split.
MAX_EXAMPLES = 5
#: Rows per parquet batch.
PARQUET_BATCH_ROWS = 65_536
#: CSV blocks the parser may read ahead of the batch being checked (memory: this many x block_size).
READ_AHEAD_BLOCKS = 3
#: How much of a parser's error message is quoted (it may contain a whole row).
MAX_REASON_CHARS = 300

_HASH_SLICE_BYTES = 1 << 18
_PACE_TIMEOUT_S = 1.0
_FINAL_SLICE = 1 << 20
_U64 = np.uint64
_BASE = _U64(0x9E3779B97F4A7C15)  # odd, so invertible modulo 2**64
_BASE_INV = _U64(pow(int(_BASE), -1, 1 << 64))
_LEN_MIX = _U64(0xD6E8FEB86659FD93)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)

Split = Literal["train", "validation"]
Number = int | float | str | None


# --------------------------------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One check on one split (``split`` is ``"validation"`` for the train/validation overlap)."""

    name: str
    split: str
    passed: bool
    value: Number
    threshold: Number
    message: str

    def line(self) -> str:
        mark = "✔ PASS" if self.passed else "✘ FAIL"
        return f"{mark}  {self.name:<20} {self.split:<10} {self.message}"


@dataclass(frozen=True)
class SplitStats:
    """What one pass over a split found. Counts are 0 for a file that could not be read."""

    uri: str
    readable: bool = False
    columns_present: bool = False
    rows: int = 0
    bytes: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    unknown_label_rows: int = 0
    unknown_label_examples: list[str] = field(default_factory=list)
    null_rows: int = 0
    empty_text_rows: int = 0
    duplicate_rows: int = 0
    sha256: str | None = None


@dataclass(frozen=True)
class DataReport:
    """The outcome of :func:`validate_dataset`; ``to_dict()`` travels through XCom and into MLflow."""

    passed: bool
    fingerprint: str
    """``sha256:<hex>`` as :func:`trainer.storage.dataset_fingerprint`; "" when a file could not be read."""
    format: str
    train: SplitStats
    validation: SplitStats
    overlap_rows: int
    checks: list[CheckResult]
    seconds: float = 0.0

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def split(self, name: str) -> SplitStats:
        return {"train": self.train, "validation": self.validation}[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "fingerprint": self.fingerprint,
            "format": self.format,
            "splits": {"train": asdict(self.train), "validation": asdict(self.validation)},
            "overlap_rows": self.overlap_rows,
            "checks": [asdict(c) for c in self.checks],
            "failed": [f"{c.name}[{c.split}]" for c in self.failures],
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        splits = data["splits"]
        return cls(
            passed=data["passed"],
            fingerprint=data["fingerprint"],
            format=data["format"],
            train=SplitStats(**splits["train"]),
            validation=SplitStats(**splits["validation"]),
            overlap_rows=data["overlap_rows"],
            checks=[CheckResult(**c) for c in data["checks"]],
            seconds=data.get("seconds", 0.0),
        )

    def summary(self) -> str:
        failed = len(self.failures)
        head = (
            f"Dataset {'PASSED' if self.passed else 'FAILED'}: "
            f"{len(self.checks) - failed} of {len(self.checks)} checks passed; "
            f"train {self.train.rows:,} rows, validation {self.validation.rows:,} rows; "
            f"fingerprint {self.fingerprint or '(unavailable)'}"
        )
        return "\n".join([head, *(c.line() for c in self.checks)])


class DataValidationError(Exception):
    """The dataset breached at least one check; ``report`` holds everything that was found."""

    def __init__(self, report: DataReport) -> None:
        self.report = report
        failures = report.failures
        lines = [f"Dataset validation failed: {len(failures)} of {len(report.checks)} checks failed."]
        lines += [f"  ✘ {c.name} [{c.split}]: {c.message}" for c in failures]
        lines.append(
            "Fix the data files above (or, where the data is right, relax dataset.checks in the pipeline "
            "YAML) and trigger the run again. No training was started."
        )
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type, tuple[DataReport]]:
        return (type(self), (self.report,))  # picklable although __init__ takes the report


def require_valid(report: DataReport) -> DataReport:
    """Return ``report`` if it passed; raise :class:`DataValidationError` naming every failure if not."""
    if not report.passed:
        raise DataValidationError(report)
    return report


# --------------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------------


class _TextHasher:
    """Vectorised 64-bit hashes of the strings of an Arrow string array (see the module docstring).

    For a slice of the data buffer with bytes ``b_k`` at positions ``k``, ``S = cumsum((b_k+1) * B**k)``;
    the hash of the string at ``[s, e)`` is ``(S[e] - S[s]) * B**-s``, i.e. ``sum (b+1) * B**j`` over its
    own positions ``j``: independent of where the string sits in the buffer.
    """

    def __init__(self, slice_bytes: int = _HASH_SLICE_BYTES) -> None:
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


# --------------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------------


class _Scan:
    """Mutable accumulator for one split."""

    def __init__(self, split: Split, uri: str, label_names: tuple[str, ...]) -> None:
        self.split = split
        self.uri = uri
        self.label_names = label_names
        self.readable = False
        self.error: str | None = None
        self.missing_columns: list[str] = []
        self.found_columns: list[str] | None = None
        self.rows = 0
        self.bytes = 0
        self.null_rows = 0
        self.empty_rows = 0
        self.label_counts = np.zeros(len(label_names), dtype=np.int64)
        self.unknown_rows = 0
        self.unknown_examples: list[str] = []
        self.label_type_error: str | None = None
        self.hash_chunks: list[np.ndarray] = []
        self.hashes: np.ndarray | None = None  # sorted, after finish()
        self.duplicate_rows = 0
        self.sha256: str | None = None
        self._names = _string_array(label_names)

    @property
    def columns_ok(self) -> bool:
        return self.readable and not self.missing_columns and self.label_type_error is None

    # -- per batch -------------------------------------------------------------------------------

    def consume(self, text: pa.Array, label: pa.Array, hasher: _TextHasher) -> None:
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
        if isinstance(label, pa.ChunkedArray):
            label = label.combine_chunks()
        n = len(text)
        self.rows += n
        if n == 0:
            return
        text = _as_string(text)
        text_valid = _valid(text)
        label_valid = _valid(label)
        self.null_rows += n - int(np.count_nonzero(text_valid & label_valid))

        trimmed = pc.utf8_trim_whitespace(text)
        non_blank = text_valid & (np.diff(_offsets(trimmed)) > 0)  # null texts are neither blank nor hashed
        self.empty_rows += int(np.count_nonzero(text_valid & ~non_blank))
        hashes = hasher.hash(trimmed)
        self.hash_chunks.append(hashes if non_blank.all() else hashes[non_blank])

        self._count_labels(label, label_valid)

    def _count_labels(self, label: pa.Array, label_valid: np.ndarray) -> None:
        n, k = len(label), len(self.label_names)
        idx = np.full(n, -1, dtype=np.int64)  # class id per row, -1 = null or unknown
        kind = label.type
        if pa.types.is_dictionary(kind):
            label = label.dictionary_decode()
            kind = label.type
        if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
            values = _values(label.cast(pa.int64()), np.int64)
            ok = label_valid & (values >= 0) & (values < k)
            idx[ok] = values[ok]
        elif pa.types.is_floating(kind):
            values = _values(label.cast(pa.float64()), np.float64)
            finite = np.isfinite(values)
            ok = label_valid & finite & (values >= 0) & (values < k)
            ok[ok] = values[ok] == np.floor(values[ok])
            idx[ok] = values[ok].astype(np.int64)
        else:
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                try:
                    label = label.cast(pa.string())
                except (pa.ArrowException, ValueError) as exc:
                    self.label_type_error = (
                        f"the label column has type {kind}, which holds neither label names nor class ids "
                        f"({_reason(exc)})"
                    )
                    return
            found = pc.index_in(label, value_set=self._names)
            found_valid = _valid(found)
            idx[found_valid] = _values(found, np.int32)[found_valid]
            need_id = label_valid & ~found_valid
            if need_id.any():  # not a name: a class id written as digits?
                match = pc.match_substring_regex(label, r"^[0-9]{1,9}$")
                digits = need_id & _true(match)
                if digits.any():
                    ids = _values(label.filter(_bool_array(digits)).cast(pa.int64()), np.int64)
                    rows = np.flatnonzero(digits)
                    ok = ids < k
                    idx[rows[ok]] = ids[ok]
        known = idx >= 0
        self.label_counts += np.bincount(idx[known], minlength=k)[:k]
        unknown = label_valid & ~known
        n_unknown = int(np.count_nonzero(unknown))
        self.unknown_rows += n_unknown
        if n_unknown and len(self.unknown_examples) < MAX_EXAMPLES:
            for value in pc.unique(label.filter(_bool_array(unknown)))[: 2 * MAX_EXAMPLES].to_pylist():
                shown = repr(value if not isinstance(value, str) else value[:50])
                if shown not in self.unknown_examples and len(self.unknown_examples) < MAX_EXAMPLES:
                    self.unknown_examples.append(shown)

    # -- end of split ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Merge the hash chunks into one sorted array (freeing chunks as they are copied); count dups."""
        total = sum(len(c) for c in self.hash_chunks)
        merged = np.empty(total, dtype=_U64)
        pos = 0
        while self.hash_chunks:
            chunk = self.hash_chunks.pop(0)
            merged[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        merged.sort()
        distinct = 1 if total else 0
        for start in range(1, total, _FINAL_SLICE):
            stop = min(start + _FINAL_SLICE, total)
            distinct += int(np.count_nonzero(merged[start:stop] != merged[start - 1 : stop - 1]))
        self.duplicate_rows = total - distinct
        self.hashes = merged

    def stats(self) -> SplitStats:
        if not self.columns_ok:  # partial counts of a file that could not be read are meaningless
            return SplitStats(
                uri=self.uri,
                readable=self.readable,
                bytes=self.bytes,
                label_counts=dict.fromkeys(self.label_names, 0),
                sha256=self.sha256,
            )
        return SplitStats(
            uri=self.uri,
            readable=True,
            columns_present=True,
            rows=self.rows,
            bytes=self.bytes,
            label_counts=dict(zip(self.label_names, self.label_counts.tolist(), strict=True)),
            unknown_label_rows=self.unknown_rows,
            unknown_label_examples=list(self.unknown_examples),
            null_rows=self.null_rows,
            empty_text_rows=self.empty_rows,
            duplicate_rows=self.duplicate_rows,
            sha256=self.sha256,
        )


# pyarrow probes for pandas (and imports it, ~0.3 s and ~40 MB) whenever it converts a Python or numpy
# value into an Arrow scalar or array; these helpers move data between Arrow and numpy without that.


def _offsets(arr: pa.Array) -> np.ndarray:
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr) + 1]


def _values(arr: pa.Array, dtype: type) -> np.ndarray:
    """The value buffer of a fixed-width array (undefined under nulls: mask with :func:`_valid`)."""
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr)]


def _valid(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return pc.is_valid(arr).to_numpy(zero_copy_only=False)


def _true(arr: pa.Array) -> np.ndarray:
    """Boolean array to numpy, null as False."""
    return pc.and_kleene(pc.is_valid(arr), arr).to_numpy(zero_copy_only=False)


def _bool_array(mask: np.ndarray) -> pa.Array:
    bits = pa.py_buffer(np.packbits(mask, bitorder="little").tobytes())
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, bits])


def _string_array(values: tuple[str, ...]) -> pa.Array:
    """``pa.array(values)`` without pyarrow's pandas probe (importing pandas costs ~0.3 s)."""
    encoded = [v.encode() for v in values]
    offsets = np.cumsum([0, *(len(e) for e in encoded)], dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(encoded))
    )


def _as_string(arr: pa.Array) -> pa.Array:
    kind = arr.type
    if pa.types.is_dictionary(kind):
        arr = arr.dictionary_decode()
        kind = arr.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return arr
    return arr.cast(pa.string())


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + "…"
    return f"{type(exc).__name__}: {text}"


def _open(scan: _Scan, s3_endpoint_url: str | None):
    """open_binary, turning any failure (missing file, credentials, network) into ``scan.error``."""
    try:
        return open_binary(scan.uri, s3_endpoint_url)
    except FileNotFoundError:
        scan.error = "the file does not exist"
    except IsADirectoryError:
        scan.error = "the path is a directory, not a file"
    except PermissionError as exc:
        scan.error = f"permission denied ({_reason(exc)})"
    except Exception as exc:  # botocore/network errors have no common base class
        scan.error = f"cannot open it ({_reason(exc)})"
    return None


def _fill_sha256(scan: _Scan, s3_endpoint_url: str | None) -> None:
    """Fingerprint a file whose parsing stopped early (a fresh, sequential read)."""
    try:
        with open_binary(scan.uri, s3_endpoint_url) as raw:
            reader = HashingReader(raw)
            scan.sha256 = reader.drain()
            scan.bytes = reader.bytes_read
    except Exception:
        scan.sha256 = None


class _PacedHashingReader(HashingReader):
    """A :class:`HashingReader` that keeps Arrow's CSV read-ahead within a few blocks of the consumer.

    ``open_csv`` reads blocks on a background I/O thread into a queue of up to 32 blocks; when the
    consumer (hashing, counting) is slower than the disk, that queue fills and costs 32 x block_size of
    memory. Here a read waits while more than :data:`READ_AHEAD_BLOCKS` blocks are unconsumed. A wait
    never lasts longer than :data:`_PACE_TIMEOUT_S` (then the read goes ahead), so pacing can slow a
    pathological file down but never deadlock the parser.
    """

    def __init__(self, raw: Any) -> None:
        super().__init__(raw)
        self._reads = 0
        self._consumed = 0
        self._released = False
        self._cv = threading.Condition()

    def _may_read(self) -> bool:
        return self._released or self._reads - self._consumed <= READ_AHEAD_BLOCKS

    def read(self, size: int = -1) -> bytes:
        with self._cv:
            if not self._may_read():
                self._cv.wait_for(self._may_read, timeout=_PACE_TIMEOUT_S)
            self._reads += 1
        return super().read(size)

    def consumed_block(self) -> None:
        with self._cv:
            self._consumed += 1
            self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self._released = True
            self._cv.notify_all()


def _scan_csv(
    scan: _Scan, data: DataSpec, s3_endpoint_url: str | None, block_size: int, hasher: _TextHasher
) -> None:
    import pyarrow.csv as pcsv

    raw = _open(scan, s3_endpoint_url)
    if raw is None:
        return
    columns = [data.text_column, data.label_column]
    stream = _PacedHashingReader(raw)
    reader = None
    try:
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(block_size=block_size),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=True,
                null_values=[""],
                quoted_strings_can_be_null=False,
            ),
        )
        scan.readable = True
        for batch in reader:
            scan.consume(batch.column(0), batch.column(1), hasher)
            stream.consumed_block()
        stream.release()
        # The parser has reached the end of the stream: draining hashes nothing more unless it stopped early.
        scan.sha256 = stream.drain()
        scan.bytes = stream.bytes_read
    except pa.ArrowKeyError:
        # raised when an include_columns name is not in the header
        scan.readable = True
        scan.found_columns = _csv_header(scan.uri, s3_endpoint_url, block_size)
        if scan.found_columns is None:
            scan.missing_columns = columns
        else:
            scan.missing_columns = [c for c in columns if c not in scan.found_columns]
        _fill_sha256(scan, s3_endpoint_url)
    except (pa.ArrowException, OSError, UnicodeError) as exc:
        scan.readable = False
        hint = ""
        if "Expected" in str(exc) and "columns" in str(exc):
            hint = (
                " (a row with the wrong number of fields, often an unterminated quote or an unquoted comma)"
            )
        where = f" after the first {scan.rows:,} rows parsed fine" if scan.rows else ""
        scan.error = f"it is not valid CSV{where}: {_reason(exc)}{hint}"
        _fill_sha256(scan, s3_endpoint_url)
    finally:
        stream.release()
        if reader is not None:
            reader.close()
        raw.close()


def _csv_header(uri: str, s3_endpoint_url: str | None, block_size: int) -> list[str] | None:
    import pyarrow.csv as pcsv

    try:
        with open_binary(uri, s3_endpoint_url) as raw:
            reader = pcsv.open_csv(raw, read_options=pcsv.ReadOptions(block_size=min(block_size, 1 << 20)))
            names = list(reader.schema.names)
            reader.close()
            return names
    except Exception:
        return None


def _scan_parquet(
    scan: _Scan, data: DataSpec, s3_endpoint_url: str | None, block_size: int, hasher: _TextHasher
) -> None:
    import pyarrow.parquet as pq

    raw = _open(scan, s3_endpoint_url)
    if raw is None:
        return
    columns = [data.text_column, data.label_column]
    try:
        parquet = pq.ParquetFile(raw, buffer_size=block_size, pre_buffer=False)
        scan.readable = True
        scan.found_columns = list(parquet.schema_arrow.names)
        scan.missing_columns = [c for c in columns if c not in scan.found_columns]
        if not scan.missing_columns:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                scan.consume(batch.column(data.text_column), batch.column(data.label_column), hasher)
                if scan.label_type_error:
                    break
    except (pa.ArrowException, OSError, UnicodeError) as exc:
        scan.readable = False
        where = f" after the first {scan.rows:,} rows read fine" if scan.rows else ""
        scan.error = f"it is not a readable parquet file{where}: {_reason(exc)}"
    finally:
        raw.close()
    _fill_sha256(scan, s3_endpoint_url)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value * 100:.2f}%"


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def _split_checks(scan: _Scan, data: DataSpec, checks: DataChecks, fmt: str) -> list[CheckResult]:
    split, where = scan.split, f"{scan.split} file {scan.uri}"
    results: list[CheckResult] = []

    def add(name: str, passed: bool, value: Number, threshold: Number, message: str) -> None:
        results.append(CheckResult(name, split, passed, value, threshold, message))

    if not scan.readable:
        add(
            "readable",
            False,
            None,
            None,
            f"{where} cannot be read: {scan.error}. Fix or re-export the file (dataset.{split} in the "
            f"pipeline YAML must point at a complete {fmt} file); the other checks of this file were "
            "skipped.",
        )
        return results
    add("readable", True, None, None, f"{where} read as {fmt} ({scan.bytes:,} bytes)")

    if scan.missing_columns or scan.label_type_error:
        found = ", ".join(scan.found_columns) if scan.found_columns else "(could not read the header)"
        if scan.missing_columns:
            missing = ", ".join(repr(c) for c in scan.missing_columns)
            message = (
                f"{where} has no column {missing}; columns found: {found}. Rename the column in the file "
                f"or set dataset.text_column / dataset.label_column in the pipeline YAML."
            )
            value = ", ".join(scan.missing_columns)
        else:
            message = f"{where}: {scan.label_type_error}. Store label names (strings) or class ids (ints)."
            value = data.label_column
        add("required_columns", False, value, None, message + " The other checks of this file were skipped.")
        return results
    add(
        "required_columns",
        True,
        None,
        None,
        f"{where} has text column {data.text_column!r} and label column {data.label_column!r}",
    )

    rows = scan.rows
    minimum = checks.min_rows if split == "train" else checks.min_validation_rows
    knob = "min_rows" if split == "train" else "min_validation_rows"
    add(
        "min_rows",
        rows >= minimum,
        rows,
        minimum,
        f"{where} has {rows:,} rows; at least {minimum:,} required"
        + ("" if rows >= minimum else f". Add data or lower dataset.checks.{knob}."),
    )

    value = _fraction(scan.null_rows, rows)
    ok = value <= checks.max_null_fraction
    add(
        "null_fraction",
        ok,
        value,
        checks.max_null_fraction,
        f"{where}: {scan.null_rows:,} of {rows:,} rows ({_pct(value)}) have a null (empty) text or label; "
        f"allowed {_pct(checks.max_null_fraction)}"
        + ("" if ok else ". Drop or fill those rows, or raise dataset.checks.max_null_fraction."),
    )

    value = _fraction(scan.empty_rows, rows)
    ok = value <= checks.max_empty_text_fraction
    add(
        "empty_text_fraction",
        ok,
        value,
        checks.max_empty_text_fraction,
        f"{where}: {scan.empty_rows:,} of {rows:,} rows ({_pct(value)}) have a blank text; "
        f"allowed {_pct(checks.max_empty_text_fraction)}"
        + ("" if ok else ". Drop those rows, or raise dataset.checks.max_empty_text_fraction."),
    )

    names = data.label_names
    declared = f"label_names [{', '.join(names)}] or class ids 0..{len(names) - 1}"
    if scan.unknown_rows:
        suggestions = []
        for shown in scan.unknown_examples:
            close = difflib.get_close_matches(shown.strip("'\""), names, n=1)
            suggestions.append(f"{shown} (did you mean {close[0]!r}?)" if close else shown)
        message = (
            f"{where}: {scan.unknown_rows:,} rows have a label outside {declared}, e.g. "
            f"{', '.join(suggestions)}. Relabel or drop those rows, or add the label to dataset.label_names."
        )
    else:
        message = f"{where}: every non-null label is one of {declared}"
    add("label_values", scan.unknown_rows == 0, scan.unknown_rows, 0, message)

    labelled = int(scan.label_counts.sum())
    shares = {name: _fraction(int(c), labelled) for name, c in zip(names, scan.label_counts, strict=True)}
    low = {name: s for name, s in shares.items() if s < checks.min_class_share}
    smallest = min(shares.values()) if labelled else 0.0
    listing = ", ".join(
        f"{n} {int(c):,} ({_pct(shares[n])})" for n, c in zip(names, scan.label_counts, strict=True)
    )
    if not labelled:
        message = f"{where} has no row with a known label, so every class is missing"
    elif low:
        message = (
            f"{where}: class share below {_pct(checks.min_class_share)} for "
            f"{', '.join(f'{n!r} ({_pct(s)})' for n, s in low.items())}; counts: {listing}. Add examples of "
            f"those classes, or lower dataset.checks.min_class_share."
        )
    else:
        message = f"{where}: every class has at least {_pct(checks.min_class_share)}; counts: {listing}"
    add("min_class_share", labelled > 0 and not low, smallest, checks.min_class_share, message)

    value = _fraction(scan.duplicate_rows, rows)
    ok = value <= checks.max_duplicate_fraction
    add(
        "duplicate_fraction",
        ok,
        value,
        checks.max_duplicate_fraction,
        f"{where}: {scan.duplicate_rows:,} of {rows:,} rows ({_pct(value)}) repeat an earlier text; "
        f"allowed {_pct(checks.max_duplicate_fraction)}"
        + ("" if ok else ". Deduplicate the split, or raise dataset.checks.max_duplicate_fraction."),
    )
    return results


def _overlap_rows(train_sorted: np.ndarray, validation: np.ndarray) -> int:
    if not len(train_sorted) or not len(validation):
        return 0
    found = 0
    for start in range(0, len(validation), _FINAL_SLICE):
        part = validation[start : start + _FINAL_SLICE]
        idx = np.searchsorted(train_sorted, part)
        idx[idx == len(train_sorted)] = 0
        found += int(np.count_nonzero(train_sorted[idx] == part))
    return found


def validate_dataset(
    data: DataSpec,
    checks: DataChecks,
    s3_endpoint_url: str | None = None,
    block_size: int = 4 << 20,
) -> DataReport:
    """Validate ``data`` against ``checks`` in one streaming pass per split; never raises for bad data.

    Use :func:`require_valid` on the result to stop a run.
    """
    started = time.perf_counter()
    scan_file = _scan_csv if data.format == "csv" else _scan_parquet
    scans: dict[str, _Scan] = {}
    hasher = _TextHasher()
    for split, uri in (("train", data.train_uri), ("validation", data.validation_uri)):
        scan = _Scan(split, uri, data.label_names)  # type: ignore[arg-type]
        scan_file(scan, data, s3_endpoint_url, block_size, hasher)
        if scan.columns_ok:
            scan.finish()
        else:
            scan.hash_chunks.clear()
        scans[split] = scan
    train, validation = scans["train"], scans["validation"]

    results = _split_checks(train, data, checks, data.format) + _split_checks(
        validation, data, checks, data.format
    )
    overlap = 0
    if train.columns_ok and validation.columns_ok:
        assert train.hashes is not None and validation.hashes is not None
        overlap = _overlap_rows(train.hashes, validation.hashes)
        value = _fraction(overlap, validation.rows)
        ok = value <= checks.max_overlap_fraction
        results.append(
            CheckResult(
                "overlap_fraction",
                "validation",
                ok,
                value,
                checks.max_overlap_fraction,
                f"validation file {validation.uri}: {overlap:,} of {validation.rows:,} rows ({_pct(value)}) "
                f"have a text that is also in train file {train.uri}; "
                f"allowed {_pct(checks.max_overlap_fraction)}"
                + (
                    ""
                    if ok
                    else ". Remove those rows from one split (leakage inflates validation metrics), "
                    "or raise dataset.checks.max_overlap_fraction."
                ),
            )
        )
    train.hashes = validation.hashes = None

    fingerprint = ""
    if train.sha256 and validation.sha256:
        fingerprint = combine_fingerprint([("train", train.sha256), ("validation", validation.sha256)])
    return DataReport(
        passed=all(r.passed for r in results),
        fingerprint=fingerprint,
        format=data.format,
        train=train.stats(),
        validation=validation.stats(),
        overlap_rows=overlap,
        checks=results,
        seconds=time.perf_counter() - started,
    )
