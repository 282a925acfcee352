"""The local launcher: the trainer's output streams into the task log, failures carry its last lines,
and the child gets only what it needs from the Airflow worker's environment."""

from __future__ import annotations

import json
import logging
import signal

import pytest

from trainyard.train.launch import LaunchSpec, LocalTrainer, TrainerFailed

PRINT_ENV = (
    "import json, os, sys\n"
    "print('step 1/2 loss 0.7', file=sys.stderr, flush=True)\n"
    "print(json.dumps({'trainyard_result': {'env': sorted(os.environ)}}))\n"
)


def test_output_streams_and_the_result_line_is_returned(monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "fernet-secret")
    monkeypatch.setenv("AIRFLOW_CONN_METADATA", "postgres://user:pw@db/airflow")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "for-s3")
    log = logging.getLogger("test.launch")
    with caplog.at_level(logging.INFO, logger="test.launch"):
        result = LocalTrainer(LaunchSpec(("python", "-c", PRINT_ENV), {"TRAINYARD_ENV": "local"}), log).run()
    assert "step 1/2 loss 0.7" in caplog.text, "trainer output reaches the task log"
    env = set(result["env"])
    assert {"AWS_ACCESS_KEY_ID", "TRAINYARD_ENV", "PATH"} <= env
    assert not any(name.startswith("AIRFLOW") for name in env), "Airflow's secrets stay with Airflow"


@pytest.mark.parametrize(
    ("code", "exit_code", "message"),
    [
        (
            "import sys; print('model.base /x: not a model directory', file=sys.stderr); sys.exit(3)",
            3,
            "Training failed: the trainer exited with code 3. Last trainer output:\n"
            "    model.base /x: not a model directory",
        ),
        (
            "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
            -signal.SIGTERM,
            "Training failed: the trainer was interrupted (SIGTERM); it saved a checkpoint and a retry "
            "resumes from it. Last trainer output:\n",
        ),
        (
            "print('no result')",
            0,
            "Training failed: the trainer exited with code 0. Last trainer output:\n"
            "    no result\n"
            "    (no 'trainyard_result' line was printed)",
        ),
    ],
    ids=["exit-3", "sigterm", "no-result-line"],
)
def test_a_failing_trainer_names_the_cause_and_its_last_lines(code, exit_code, message):
    with pytest.raises(TrainerFailed) as info:
        LocalTrainer(LaunchSpec(("python", "-c", code)), logging.getLogger("test.launch")).run()
    assert info.value.exit_code == exit_code
    assert str(info.value) == message


def test_the_run_spec_is_one_argv_element_without_a_shell():
    from trainer.spec import RunSpec

    spec = RunSpec.model_validate(
        {
            "identity": {"pipeline": "p", "environment": "local", "dag_id": "p", "run_id": "r; rm -rf /"},
            "data": {
                "train_uri": "/d/t.csv",
                "validation_uri": "/d/v.csv",
                "format": "csv",
                "text_column": "text",
                "label_column": "label",
                "label_names": ["a", "b"],
            },
            "dataset_fingerprint": "sha256:" + "0" * 64,
            "model": {"base": "/m"},
            "hyperparameters": {},
            "mlflow": {"tracking_uri": "sqlite:////tmp/x.db", "experiment_name": "p"},
            "checkpoint_dir": "/c",
        }
    )
    launch = LaunchSpec.for_run(spec)
    assert launch.argv[:4] == ("python", "-m", "trainer", "--spec")
    assert len(launch.argv) == 5
    assert json.loads(launch.argv[4])["identity"]["run_id"] == "r; rm -rf /"
