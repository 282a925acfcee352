"""``trainyard.validate.checks``: every check fails on a dataset crafted to breach exactly it.

All datasets are written by the tests (tests/support/synthetic_data.py); nothing is mocked: the real
validator reads real CSV/parquet files.
"""

from __future__ import annotations

import csv
import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.datasets import (
    LABELS,
    check,
    failed,
    spec_for,
    train_rows,
    validation_rows,
    write,
)
from tests.support.synthetic_data import write_csv, write_splits
from trainer.storage import dataset_fingerprint
from trainyard.config.pipeline_schema import DataChecks
from trainyard.validate.checks import CHECK_NAMES, FRACTION_CHECKS
from trainyard.validate.dataset import validate_dataset
from trainyard.validate.report import DataValidationError, require_valid

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


def test_a_class_under_the_floor_fails_the_class_share_check(tmp_path):
    positives = [r for r in train_rows(800) if r["label"] == "positive"]
    negatives = [r for r in train_rows(800) if r["label"] == "negative"]
    spec = write(tmp_path, positives[:397] + negatives[:3], validation_rows())
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {("min_class_share", "train")}
    result = check(report, "min_class_share", "train")
    assert result.value == pytest.approx(3 / 400) and result.threshold == 0.01
    assert "'negative' (0.75%)" in result.message and spec.train_uri in result.message
    assert report.warnings == [], "a failure, not also a warning"


def test_skewed_labels_above_the_floor_pass_with_a_warning_that_names_the_fix(tmp_path):
    positives = [r for r in train_rows(800) if r["label"] == "positive"]
    negatives = [r for r in train_rows(800) if r["label"] == "negative"]
    spec = write(tmp_path, positives[:390] + negatives[:10], validation_rows())

    report = validate_dataset(spec, DataChecks())
    assert report.passed and failed(report) == set()
    (warning,) = report.warnings
    assert spec.train_uri in warning and "'negative' 10 rows (2.50%)" in warning
    assert "set training.class_weights: auto" in warning
    assert "⚠ WARN" in report.summary() and report.to_dict()["warnings"] == [warning]
    assert type(report).from_dict(report.to_dict()).warnings == [warning]

    (warning,) = validate_dataset(spec, DataChecks(), class_weights="auto").warnings
    assert "training.class_weights is auto" in warning
    assert validate_dataset(spec, DataChecks(warn_class_share=0.02)).warnings == []
    assert (
        validate_dataset(write(tmp_path / "even", train_rows(), validation_rows()), DataChecks()).warnings
        == []
    )


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


# -- the fraction-check table --------------------------------------------------------------------------


def _breach_null(train: list[dict], validation: list[dict]) -> tuple[str, int, int]:
    for i in (3, 50):
        train[i]["label"] = None
    return "train", 2, 400


def _breach_empty_text(train: list[dict], validation: list[dict]) -> tuple[str, int, int]:
    for i in range(10):  # 2.5% > the default 1%
        train[i]["text"] = " \t "
    return "train", 10, 400


def _breach_duplicates(train: list[dict], validation: list[dict]) -> tuple[str, int, int]:
    train += [dict(r) for r in train[:30]]  # 30 of 430 > the default 5%
    return "train", 30, 430


def _breach_overlap(train: list[dict], validation: list[dict]) -> tuple[str, int, int]:
    validation[:3] = [dict(r) for r in train[:3]]
    return "validation", 3, 100


#: For each row of FRACTION_CHECKS, how to breach exactly it: edits the rows in place, returns the split
#: that must fail, the rows counted and the split's rows.
BREACHES = {
    "null_fraction": _breach_null,
    "empty_text_fraction": _breach_empty_text,
    "duplicate_fraction": _breach_duplicates,
    "overlap_fraction": _breach_overlap,
}


def test_every_fraction_check_has_a_breach_and_a_known_name_and_limit():
    assert {row.name for row in FRACTION_CHECKS} == set(BREACHES)
    assert len({row.name for row in FRACTION_CHECKS}) == len(FRACTION_CHECKS)
    assert {row.name for row in FRACTION_CHECKS} <= set(CHECK_NAMES)
    for row in FRACTION_CHECKS:
        assert row.limit_field in DataChecks.model_fields, row
        assert row.limit_field.startswith("max_")
    with pytest.raises(dataclasses.FrozenInstanceError):
        FRACTION_CHECKS[0].name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("row", FRACTION_CHECKS, ids=lambda row: row.name)
def test_each_fraction_check_fails_alone_on_its_breach(tmp_path, row):
    train, validation = train_rows(), validation_rows()
    split, count, rows = BREACHES[row.name](train, validation)
    spec = write(tmp_path, train, validation)
    report = validate_dataset(spec, DataChecks())

    assert failed(report) == {(row.name, split)}
    result = check(report, row.name, split)
    limit = getattr(DataChecks(), row.limit_field)
    assert result.value == pytest.approx(count / rows) and result.threshold == limit
    assert f"{count} of {rows} rows" in result.message
    assert result.message.startswith(f"{split} file {getattr(spec, f'{split}_uri')}: ")
    assert f"{row.fix}, or raise dataset.checks.{row.limit_field}." in result.message
    # raising the limit to the measured fraction passes it
    relaxed = validate_dataset(spec, DataChecks(**{row.limit_field: count / rows}))
    assert relaxed.passed, relaxed.summary()
    assert f"{row.fix}" not in check(relaxed, row.name, split).message
