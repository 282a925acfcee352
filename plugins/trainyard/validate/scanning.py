"""Reading the dataset: one streaming, memory-bounded pass per split that counts what the checks need.

The pass over each split (local path or ``s3://``) fills a :class:`SplitScan` with every statistic the
checks in :class:`~trainyard.config.pipeline_schema.DataChecks` need, and the file's SHA-256:

* CSV is parsed with ``pyarrow.csv.open_csv`` block by block (``block_size`` bytes) from the stream of
  :func:`trainer.storage.open_binary`, wrapped in a :class:`trainer.storage.HashingReader`, so the bytes
  the parser reads are the bytes that are hashed: one read of the file does both.
* Parquet is read with ``ParquetFile(...).iter_batches(columns=[text, label])`` (only the two columns,
  buffered column-chunk reads); its SHA-256 is a second sequential read.

Memory bound
------------
Texts are never kept. Per split the scan keeps label counters (one integer per declared label, up to
:data:`MAX_EXAMPLES` unknown-label examples) and one 64-bit hash per non-blank text
(:mod:`~trainyard.validate.hashing`):

* retained: **8 bytes per non-null, non-blank row** of both splits (train hashes stay until the overlap
  with validation is known);
* transient, at the end of a split: the hashes are merged, sorted and compared in slices
  (:func:`~trainyard.validate.hashing.sort_and_count_duplicates`), so the peak is ~8 bytes/row plus one
  batch;
* constant: the CSV parser's blocks (Arrow reads ahead on an I/O thread; :class:`PacedHashingReader`
  keeps it within :data:`READ_AHEAD_BLOCKS` blocks of the batch being checked, instead of Arrow's 32),
  one batch's Arrow arrays and numpy masks, and the hasher's tables (6 MiB). For parquet: one batch of
  :data:`PARQUET_BATCH_ROWS` rows, ``block_size`` of read buffer, and the decoded pages of the current
  row group's two columns.

Measured (2 cores, default 4 MiB blocks; includes ~78 MB for the interpreter, pyarrow and numpy):
peak RSS 208 MB for a 37 MB / 0.5M-row CSV, 244 MB for 153 MB / 2M rows, 289 MB for 464 MB / 6M rows;
the growth is the 8 bytes/row plus allocator slack. ``block_size=1 << 20`` lowers the constant by
~50 MB at the same speed.

Semantics
---------
* CSV: an empty unquoted field is null; a quoted empty field ``""`` is an empty text. No other
  spelling ("NA", "null") is null: these are legitimate texts.
* The label column may hold label names (strings) or integer class ids ``0..n-1`` (ints, or strings of
  digits in CSV). A value that is neither is an unknown label.
* Duplicates and train/validation overlap compare texts after stripping surrounding whitespace; null
  and blank texts are left out of both (they have their own checks).

Imports pyarrow and numpy at module level: import this module only inside the ``validate_data`` task.
It takes care not to trigger pyarrow's lazy pandas import (see :mod:`~trainyard.validate.arrow_numpy`).
"""

from __future__ import annotations

import threading
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.spec import DataSpec
from trainer.storage import HashingReader, open_binary
from trainyard.validate.arrow_numpy import (
    as_string,
    bool_array,
    offset_buffer,
    string_array,
    true_mask,
    valid_mask,
    value_buffer,
)
from trainyard.validate.hashing import TextHasher, count_overlap, sha256_and_size, sort_and_count_duplicates
from trainyard.validate.report import SplitStats

__all__ = [
    "MAX_EXAMPLES",
    "MAX_REASON_CHARS",
    "PARQUET_BATCH_ROWS",
    "READ_AHEAD_BLOCKS",
    "PacedHashingReader",
    "Split",
    "SplitScan",
    "scan_dataset",
]

#: Unknown label values quoted in a report, per split.
MAX_EXAMPLES = 5
#: Rows per parquet batch.
PARQUET_BATCH_ROWS = 65_536
#: CSV blocks the parser may read ahead of the batch being checked (memory: this many x block_size).
READ_AHEAD_BLOCKS = 3
#: How much of a parser's error message is quoted (it may contain a whole row).
MAX_REASON_CHARS = 300

_PACE_TIMEOUT_S = 1.0

Split = Literal["train", "validation"]


class SplitScan:
    """Mutable accumulator for one split: what the checks read, filled batch by batch.

    ``error`` is why the file could not be read; ``missing_columns``/``found_columns`` and
    ``label_type_error`` why its rows could not be checked. ``overlap_rows`` (validation rows whose text
    is also in train) is set by :func:`scan_dataset` on validation only, and only when both splits have
    their columns; ``None`` means the overlap was not counted.
    """

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
        self.overlap_rows: int | None = None
        self.sha256: str | None = None
        self._names = string_array(label_names)

    @property
    def columns_ok(self) -> bool:
        return self.readable and not self.missing_columns and self.label_type_error is None

    # -- per batch -------------------------------------------------------------------------------

    def consume(self, text: pa.Array, label: pa.Array, hasher: TextHasher) -> None:
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
        if isinstance(label, pa.ChunkedArray):
            label = label.combine_chunks()
        n = len(text)
        self.rows += n
        if n == 0:
            return
        text = as_string(text)
        text_valid = valid_mask(text)
        label_valid = valid_mask(label)
        self.null_rows += n - int(np.count_nonzero(text_valid & label_valid))

        trimmed = pc.utf8_trim_whitespace(text)
        # null texts are neither blank nor hashed
        non_blank = text_valid & (np.diff(offset_buffer(trimmed)) > 0)
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
            values = value_buffer(label.cast(pa.int64()), np.int64)
            ok = label_valid & (values >= 0) & (values < k)
            idx[ok] = values[ok]
        elif pa.types.is_floating(kind):
            values = value_buffer(label.cast(pa.float64()), np.float64)
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
            found_valid = valid_mask(found)
            idx[found_valid] = value_buffer(found, np.int32)[found_valid]
            need_id = label_valid & ~found_valid
            if need_id.any():  # not a name: a class id written as digits?
                match = pc.match_substring_regex(label, r"^[0-9]{1,9}$")
                digits = need_id & true_mask(match)
                if digits.any():
                    ids = value_buffer(label.filter(bool_array(digits)).cast(pa.int64()), np.int64)
                    rows = np.flatnonzero(digits)
                    ok = ids < k
                    idx[rows[ok]] = ids[ok]
        known = idx >= 0
        self.label_counts += np.bincount(idx[known], minlength=k)[:k]
        unknown = label_valid & ~known
        n_unknown = int(np.count_nonzero(unknown))
        self.unknown_rows += n_unknown
        if n_unknown and len(self.unknown_examples) < MAX_EXAMPLES:
            for value in pc.unique(label.filter(bool_array(unknown)))[: 2 * MAX_EXAMPLES].to_pylist():
                shown = repr(value if not isinstance(value, str) else value[:50])
                if shown not in self.unknown_examples and len(self.unknown_examples) < MAX_EXAMPLES:
                    self.unknown_examples.append(shown)

    # -- end of split ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Sort the split's hashes (freeing the chunks as they are merged) and count its duplicates."""
        self.hashes, self.duplicate_rows = sort_and_count_duplicates(self.hash_chunks)

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


def scan_dataset(
    data: DataSpec, s3_endpoint_url: str | None = None, block_size: int = 4 << 20
) -> tuple[SplitScan, SplitScan]:
    """Scan train, then validation, and count their overlap; never raises for bad data.

    The hashes are dropped before returning: only the counts leave this function.
    """
    scan_file = _scan_csv if data.format == "csv" else _scan_parquet
    hasher = TextHasher()
    scans: list[SplitScan] = []
    for split, uri in (("train", data.train_uri), ("validation", data.validation_uri)):
        scan = SplitScan(split, uri, data.label_names)  # type: ignore[arg-type]
        scan_file(scan, data, s3_endpoint_url, block_size, hasher)
        if scan.columns_ok:
            scan.finish()
        else:
            scan.hash_chunks.clear()
        scans.append(scan)
    train, validation = scans
    if train.columns_ok and validation.columns_ok:
        assert train.hashes is not None and validation.hashes is not None
        validation.overlap_rows = count_overlap(train.hashes, validation.hashes)
    train.hashes = validation.hashes = None
    return train, validation


# -- reading the files ----------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + "…"
    return f"{type(exc).__name__}: {text}"


def _open(scan: SplitScan, s3_endpoint_url: str | None) -> BinaryIO | None:
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


def _fill_sha256(scan: SplitScan, s3_endpoint_url: str | None) -> None:
    """Fingerprint a file whose parsing stopped early, or a parquet file (a fresh, sequential read)."""
    digest = sha256_and_size(scan.uri, s3_endpoint_url)
    if digest is None:
        scan.sha256 = None
    else:
        scan.sha256, scan.bytes = digest


class PacedHashingReader(HashingReader):
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
    scan: SplitScan, data: DataSpec, s3_endpoint_url: str | None, block_size: int, hasher: TextHasher
) -> None:
    import pyarrow.csv as pcsv

    raw = _open(scan, s3_endpoint_url)
    if raw is None:
        return
    columns = [data.text_column, data.label_column]
    stream = PacedHashingReader(raw)
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
    scan: SplitScan, data: DataSpec, s3_endpoint_url: str | None, block_size: int, hasher: TextHasher
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
