"""``python -m trainer`` for real: a tiny BERT trains in a subprocess, MLflow on a SQLite file, no mocks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.s3 import CREDENTIALS, MotoS3
from tests.support.synthetic_data import (
    sentiment_rows,
    unpunctuated_text,
    write_csv,
    write_long_splits,
    write_parquet,
    write_splits,
)
from tests.support.tiny_model import build_tiny_model
from trainer.spec import EVAL_METRICS, MODEL_ARTIFACT, DataSpec, RunSpec, run_tags
from trainer.storage import dataset_fingerprint

TIMEOUT_S = 120


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_splits(tmp_path_factory.mktemp("data"), train_rows=400, validation_rows=100)


def make_spec(
    tmp_path: Path, model: str, train: str, validation: str, fingerprint: str | None = None, **hyperparameters
) -> dict:
    return {
        "identity": {
            "pipeline": "tweet-sentiment",
            "environment": "local",
            "dag_id": "tweet-sentiment",
            "run_id": "manual__2026-01-01T00:00:00",
            "try_number": 1,
        },
        "data": {
            "train_uri": train,
            "validation_uri": validation,
            "format": "parquet" if train.endswith(".parquet") else "csv",
            "text_column": "text",
            "label_column": "label",
            "label_names": ["negative", "positive"],
        },
        "dataset_fingerprint": fingerprint or dataset_fingerprint(train, validation),
        "model": {"base": model, "max_length": 32},
        "hyperparameters": {"epochs": 3, "learning_rate": 1e-3, "batch_size": 16, **hyperparameters},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment_name": "tweet-sentiment",
            "artifact_location": str(tmp_path / "mlartifacts"),
        },
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "validation_report": {"rows": 500, "checks": "passed"},
    }


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "HF_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="1",  # local model paths only; nothing may reach for the Hub
        MLFLOW_DISABLE_TELEMETRY="true",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # the tiny model gains nothing from threads; they thrash on a busy machine
        **extra,
    )
    return env


def trainer_command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "trainer", "--spec", json.dumps(spec)]


def run_trainer(spec: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        trainer_command(spec), env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold only the result line: {proc.stdout!r}"
    return json.loads(lines[0])["trainyard_result"]


def mlflow_client(spec: dict):
    import mlflow

    mlflow.set_tracking_uri(spec["mlflow"]["tracking_uri"])
    return mlflow.MlflowClient()


@pytest.mark.slow
def test_trains_logs_to_mlflow_and_removes_checkpoints(tmp_path, tiny_model, splits):
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    proc = run_trainer(spec, child_env(tmp_path))
    result = result_of(proc)

    assert re.search(r"step \d+/75 .* loss [\d.]+ .* lr .* samples/s  ETA ", proc.stderr)
    assert "it/s]" not in proc.stderr, "no tqdm bars when stderr is not a terminal"
    assert not (tmp_path / "checkpoints").exists()

    client = mlflow_client(spec)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    identity = RunSpec.model_validate(spec).identity
    expected_tags = run_tags(identity, spec["dataset_fingerprint"])
    assert {k: run.data.tags.get(k) for k in expected_tags} == expected_tags
    assert run.data.tags["trainyard.model_uri"] == result["model_uri"]
    assert "trainyard.resumed_from_step" not in run.data.tags

    params = run.data.params
    assert params["learning_rate"] == "0.001"
    assert params["batch_size"] == "16"
    assert params["model.base"] == str(tiny_model)
    assert params["data.label_names"] == "negative,positive"
    assert params["data.train_rows"] == "400"
    assert params["data.validation_rows"] == "100"
    assert params["dataset_fingerprint"] == spec["dataset_fingerprint"]
    assert params["precision_effective"] == "fp32"

    metrics = run.data.metrics
    for name in EVAL_METRICS:
        assert result["metrics"][name] == pytest.approx(metrics[name])
    assert 0.0 <= metrics["eval_f1_macro"] <= 1.0
    assert 0.8 <= metrics["eval_accuracy"] <= 1.0, "the synthetic data is learnable"
    assert metrics["eval_loss"] < 0.5, "well below log(2) = 0.69, the loss of a coin flip"
    assert {"train_runtime", "train_samples_per_second", "loss", "learning_rate"} <= set(metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) > 5

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "validation_report.json" in artifacts

    import mlflow

    model = mlflow.pyfunc.load_model(result["model_uri"])
    predictions = model.predict(["the movie love great wonderful day", "the game awful terrible bad phone"])
    assert list(predictions["label"]) == ["positive", "negative"]
    # Promotion registers the model by the URI in the trainyard.model_uri tag.
    version = mlflow.register_model(result["model_uri"], "tweet-sentiment")
    assert version.run_id == run.info.run_id
    logged = mlflow.get_logged_model(result["model_uri"].removeprefix("models:/"))
    assert logged.name == MODEL_ARTIFACT
    requirements = (Path(logged.artifact_location) / "requirements.txt").read_text().split()
    assert any(r.startswith("transformers==") for r in requirements)
    assert any(re.fullmatch(r"torch==[\d.]+", r) for r in requirements)


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"trainer exited early: {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_relaunch_resumes_the_same_run(tmp_path, tiny_model, splits):
    spec = make_spec(
        tmp_path, str(tiny_model), str(splits[0]), str(splits[1]), max_steps=200, checkpoint_every_steps=10
    )
    checkpoints = tmp_path / "checkpoints"
    env = child_env(tmp_path)
    with subprocess.Popen(
        trainer_command(spec), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        wait_for(lambda: any(checkpoints.glob("checkpoint-*/trainer_state.json")), TIMEOUT_S, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr[-4000:]
    assert stdout == ""
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert saved and saved[-1] < 200
    assert f"Stopping at step {saved[-1]}: saving a checkpoint" in stderr
    run_id = (checkpoints / "mlflow_run_id").read_text().strip()
    assert mlflow_client(spec).get_run(run_id).info.status == "KILLED"

    proc = run_trainer(spec, env)
    result = result_of(proc)
    resumed = re.search(r"Resuming from checkpoint \S+ \(step (\d+)\)", proc.stderr)
    assert resumed and int(resumed.group(1)) == saved[-1] > 0
    assert result["mlflow_run_id"] == run_id
    assert result["resumed_from_step"] == saved[-1]
    run = mlflow_client(spec).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainyard.resumed_from_step"] == str(saved[-1])
    assert run.data.metrics["eval_accuracy"] >= 0.8
    assert not checkpoints.exists()

    # Resuming is exact: the same model as a run that was never interrupted (same seed, one thread).
    fresh_dir = tmp_path / "uninterrupted"
    fresh_dir.mkdir()
    fresh = make_spec(
        fresh_dir, str(tiny_model), str(splits[0]), str(splits[1]), max_steps=200, checkpoint_every_steps=10
    )
    uninterrupted = result_of(run_trainer(fresh, child_env(fresh_dir)))
    assert result["metrics"]["eval_loss"] == pytest.approx(uninterrupted["metrics"]["eval_loss"], rel=1e-5)


def test_sigterm_before_training_exits_promptly(tmp_path, tiny_model, splits):
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    with subprocess.Popen(
        trainer_command(spec),
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        seen = []
        for line in proc.stderr:  # wait for the data to load: the model and training are still ahead
            seen.append(line)
            if "Data: " in line:
                break
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)
        stderr = "".join(seen) + stderr
    assert "Data: " in stderr, stderr[-4000:]
    assert "step " not in stderr, "interrupted before training started"
    assert proc.returncode == 143, stderr[-4000:]
    assert time.monotonic() - started < 10
    assert stdout == ""
    assert not any((tmp_path / "checkpoints").glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("spec_text", "expected"),
    [
        ('{"identity": {}}', "identity.pipeline"),
        ("{not json", "Invalid JSON"),
    ],
)
def test_invalid_spec_exits_2_with_the_validation_message(tmp_path, spec_text, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--spec", spec_text],
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid run spec" in proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_invalid_spec_file_field_is_named(tmp_path, tiny_model, splits):
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    spec["hyperparameters"]["learning_rte"] = 0.1
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--spec-file", str(path)],
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "hyperparameters.learning_rte" in proc.stderr
    assert "Traceback" not in proc.stderr


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


# -- in-process pieces -------------------------------------------------------------------------------


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


# -- s3:// data, base model and checkpoint root (moto's S3 server) ------------------------------------


@pytest.fixture
def s3(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with MotoS3("trainyard") as server:
        yield server


@pytest.mark.slow
def test_s3_data_model_and_checkpoints(tmp_path, tiny_model, splits, s3):
    endpoint, credentials = s3.endpoint, dict(CREDENTIALS)
    s3.upload_tree(splits[0].parent, "s3://trainyard/data")
    s3.upload_tree(tiny_model, "s3://trainyard/models/tiny")
    train, validation = "s3://trainyard/data/train.csv", "s3://trainyard/data/validation.csv"
    spec = make_spec(
        tmp_path,
        "s3://trainyard/models/tiny",
        train,
        validation,
        fingerprint=dataset_fingerprint(train, validation, endpoint),
        epochs=3,  # 75 steps: enough to learn the data (one epoch stays at chance)
        checkpoint_every_steps=10,
    )
    spec.update(
        s3_endpoint_url=endpoint, checkpoint_dir="s3://trainyard/checkpoints/run-1", keep_checkpoints=True
    )
    env = child_env(tmp_path, TRAINYARD_SCRATCH=str(tmp_path / "work"), **credentials)
    del env["HF_HUB_OFFLINE"]  # with it, non-streaming load_dataset cannot read s3:// (datasets 5)
    result = result_of(run_trainer(spec, env))
    assert result["metrics"]["eval_accuracy"] >= 0.8, "trained on the data and model read from S3"

    import fsspec

    from trainer.checkpoints import CheckpointStore

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint})
    remote = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("trainyard/checkpoints/run-1"))
    assert remote == ["checkpoint-70", "checkpoint-75", "mlflow_run_id"]  # save_total_limit=2, mirrored
    assert (
        fs.cat_file("trainyard/checkpoints/run-1/mlflow_run_id").decode().strip() == result["mlflow_run_id"]
    )

    # A fresh pod (empty work dir) gets the newest checkpoint and the run id back.
    store = CheckpointStore(spec["checkpoint_dir"], endpoint, work_dir=str(tmp_path / "fresh-pod"))
    store.download()
    assert store.latest().name == "checkpoint-75"
    assert (store.latest() / "trainer_state.json").is_file()
    assert store.read_run_id() == result["mlflow_run_id"]
    store.remove()
    assert not fs.exists("trainyard/checkpoints/run-1")


@pytest.mark.slow
def test_torchrun_with_two_processes_logs_one_run_from_rank_zero(tmp_path, tiny_model, splits):
    """The multi-GPU path (gpus > 1 runs torchrun) on CPU: two gloo ranks, one MLflow run."""
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]), max_steps=12)
    spec["hyperparameters"]["checkpoint_every_steps"] = 5
    torchrun = str(Path(sys.executable).parent / "torchrun")
    argv = [torchrun, "--standalone", "--nproc_per_node=2", *trainer_command(spec)[1:]]
    env = child_env(tmp_path)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    result = result_of(proc)
    assert "[rank 0]" in proc.stderr
    client = mlflow_client(spec)
    experiment = client.get_experiment_by_name("tweet-sentiment")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result["mlflow_run_id"] and run.info.status == "FINISHED"
    assert result["global_step"] == 12
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


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
    from trainyard.validate.data_checks import validate_dataset

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


def test_compute_metrics_on_a_known_confusion_matrix():
    """The promotion metric itself: macro F1 counts every class, including one never predicted."""
    import numpy as np

    from trainer.train import compute_metrics

    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 0, 1, 1])  # class 2 never predicted
    logits = np.eye(3)[predicted]
    metrics = compute_metrics((logits, labels))
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    f1 = [2 * 2 / (2 * 2 + 1), 2 * 1 / (2 * 1 + 3), 0.0]  # per class: 2tp / (2tp + fp + fn)
    assert metrics["f1_macro"] == pytest.approx(sum(f1) / 3)


def test_precision_auto_never_picks_emulated_bf16(monkeypatch):
    """No GPU exists here, so the CUDA capability probes are faked; the branching under test is ours."""
    import torch

    from trainer.errors import TrainerInputError
    from trainer.train import resolve_precision

    native = {"value": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or native["value"],
    )
    assert resolve_precision("auto") == "fp16", "a V100 emulates bf16: use fp16"
    with pytest.raises(TrainerInputError, match="does not support bf16"):
        resolve_precision("bf16")
    native["value"] = True
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("bf16") == "fp32", "no GPU: fp32 with a warning"


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


def test_sigterm_after_the_run_is_complete_does_not_undo_it():
    """Recording FINISHED and removing checkpoints run shielded: SIGTERM is remembered, not raised."""
    from trainer.errors import Terminated
    from trainer.preemption import Preemption

    previous = signal.getsignal(signal.SIGTERM)
    preemption = Preemption()
    preemption.install()
    try:
        with preemption.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert preemption.requested
        with pytest.raises(Terminated):  # outside any shield, SIGTERM stops the process at once
            preemption.check()
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- long documents: truncation at inference, and no work lost to a failure after training ----------

#: A position limit far below the texts (~1,000 words) and below ``model.max_length`` (256).
SHORT_POSITIONS = 64


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert-64"), max_position_embeddings=SHORT_POSITIONS)


@pytest.fixture(scope="session")
def long_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_long_splits(tmp_path_factory.mktemp("long-data"), train_rows=160, validation_rows=40)


def long_spec(tmp_path: Path, model: Path, splits: tuple[Path, Path], **hyperparameters) -> dict:
    spec = make_spec(tmp_path, str(model), str(splits[0]), str(splits[1]), **hyperparameters)
    spec["model"]["max_length"] = 256  # beyond the position limit: the trainer uses 64
    spec["validation_report"] = None  # make_spec's stand-in is not a report `trainyard summary` reads
    return spec


PROGRESS_LINE = re.compile(r"step \d+/\d+ +epoch")


@pytest.mark.slow
def test_logged_model_truncates_texts_far_beyond_the_position_limit(tmp_path, tiny_model_64, long_splits):
    spec = long_spec(tmp_path, tiny_model_64, long_splits, max_steps=4)
    proc = run_trainer(spec, child_env(tmp_path))
    result = result_of(proc)
    assert "model.max_length 256 exceeds what" in proc.stderr and "truncating to 64 tokens" in proc.stderr

    import mlflow

    mlflow_client(spec)
    model = mlflow.pyfunc.load_model(result["model_uri"])
    assert model.metadata.flavors["python_function"]["config"] == {"max_length": SHORT_POSITIONS}
    article = " ".join(["The film was wonderful, and the team loved it."] * 250)  # 2,250 words
    texts = [article, unpunctuated_text(2000), "42", "None", "[1, 2]"]
    predictions = model.predict(texts)
    assert len(predictions) == len(texts)
    assert set(predictions["label"]) <= {"negative", "positive"}
    assert predictions["score"].between(0, 1).all()
    assert list(model.predict(article)["label"]) == [predictions["label"][0]], "a bare string is one text"
    # The signature was inferred by the same truncating classifier, on validation texts of ~1,000 words.
    assert [c.type.name for c in model.metadata.get_input_schema().inputs] == ["string"]
    assert model.metadata.get_output_schema().input_names() == ["label", "score"]
    # Loaded with plain transformers, the saved tokenizer carries the trained length too.
    from transformers import AutoTokenizer

    logged = mlflow.get_logged_model(result["model_uri"].removeprefix("models:/"))
    tokenizer = AutoTokenizer.from_pretrained(Path(logged.artifact_location) / "artifacts" / "hf_model")
    assert tokenizer.model_max_length == SHORT_POSITIONS


def block_model_artifacts(artifact_location: Path) -> Path:
    """The failure injected after training: a regular file where MLflow 3 puts logged models
    (``<experiment artifact location>/models/``), so ``log_model`` really fails writing there
    (``NotADirectoryError``/``FileExistsError``) while the run's own artifacts still work."""
    artifact_location.mkdir(parents=True, exist_ok=True)
    blocker = artifact_location / "models"
    blocker.write_text("not a directory: logging a model here fails\n")
    return blocker


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_failure_after_training_is_retried_without_training_again(
    tmp_path, tiny_model_64, long_splits, storage, request
):
    """13 steps, a checkpoint every 5: the final step is no multiple of it and must still be kept."""
    spec = long_spec(tmp_path, tiny_model_64, long_splits, max_steps=13, checkpoint_every_steps=5)
    env = child_env(tmp_path)
    if storage == "s3":
        server = request.getfixturevalue("s3")
        endpoint, credentials = server.endpoint, dict(CREDENTIALS)
        spec.update(s3_endpoint_url=endpoint, checkpoint_dir="s3://trainyard/checkpoints/run-1")
        env = child_env(tmp_path, TRAINYARD_SCRATCH=str(tmp_path / "pod-1"), **credentials)
    blocker = block_model_artifacts(Path(spec["mlflow"]["artifact_location"]))

    first = run_trainer(spec, env)
    assert first.returncode == 1, first.stderr[-4000:]
    assert "Training complete at step 13; final checkpoint checkpoint-13" in first.stderr
    assert "Failed in model logging after training completed at step 13" in first.stderr
    client = mlflow_client(spec)
    (run,) = client.search_runs([client.get_experiment_by_name("tweet-sentiment").experiment_id])
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["trainyard.error_stage"] == "model logging"
    assert tags["trainyard.exit_code"] == "1"
    assert tags["trainyard.checkpoint_step"] == "13"
    error = tags["trainyard.error"]
    assert re.match(r"(NotADirectoryError|FileExistsError|OSError|MlflowException): ", error), error
    assert "eval_accuracy" in run.data.metrics, "evaluation ran before logging failed"
    trained_loss_points = len(client.get_metric_history(run.info.run_id, "loss"))
    if storage == "s3":
        import fsspec

        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": spec["s3_endpoint_url"]})
        assert fs.exists("trainyard/checkpoints/run-1/checkpoint-13/trainer_state.json"), "uploaded"
    else:
        assert (tmp_path / "checkpoints" / "checkpoint-13" / "trainer_state.json").is_file()

    summary = summary_of(spec)
    assert f"MLflow run: {run.info.run_id} (FAILED)" in summary
    assert f"Failed in model logging (trainer exit code 1): {error}" in summary
    assert "does not train again" in summary and "(step 13)" in summary
    assert "Full traceback: the Airflow log of task train (try 1)" in summary

    blocker.unlink()  # the cause is fixed; Airflow retries the task: same spec, next try
    spec["identity"]["try_number"] = 2
    if storage == "s3":  # a relaunched pod: nothing on local disk, the checkpoint comes from S3
        env["TRAINYARD_SCRATCH"] = str(tmp_path / "pod-2")
    second = run_trainer(spec, env)
    result = result_of(second)
    assert "Training already complete at step 13" in second.stderr
    assert not PROGRESS_LINE.search(second.stderr), "the retry did not train"
    assert "The previous attempt of this run failed in model logging" in second.stderr
    assert result["mlflow_run_id"] == run.info.run_id
    assert result["resumed_from_step"] == result["global_step"] == 13

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainyard.resumed_from_step"] == "13"
    assert run.data.tags["airflow.try_number"] == "2"
    assert not any(k in run.data.tags for k in ("trainyard.error", "trainyard.error_stage")), "cleared"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == trained_loss_points
    assert len(client.get_metric_history(run.info.run_id, "train_runtime")) == 1, "trained once"
    assert run.data.tags["trainyard.model_uri"] == result["model_uri"]

    import mlflow

    version = mlflow.register_model(result["model_uri"], "tweet-sentiment")
    assert version.run_id == run.info.run_id
    served = mlflow.pyfunc.load_model(f"models:/tweet-sentiment/{version.version}")
    assert len(served.predict([unpunctuated_text(3000)])) == 1


def summary_of(spec: dict) -> str:
    """``trainyard summary``'s text for the pipeline of ``spec``, read from its real MLflow store."""
    from types import SimpleNamespace

    from trainyard.cli.summary import latest_summary

    pipeline = SimpleNamespace(  # only what the summary reads of a ResolvedPipeline
        name=spec["identity"]["pipeline"],
        experiment_name=spec["mlflow"]["experiment_name"],
        registered_model_name=spec["identity"]["pipeline"],
        environment=SimpleNamespace(
            name="local", mlflow=SimpleNamespace(tracking_uri=spec["mlflow"]["tracking_uri"])
        ),
        config=SimpleNamespace(promotion=SimpleNamespace(alias="champion")),
    )
    return latest_summary(pipeline)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            {
                "trainyard.error_stage": "training",
                "trainyard.exit_code": "1",
                "trainyard.checkpoint_step": "40",
            },
            "the retry resumes from the checkpoint at step 40",
        ),
        ({"trainyard.error_stage": "training", "trainyard.exit_code": "1"}, "the retry starts afresh"),
        ({"trainyard.error_stage": "setup", "trainyard.exit_code": "1"}, "before training started"),
        (
            {"trainyard.error_stage": "setup", "trainyard.exit_code": "3"},
            "retrying the same run fails the same",
        ),
        (
            {
                "trainyard.error_stage": "training",
                "trainyard.exit_code": "143",
                "trainyard.checkpoint_step": "7",
            },
            "clear the train task; it resumes from the checkpoint at step 7",
        ),
        (
            {
                "trainyard.error_stage": "evaluation",
                "trainyard.exit_code": "1",
                "trainyard.checkpoint_step": "9",
            },
            "repeats only evaluation and what follows",
        ),
    ],
)
def test_summary_says_why_a_run_failed_and_what_to_do(tags, expected):
    from trainyard.cli.summary import failure_lines

    lines = failure_lines("FAILED", {"trainyard.error": "RuntimeError: boom", **tags})
    assert lines[0].startswith(f"Failed in {tags['trainyard.error_stage']} (trainer exit code ")
    assert lines[0].endswith(": RuntimeError: boom")
    assert expected in lines[1], lines
    assert failure_lines("FINISHED", {"trainyard.error": "stale"}) == []


def test_summary_names_a_known_cause_and_a_run_without_an_error_record():
    from trainyard.cli.summary import failure_lines

    oom = failure_lines(
        "FAILED", {"trainyard.error": "OutOfMemoryError: CUDA out of memory. Tried to allocate"}
    )
    assert any("lower training.batch_size" in line for line in oom)
    (line,) = failure_lines("FAILED", {})
    assert "recorded no error" in line and "OOMKilled" in line


def test_error_description_is_one_bounded_line():
    from trainer.errors import Terminated, TrainerInputError, describe, exit_code_for

    text = describe(RuntimeError("The size of tensor a (587)\n must match " + "x" * 5000), limit=80)
    assert (
        len(text) == 80
        and "\n" not in text
        and text.startswith("RuntimeError: The size of tensor a (587) must")
    )
    assert describe(Terminated()) == "Terminated"
    assert [
        exit_code_for(e) for e in (RuntimeError(), TrainerInputError(), Terminated(), KeyboardInterrupt())
    ] == [
        1,
        3,
        143,
        130,
    ]
