"""``trainyard.validate.data_checks``: every check fails on a dataset crafted to breach exactly it.

All datasets are written by the tests (tests/support/synthetic_data.py); nothing is mocked: the real
validator reads real CSV/parquet files, locally and through moto's S3 server.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.paths import ROOT
from tests.support.s3 import CREDENTIALS, MotoS3
from tests.support.synthetic_data import sentiment_rows, write_csv, write_parquet, write_splits
from trainer.spec import DataSpec
from trainer.storage import dataset_fingerprint
from trainyard.config.pipeline_schema import DataChecks
from trainyard.validate.data_checks import (
    CHECK_NAMES,
    DataReport,
    DataValidationError,
    _TextHasher,
    require_valid,
    validate_dataset,
)

LABELS = ("negative", "positive")


def spec_for(train: Path | str, validation: Path | str, fmt: str = "csv", **overrides) -> DataSpec:
    fields = {
        "train_uri": str(train),
        "validation_uri": str(validation),
        "format": fmt,
        "text_column": "text",
        "label_column": "label",
        "label_names": LABELS,
        **overrides,
    }
    return DataSpec(**fields)


def failed(report: DataReport) -> set[tuple[str, str]]:
    return {(c.name, c.split) for c in report.checks if not c.passed}


def check(report: DataReport, name: str, split: str):
    matches = [c for c in report.checks if c.name == name and c.split == split]
    assert len(matches) == 1, f"{name}[{split}] in {[(c.name, c.split) for c in report.checks]}"
    return matches[0]


def train_rows(n: int = 400) -> list[dict]:
    return sentiment_rows(n, seed=1, prefix="t")


def validation_rows(n: int = 100) -> list[dict]:
    return sentiment_rows(n, seed=2, prefix="v")


def write(tmp_path: Path, train: list[dict], validation: list[dict], fmt: str = "csv") -> DataSpec:
    writer = write_csv if fmt == "csv" else write_parquet
    return spec_for(
        writer(tmp_path / f"train.{fmt}", train), writer(tmp_path / f"validation.{fmt}", validation), fmt
    )


# -- good data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_good_data_passes_every_check(tmp_path, fmt):
    train, validation = write_splits(tmp_path, fmt=fmt)
    report = require_valid(validate_dataset(spec_for(train, validation, fmt), DataChecks()))

    assert report.passed and failed(report) == set()
    names = {c.name for c in report.checks}
    assert names == set(CHECK_NAMES)
    assert len(report.checks) == 2 * (len(CHECK_NAMES) - 1) + 1  # per split, plus the overlap
    assert report.train.rows == 400 and report.validation.rows == 100
    assert report.train.label_counts == {"negative": 200, "positive": 200}
    assert report.validation.label_counts == {"negative": 50, "positive": 50}
    assert report.train.duplicate_rows == report.train.null_rows == report.train.empty_text_rows == 0
    assert report.overlap_rows == 0
    assert report.train.bytes == train.stat().st_size

    summary = report.summary()
    assert summary.startswith("Dataset PASSED")
    assert summary.count("✔ PASS") == len(report.checks) and "✘" not in summary


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_fingerprint_is_the_storage_fingerprint_and_sees_one_byte(tmp_path, fmt):
    train, validation = write_splits(tmp_path, fmt=fmt)
    spec = spec_for(train, validation, fmt)
    report = validate_dataset(spec, DataChecks())
    assert report.fingerprint == dataset_fingerprint(str(train), str(validation))
    assert report.fingerprint.startswith("sha256:")

    if fmt == "csv":
        # one byte of one text, same length: the data still passes, the fingerprint moves
        content = train.read_bytes()
        position = content.index(b"t17") + 2
        train.write_bytes(content[:position] + b"X" + content[position + 1 :])
    else:
        rows = train_rows()
        rows[17]["text"] = rows[17]["text"][:-1] + "X"
        write_parquet(train, rows)
    changed = validate_dataset(spec, DataChecks())
    assert changed.passed
    assert changed.fingerprint != report.fingerprint
    assert changed.fingerprint == dataset_fingerprint(str(train), str(validation))


def test_small_block_size_gives_the_same_report(tmp_path):
    """Batches split rows at block boundaries; counts and hashes must not depend on where."""
    rows = train_rows(2000)
    rows += [dict(r, text=f"  {r['text']} ") for r in rows[:30]]  # duplicates with padding
    spec = write(tmp_path, rows, validation_rows() + rows[:4])
    big = validate_dataset(spec, DataChecks())
    small = validate_dataset(spec, DataChecks(), block_size=4096)
    assert big.to_dict()["splits"] == small.to_dict()["splits"]
    assert big.overlap_rows == small.overlap_rows == 4
    assert big.train.duplicate_rows == 30


def test_report_dict_is_small_json_and_round_trips(tmp_path):
    spec = write(tmp_path, train_rows(), validation_rows())
    report = validate_dataset(spec, DataChecks())
    as_dict = report.to_dict()
    encoded = json.dumps(as_dict)
    assert len(encoded) < 16_000
    assert set(as_dict) >= {"passed", "fingerprint", "splits", "overlap_rows", "checks", "failed"}
    assert as_dict["splits"]["train"]["label_counts"] == {"negative": 200, "positive": 200}
    assert as_dict["checks"][0] == {
        "name": "readable",
        "split": "train",
        "passed": True,
        "value": None,
        "threshold": None,
        "message": f"train file {spec.train_uri} read as csv ({os.path.getsize(spec.train_uri):,} bytes)",
    }
    assert DataReport.from_dict(json.loads(encoded)) == DataReport(
        **{**report.__dict__, "seconds": round(report.seconds, 3)}
    )


# -- one bad dataset per check -----------------------------------------------------------------------


def test_null_labels_and_texts_fail_the_null_check(tmp_path):
    train = train_rows()
    for i in (3, 50, 77):
        train[i]["label"] = None  # csv writes an empty, unquoted field
    validation = validation_rows()
    validation[5]["text"] = None
    spec = write(tmp_path, train, validation)
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("null_fraction", "train"), ("null_fraction", "validation")}
    result = check(report, "null_fraction", "train")
    assert result.value == pytest.approx(3 / 400) and result.threshold == 0.0
    assert spec.train_uri in result.message and "3 of 400 rows (0.75%)" in result.message
    assert "allowed 0.00%" in result.message
    assert report.train.null_rows == 3 and report.validation.null_rows == 1


def test_null_fraction_within_threshold_passes(tmp_path):
    train = train_rows()
    train[3]["label"] = None
    report = validate_dataset(write(tmp_path, train, validation_rows()), DataChecks(max_null_fraction=0.01))
    assert report.passed and report.train.null_rows == 1


def test_unknown_labels_fail_with_examples_and_suggestions(tmp_path):
    train = train_rows()
    train[1]["label"] = "neutral"
    train[2]["label"] = "postive"
    train[9]["label"] = "7"  # digits, but no such class id
    spec = write(tmp_path, train, validation_rows())
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("label_values", "train")}
    result = check(report, "label_values", "train")
    assert result.value == 3 and report.train.unknown_label_rows == 3
    assert spec.train_uri in result.message
    assert "'neutral'" in result.message and "'7'" in result.message
    assert "'postive' (did you mean 'positive'?)" in result.message
    assert sorted(report.train.unknown_label_examples) == ["'7'", "'neutral'", "'postive'"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_integer_class_ids_are_accepted(tmp_path, fmt):
    def as_ids(rows):
        return [{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows]

    spec = write(tmp_path, as_ids(train_rows()), as_ids(validation_rows()), fmt)
    if fmt == "parquet":
        assert pq.read_schema(spec.train_uri).field("label").type == pa.int64()
    report = validate_dataset(spec, DataChecks())
    assert report.passed, report.summary()
    assert report.train.label_counts == {"negative": 200, "positive": 200}


def test_parquet_class_id_out_of_range_is_an_unknown_label(tmp_path):
    train = [{"text": r["text"], "label": LABELS.index(r["label"])} for r in train_rows()]
    train[0]["label"] = 2
    train[1]["label"] = -1
    report = validate_dataset(write(tmp_path, train, validation_rows(), "parquet"), DataChecks())
    assert failed(report) == {("label_values", "train")}
    assert report.train.unknown_label_rows == 2
    assert sorted(report.train.unknown_label_examples) == ["-1", "2"]


def test_duplicates_fail_counting_rows_beyond_the_first(tmp_path):
    train = train_rows()
    # 30 repeats (7.5% > 5%), some differing only by surrounding whitespace
    train += [dict(r, text=f"  {r['text']}\t") if i % 2 else dict(r) for i, r in enumerate(train[:30])]
    spec = write(tmp_path, train, validation_rows())
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("duplicate_fraction", "train")}
    result = check(report, "duplicate_fraction", "train")
    assert report.train.duplicate_rows == 30
    assert result.value == pytest.approx(30 / 430) and result.threshold == 0.05
    assert "30 of 430 rows" in result.message and spec.train_uri in result.message


def test_leakage_fails_the_overlap_check(tmp_path):
    train = train_rows()
    validation = validation_rows()
    validation[:5] = [dict(r) for r in train[:5]]
    validation[5] = dict(train[6], text=f" {train[6]['text']} ")  # same text once stripped
    spec = write(tmp_path, train, validation)
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("overlap_fraction", "validation")}
    result = check(report, "overlap_fraction", "validation")
    assert report.overlap_rows == 6 and result.value == pytest.approx(0.06)
    assert spec.train_uri in result.message and spec.validation_uri in result.message
    assert "6 of 100 rows" in result.message


def test_too_few_rows_fail_per_split(tmp_path):
    spec = write(tmp_path, train_rows(60), validation_rows(10))
    report = validate_dataset(spec, DataChecks())
    assert failed(report) == {("min_rows", "train"), ("min_rows", "validation")}
    result = check(report, "min_rows", "train")
    assert (result.value, result.threshold) == (60, 100)
    assert "has 60 rows; at least 100 required" in result.message and spec.train_uri in result.message
    assert check(report, "min_rows", "validation").threshold == 20


def test_class_imbalance_fails_the_class_share_check(tmp_path):
    positives = [r for r in train_rows(800) if r["label"] == "positive"]
    negatives = [r for r in train_rows(800) if r["label"] == "negative"]
    spec = write(tmp_path, positives[:390] + negatives[:10], validation_rows())
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("min_class_share", "train")}
    result = check(report, "min_class_share", "train")
    assert result.value == pytest.approx(10 / 400) and result.threshold == 0.05
    assert "'negative' (2.50%)" in result.message and spec.train_uri in result.message


def test_a_declared_class_missing_from_validation_fails(tmp_path):
    validation = [r for r in validation_rows(200) if r["label"] == "positive"]
    report = validate_dataset(write(tmp_path, train_rows(), validation), DataChecks())
    assert failed(report) == {("min_class_share", "validation")}
    assert check(report, "min_class_share", "validation").value == 0.0


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_column_is_named_with_the_columns_found(tmp_path, fmt):
    train = [{"sentence": r["text"], "label": r["label"]} for r in train_rows()]
    validation = validation_rows()
    validation[0]["label"] = None  # still reported although train is unusable
    spec = write(tmp_path, train, validation, fmt)
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("required_columns", "train"), ("null_fraction", "validation")}
    result = check(report, "required_columns", "train")
    assert "no column 'text'" in result.message and "columns found: sentence, label" in result.message
    assert spec.train_uri in result.message
    # train's row checks and the overlap are skipped, not failed
    assert not [c for c in report.checks if c.split == "train" and c.name == "min_rows"]
    assert not [c for c in report.checks if c.name == "overlap_fraction"]
    assert report.fingerprint == dataset_fingerprint(spec.train_uri, spec.validation_uri)


def test_missing_file_fails_readable_and_other_failures_are_still_reported(tmp_path):
    validation = validation_rows(10)
    spec = spec_for(tmp_path / "nope" / "train.csv", write_csv(tmp_path / "validation.csv", validation))
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("readable", "train"), ("min_rows", "validation")}
    result = check(report, "readable", "train")
    assert spec.train_uri in result.message and "does not exist" in result.message
    assert report.fingerprint == ""

    with pytest.raises(DataValidationError) as caught:
        require_valid(report)
    message = str(caught.value)
    assert caught.value.report is report
    assert "2 of " in message and "checks failed" in message
    assert f"readable [train]: train file {spec.train_uri} cannot be read" in message
    assert "min_rows [validation]" in message and "has 10 rows; at least 20 required" in message
    assert "trigger the run again" in message
    assert str(pickle.loads(pickle.dumps(caught.value))) == message  # survives Airflow's pickling


def test_unterminated_quote_fails_readable_with_the_parser_reason(tmp_path):
    path = write_csv(tmp_path / "train.csv", train_rows())
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(200, '"an unterminated quote,positive\n')
    path.write_text("".join(lines))
    spec = spec_for(path, write_csv(tmp_path / "validation.csv", validation_rows()))
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("readable", "train")}
    result = check(report, "readable", "train")
    assert spec.train_uri in result.message and "not valid CSV" in result.message
    assert "CSV parse error" in result.message and "unterminated quote" in result.message
    assert "Traceback" not in result.message
    # still fingerprinted: the bytes are readable, only the content is wrong
    assert report.fingerprint == dataset_fingerprint(spec.train_uri, spec.validation_uri)


def test_invalid_utf8_fails_readable(tmp_path):
    path = write_csv(tmp_path / "train.csv", train_rows())
    path.write_bytes(path.read_bytes().replace(b"t17", b"t\xff\xfe", 1))
    spec = spec_for(path, write_csv(tmp_path / "validation.csv", validation_rows()))
    report = validate_dataset(spec, DataChecks())
    assert failed(report) == {("readable", "train")}
    assert "invalid UTF8" in check(report, "readable", "train").message


def test_truncated_parquet_fails_readable(tmp_path):
    train, validation = write_splits(tmp_path, fmt="parquet")
    content = train.read_bytes()
    train.write_bytes(content[: len(content) // 2])
    report = validate_dataset(spec_for(train, validation, "parquet"), DataChecks())

    assert failed(report) == {("readable", "train")}
    result = check(report, "readable", "train")
    assert str(train) in result.message and "not a readable parquet file" in result.message
    assert "magic bytes" in result.message


def test_empty_csv_fails_readable(tmp_path):
    train = tmp_path / "train.csv"
    train.write_bytes(b"")
    report = validate_dataset(spec_for(train, write_csv(tmp_path / "v.csv", validation_rows())), DataChecks())
    assert failed(report) == {("readable", "train")}
    assert "Empty CSV file" in check(report, "readable", "train").message


def test_blank_texts_fail_the_empty_text_check(tmp_path):
    train = train_rows()
    for i in range(0, 10):
        train[i]["text"] = " \t "
    for i in range(10, 14):
        train[i]["text"] = ""  # quoted below: an empty text, not a null
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"], quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(train)
    spec = spec_for(path, write_csv(tmp_path / "validation.csv", validation_rows()))
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("empty_text_fraction", "train")}
    result = check(report, "empty_text_fraction", "train")
    assert report.train.empty_text_rows == 14 and report.train.null_rows == 0
    assert report.train.duplicate_rows == 0  # blank texts are not counted as duplicates of each other
    assert result.value == pytest.approx(14 / 400) and "14 of 400 rows (3.50%)" in result.message


def test_every_failure_is_reported_at_once(tmp_path):
    train = train_rows()
    train[0]["label"] = None
    train[1]["label"] = "neutral"
    train += [dict(r) for r in train[2:40]]
    validation = [*validation_rows(10), dict(train[5])]
    spec = write(tmp_path, train, validation)
    report = validate_dataset(spec, DataChecks())
    assert failed(report) == {
        ("null_fraction", "train"),
        ("label_values", "train"),
        ("duplicate_fraction", "train"),
        ("min_rows", "validation"),
        ("overlap_fraction", "validation"),
    }
    message = str(DataValidationError(report))
    for name, split in failed(report):
        assert f"{name} [{split}]" in message
    summary = report.summary()
    assert summary.startswith("Dataset FAILED") and summary.count("✘ FAIL") == 5


# -- the hash ------------------------------------------------------------------------------------------


def test_text_hash_depends_only_on_the_text():
    hasher = _TextHasher(slice_bytes=64)  # tiny slices: exercise slicing and the table growth
    long = "x" * 1000
    texts = ["a", "b", "a", "", "ab", "ba", long, "ü", "a\x00", long + "y", long]
    hashes = hasher.hash(pa.array(texts))
    assert hashes[0] == hashes[2] and hashes[6] == hashes[10]
    assert len(set(hashes.tolist())) == len(set(texts))
    # independent of the array's type, offset and neighbours
    sliced = pa.array(["zzz", *texts])[1:]
    assert hasher.hash(sliced).tolist() == hashes.tolist()
    assert hasher.hash(pa.array(texts, type=pa.large_string())).tolist() == hashes.tolist()
    assert _TextHasher().hash(pa.array(texts)).tolist() == hashes.tolist()


def test_validation_does_not_import_pandas(tmp_path):
    """pyarrow imports pandas whenever it converts Python values; the validator avoids it (~0.3 s)."""
    train, validation = write_splits(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from trainer.spec import DataSpec
        from trainyard.validate.data_checks import validate_dataset
        from trainyard.config.pipeline_schema import DataChecks
        spec = DataSpec(train_uri={str(train)!r}, validation_uri={str(validation)!r}, format="csv",
                        text_column="text", label_column="label", label_names=("negative", "positive"))
        assert validate_dataset(spec, DataChecks()).passed
        print("pandas" in sys.modules, "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


# -- S3 (moto's S3 server) -------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with MotoS3("trainyard") as server:
        yield server.endpoint, server.client


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_s3_dataset(tmp_path, s3, fmt):
    endpoint, client = s3
    train, validation = write_splits(tmp_path, fmt=fmt)
    client.upload_file(str(train), "trainyard", f"data/train.{fmt}")
    client.upload_file(str(validation), "trainyard", f"data/validation.{fmt}")
    spec = spec_for(f"s3://trainyard/data/train.{fmt}", f"s3://trainyard/data/validation.{fmt}", fmt)

    report = validate_dataset(spec, DataChecks(), s3_endpoint_url=endpoint)
    assert report.passed, report.summary()
    assert report.train.rows == 400 and report.validation.rows == 100
    assert report.fingerprint == dataset_fingerprint(spec.train_uri, spec.validation_uri, endpoint)
    assert report.fingerprint == dataset_fingerprint(str(train), str(validation))  # same bytes

    missing = spec_for("s3://trainyard/data/missing.csv", spec.validation_uri, fmt)
    report = validate_dataset(missing, DataChecks(), s3_endpoint_url=endpoint)
    assert failed(report) == {("readable", "train")}
    assert "s3://trainyard/data/missing.csv" in check(report, "readable", "train").message


# -- memory ----------------------------------------------------------------------------------------

MEMORY_CHILD = """
import json, sys
from trainer.spec import DataSpec
from trainyard.validate.data_checks import validate_dataset
from trainyard.config.pipeline_schema import DataChecks

def high_water_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

spec = DataSpec(train_uri=sys.argv[1], validation_uri=sys.argv[2], format="csv", text_column="text",
                label_column="label", label_names=("negative", "positive"))
before = high_water_kib()
report = validate_dataset(spec, DataChecks())
print(json.dumps({"before_kib": before, "peak_kib": high_water_kib(), "report": report.to_dict()}))
"""


def write_big_csv(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    """Unique tweet-like texts, written vectorised (a Python csv loop would take minutes)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    from tests.support.synthetic_data import FILLER, NEGATIVE, POSITIVE

    vocab = pa.array(FILLER + POSITIVE + NEGATIVE)
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.string())])
    with pcsv.CSVWriter(str(path), schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            words = [
                pa.DictionaryArray.from_arrays(
                    pa.array(rng.integers(0, len(vocab), n, dtype=np.int32)), vocab
                ).cast(pa.string())
                for _ in range(8)
            ]
            ids = pa.array(np.arange(start, start + n))
            text = pc.binary_join_element_wise(*words, ids.cast(pa.string()), " ")
            labels = pa.DictionaryArray.from_arrays(
                pa.array((np.arange(start, start + n) % 2).astype(np.int32)), pa.array(list(LABELS))
            ).cast(pa.string())
            writer.write(pa.record_batch([ids, text, labels], schema=schema))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_csv_larger_than_a_memory_limit_validates_under_it(tmp_path):
    """A ~420 MB CSV validates with a peak RSS under a 320 MiB limit (and far less than the file).

    About 6 s on 2 cores (writing the file is half of it), so not marked slow. Measured peak: ~255 MiB,
    of which ~78 MiB is the interpreter with pyarrow and numpy.

    The limit is checked against the child's own peak resident memory (``VmHWM`` in
    /proc/self/status, the kernel's high-water mark for the process's address space), not enforced:

    * ``setrlimit(RLIMIT_RSS)`` is ignored by Linux, and ``RLIMIT_AS`` counts address space that is
      reserved but never touched (Arrow's mimalloc arenas, ~10 thread stacks of 8 MiB), so it fails
      at a value unrelated to the memory really used;
    * ``ru_maxrss`` is no good either: ``RUSAGE_SELF`` keeps the high-water mark of the process
      image before ``exec`` (here the pytest process that forked it, which just wrote the file) and
      ``RUSAGE_CHILDREN`` reports the largest of all children pytest ever ran.

    The child validates in a fresh interpreter; the file reaches it through read(), so the page
    cache is not part of its RSS.
    """
    train = tmp_path / "train.csv"
    write_big_csv(train, 5_500_000)
    size_mib = train.stat().st_size / 2**20
    validation = write_csv(tmp_path / "validation.csv", validation_rows())
    limit_mib = 320
    assert size_mib > limit_mib + 60, size_mib

    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(train), str(validation)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    report = result["report"]
    assert report["passed"], report["failed"]
    assert report["splits"]["train"]["rows"] == 5_500_000
    peak_mib = result["peak_kib"] / 1024
    assert peak_mib < limit_mib, f"peak RSS {peak_mib:.0f} MiB for a {size_mib:.0f} MiB file"
    # what validation itself added beyond the interpreter and imports
    assert (result["peak_kib"] - result["before_kib"]) / 1024 < size_mib / 2
