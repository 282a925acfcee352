"""``trainer.checkpoints``: a SIGTERM'd run resumes exactly, and an ``s3://`` checkpoint root is mirrored."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

import pytest

from tests.support.s3 import CREDENTIALS
from tests.support.trainer_runs import (
    TIMEOUT_S,
    child_env,
    make_spec,
    mlflow_client,
    result_of,
    run_trainer,
    trainer_command,
    wait_for,
)
from trainer.storage import dataset_fingerprint


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


class GatedStore:
    """A stand-in for ``CheckpointStore`` whose upload waits for the test to let it finish: the
    callback's threading is under test here (real uploads to S3: the tests above)."""

    root = "s3://trainyard/checkpoints/run-1"

    def __init__(self, fail: bool = False) -> None:
        self.release = threading.Event()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.fail = fail

    def upload(self, checkpoint):
        self.started.append(checkpoint.name)
        assert self.release.wait(timeout=20)
        if self.fail:
            raise OSError("connection reset")
        self.finished.append(checkpoint.name)


def _save(callback, args, step: int) -> None:
    from transformers import TrainerControl, TrainerState

    callback.on_save(args, TrainerState(global_step=step), TrainerControl())


def test_checkpoints_upload_in_the_background_one_at_a_time(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainer.checkpoints import MirrorCallback

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    store = GatedStore()
    callback = MirrorCallback(store)
    _save(callback, args, 10)  # returns with the upload still running: training goes on
    deadline = time.monotonic() + 10
    while not store.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.started == ["checkpoint-10"] and store.finished == []

    second = threading.Thread(target=_save, args=(callback, args, 20))
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and store.started == ["checkpoint-10"], "the next save waits for it"
    store.release.set()
    second.join(timeout=10)
    callback.on_train_end(args, TrainerState(global_step=20), TrainerControl())  # waits for the last
    assert store.finished == ["checkpoint-10", "checkpoint-20"]


def test_a_failed_background_upload_fails_training_at_the_next_wait(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainer.checkpoints import MirrorCallback

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    store = GatedStore(fail=True)
    store.release.set()
    callback = MirrorCallback(store)
    _save(callback, args, 10)
    with pytest.raises(
        RuntimeError,
        match=r"Uploading a checkpoint to s3://trainyard/checkpoints/run-1 failed: connection reset",
    ):
        callback.on_train_end(args, TrainerState(global_step=10), TrainerControl())
