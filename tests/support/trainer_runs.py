"""Running ``python -m trainer`` for real: the run spec, the child's environment, the result line.

Shared by the trainer's test modules; their fixtures (tiny models, data, S3) are in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from trainer.storage import dataset_fingerprint

TIMEOUT_S = 120


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


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"trainer exited early: {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


#: A position limit far below the texts (~1,000 words) and below ``model.max_length`` (256).
SHORT_POSITIONS = 64


def long_spec(tmp_path: Path, model: Path, splits: tuple[Path, Path], **hyperparameters) -> dict:
    spec = make_spec(tmp_path, str(model), str(splits[0]), str(splits[1]), **hyperparameters)
    spec["model"]["max_length"] = 256  # beyond the position limit: the trainer uses 64
    spec["validation_report"] = None  # make_spec's stand-in is not a report `trainyard summary` reads
    return spec
