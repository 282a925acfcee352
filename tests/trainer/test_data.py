"""``trainer.data``: labels as ids, one label rule with ``validate_data``, and only the approved bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.synthetic_data import sentiment_rows, write_csv, write_parquet
from tests.support.trainer_runs import child_env, make_spec, run_trainer
from trainer.spec import DataSpec, RunSpec
from trainer.storage import dataset_fingerprint


@pytest.mark.slow
def test_unknown_label_value_is_an_error_naming_it(tmp_path, tiny_model):
    rows = sentiment_rows(40, seed=3)
    rows[7]["label"] = "neutral"
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40, seed=4))
    validation = write_csv(tmp_path / "validation.csv", rows)
    spec = make_spec(tmp_path, str(tiny_model), str(train), str(validation))
    proc = run_trainer(spec, child_env(tmp_path))
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "validation data has unknown label value 'neutral' in column 'label'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_label_mapping_accepts_names_and_integer_ids():
    from trainer.data import label_mapping
    from trainer.errors import TrainerInputError

    data = DataSpec(
        train_uri="t.csv",
        validation_uri="v.csv",
        format="csv",
        text_column="text",
        label_column="label",
        label_names=("negative", "neutral", "positive"),
    )
    assert label_mapping(["positive", "negative"], data, "train") == {"positive": 2, "negative": 0}
    assert label_mapping([0, 2, 1.0], data, "train") == {0: 0, 2: 2, 1.0: 1}
    with pytest.raises(TrainerInputError, match=r"unknown label value 3, 'Positive', an empty value"):
        label_mapping([3, "Positive", None, 1], data, "train")


def test_changed_data_is_refused(tmp_path, splits):
    from trainer.data import staged_files
    from trainer.errors import TrainerInputError

    approved = "sha256:" + "0" * 64
    spec = RunSpec.model_validate(make_spec(tmp_path, "unused", str(splits[0]), str(splits[1]), approved))
    with pytest.raises(TrainerInputError, match="the dataset changed after it was validated"):
        staged_files(spec)


def test_parquet_with_integer_labels_loads_as_ids(tmp_path):
    from trainer.data import load_splits

    rows = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in sentiment_rows(20, seed=5)]
    train = write_parquet(tmp_path / "train.parquet", rows)
    validation = write_parquet(tmp_path / "validation.parquet", rows[:6])
    spec = RunSpec.model_validate(make_spec(tmp_path, "unused", str(train), str(validation)))
    data = load_splits(spec)
    assert data["train"]["labels"] == [row["label"] for row in rows]
    assert data["validation"].features["labels"].names == ["negative", "positive"]


@pytest.mark.parametrize(
    ("labels", "fmt"),
    [
        (["negative", "positive"], "csv"),
        (["0", "1"], "csv"),
        (["negative", "1"], "csv"),  # names and digit ids mixed, as CSV reads them
        ([False, True], "parquet"),
        ([0, 1], "parquet"),
        (["negative", "Positive"], "csv"),  # a typo: both sides must refuse it
        (["2", "0"], "csv"),  # out of range
        ([0.5, 1.0], "parquet"),
    ],
)
def test_validate_data_and_the_trainer_agree_on_labels(tmp_path, labels, fmt):
    """Bad labels must stop at validate_data, never in a GPU pod: one rule, both sides."""
    import pyarrow.parquet as pq

    from trainer.data import label_mapping
    from trainer.errors import TrainerInputError
    from trainyard.config.pipeline_schema import DataChecks
    from trainyard.validate.dataset import validate_dataset

    rows = sentiment_rows(60, seed=3)
    for i, row in enumerate(rows):
        row["label"] = labels[i % len(labels)]
    writer = write_csv if fmt == "csv" else write_parquet
    train = writer(tmp_path / f"train.{fmt}", rows[:40])
    validation = writer(tmp_path / f"validation.{fmt}", rows[40:])
    data = DataSpec(
        train_uri=str(train),
        validation_uri=str(validation),
        format=fmt,
        text_column="text",
        label_column="label",
        label_names=("negative", "positive"),
    )
    checks = DataChecks(min_rows=1, min_validation_rows=1, min_class_share=0.0)
    report = validate_dataset(data, checks)
    label_check = next(c for c in report.checks if c.name == "label_values" and c.split == "train")

    if fmt == "csv":  # what `datasets` hands the trainer: CSV cells parsed by pyarrow
        import pyarrow.csv as pacsv

        values = pacsv.read_csv(train).column("label").to_pylist()
    else:
        values = pq.read_table(train).column("label").to_pylist()
    try:
        label_mapping(sorted(set(values), key=repr), data, "train")
        trainer_accepts = True
    except TrainerInputError:
        trainer_accepts = False
    assert label_check.passed == trainer_accepts, (labels, label_check.message)


def test_remote_data_is_trained_from_the_bytes_that_were_hashed(tmp_path, splits, s3, monkeypatch):
    """Staged once while hashed: an object overwritten afterwards cannot slip into training."""
    from trainer.data import staged_files

    endpoint = s3.endpoint
    s3.upload_tree(splits[0].parent, "s3://trainyard/data")
    train, validation = "s3://trainyard/data/train.csv", "s3://trainyard/data/validation.csv"
    spec_dict = make_spec(tmp_path, "unused", train, validation, dataset_fingerprint(*map(str, splits)))
    spec_dict["s3_endpoint_url"] = endpoint
    monkeypatch.setenv("TRAINYARD_SCRATCH", str(tmp_path / "scratch"))
    files = staged_files(RunSpec.model_validate(spec_dict))
    assert Path(files["train"]).read_bytes() == splits[0].read_bytes()
    assert Path(files["train"]).is_relative_to(tmp_path / "scratch")

    import boto3

    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket="trainyard", Key="data/train.csv", Body=b"x")
    from trainer.errors import TrainerInputError

    with pytest.raises(TrainerInputError, match="the dataset changed after it was validated"):
        staged_files(RunSpec.model_validate(spec_dict))  # a relaunch after the overwrite is refused
