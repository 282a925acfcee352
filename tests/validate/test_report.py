"""``trainyard.validate.report``: the report's JSON round trip and the error that stops a run."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from tests.support.datasets import check, failed, spec_for, train_rows, validation_rows, write
from tests.support.synthetic_data import write_csv
from trainyard.config.pipeline_schema import DataChecks
from trainyard.validate.dataset import validate_dataset
from trainyard.validate.report import DataReport, DataValidationError, require_valid


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
