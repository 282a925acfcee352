"""Datasets for the validator's tests: written by the tests, read by the real validator (nothing mocked)."""

from __future__ import annotations

from pathlib import Path

from tests.support.synthetic_data import sentiment_rows, write_csv, write_parquet
from trainer.spec import DataSpec
from trainyard.validate.report import CheckResult, DataReport

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


def check(report: DataReport, name: str, split: str) -> CheckResult:
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
