"""``trainer.tracking``: the logged model, and how ``mlflow_run`` ends the MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.synthetic_data import unpunctuated_text
from tests.support.trainer_runs import (
    SHORT_POSITIONS,
    child_env,
    long_spec,
    make_spec,
    mlflow_client,
    result_of,
    run_trainer,
)
from trainer.checkpoints import TRAINER_STATE, CheckpointStore
from trainer.errors import Terminated, TrainerInputError, describe
from trainer.preemption import Preemption
from trainer.spec import (
    ERROR_TAGS,
    STAGE_EVALUATION,
    STAGE_SETUP,
    STAGE_TRAINING,
    TAG_CHECKPOINT_STEP,
    TAG_ERROR,
    TAG_ERROR_STAGE,
    TAG_EXIT_CODE,
    TAG_RESUMED_FROM_STEP,
    RunSpec,
)
from trainer.tracking import Tracker, mlflow_run


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


# -- mlflow_run: how the MLflow run of a training run ends (in-process, MLflow on a SQLite file) -----


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for these tests: each of them starts runs of its own in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def tracked(
    tmp_path: Path, tracking_uri: str | None, enabled: bool = True
) -> tuple[dict, Tracker, CheckpointStore]:
    """A tracker and checkpoint store for a spec whose data is never read."""
    spec = make_spec(tmp_path, "unused", "train.csv", "validation.csv", "sha256:" + "0" * 64)
    if tracking_uri:
        spec["mlflow"]["tracking_uri"] = tracking_uri
    run_spec = RunSpec.model_validate(spec)
    return spec, Tracker(run_spec, enabled=enabled), CheckpointStore(run_spec.checkpoint_dir)


def save_checkpoint(store: CheckpointStore, step: int) -> None:
    checkpoint = store.local_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"global_step": step, "max_steps": step}))


def test_mlflow_run_ends_finished_and_a_relaunch_continues_it(tmp_path, tracking_uri):
    spec, tracker, store = tracked(tmp_path, tracking_uri)
    with mlflow_run(tracker, store, None, Preemption()) as run:
        assert run.stage == STAGE_SETUP
        assert run.run_id is not None
        assert store.read_run_id() == run.run_id, "kept for a relaunch before the body runs"
    record = mlflow_client(spec).get_run(run.run_id)
    assert record.info.status == "FINISHED"
    assert not any(k in record.data.tags for k in ERROR_TAGS)

    _, relaunched, _ = tracked(tmp_path, tracking_uri)
    with mlflow_run(relaunched, store, 5, Preemption()) as again:
        pass
    assert again.run_id == run.run_id
    record = mlflow_client(spec).get_run(run.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.tags[TAG_RESUMED_FROM_STEP] == "5"


@pytest.mark.parametrize(
    ("error", "ending"),  # the run's status and the exit code recorded on it
    [
        (RuntimeError("boom"), ("FAILED", "1")),
        (TrainerInputError("bad labels"), ("FAILED", "3")),
        (Terminated("SIGTERM"), ("KILLED", "143")),
        (KeyboardInterrupt(), ("KILLED", "130")),
    ],
    ids=["error", "bad input", "sigterm", "ctrl-c"],
)
def test_mlflow_run_records_a_failure_after_training_and_lets_it_through(
    tmp_path, tracking_uri, caplog, error, ending
):
    status, exit_code = ending
    spec, tracker, store = tracked(tmp_path, tracking_uri)
    save_checkpoint(store, 7)
    with pytest.raises(type(error)) as raised, mlflow_run(tracker, store, None, Preemption()) as run:
        run.stage = STAGE_TRAINING
        run.trained_step = 7
        run.stage = STAGE_EVALUATION
        raise error
    assert raised.value is error, "the body's own exception, for __main__ to turn into the exit code"
    record = mlflow_client(spec).get_run(run.run_id)
    assert record.info.status == status
    tags = record.data.tags
    assert tags[TAG_ERROR] == describe(error)
    assert tags[TAG_ERROR_STAGE] == STAGE_EVALUATION
    assert tags[TAG_EXIT_CODE] == exit_code
    assert tags[TAG_CHECKPOINT_STEP] == "7"
    assert "Failed in evaluation after training completed at step 7" in caplog.text


def test_mlflow_run_failing_before_any_checkpoint_records_none(tmp_path, tracking_uri, caplog):
    spec, tracker, store = tracked(tmp_path, tracking_uri)
    with pytest.raises(RuntimeError), mlflow_run(tracker, store, None, Preemption()) as run:
        run.stage = STAGE_TRAINING
        raise RuntimeError("out of memory")
    tags = mlflow_client(spec).get_run(run.run_id).data.tags
    assert tags[TAG_ERROR_STAGE] == STAGE_TRAINING
    assert TAG_CHECKPOINT_STEP not in tags
    assert "after training completed" not in caplog.text


def test_a_tracking_error_while_recording_a_failure_does_not_hide_it(
    tmp_path, tracking_uri, caplog, monkeypatch
):
    import mlflow

    _, tracker, store = tracked(tmp_path, tracking_uri)

    def unreachable(*args):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(tracker, "record_failure", unreachable)
    try:
        with (
            pytest.raises(RuntimeError, match="the real cause"),
            mlflow_run(tracker, store, None, Preemption()),
        ):
            raise RuntimeError("the real cause")
        assert "Could not record the failure on the MLflow run" in caplog.text
    finally:
        mlflow.end_run()  # the run was left active by the failed recording


def test_mlflow_run_off_rank_zero_touches_no_mlflow_run(tmp_path):
    _, tracker, store = tracked(tmp_path, None, enabled=False)
    with mlflow_run(tracker, store, None, Preemption()) as run:
        pass
    assert run.run_id is None
    assert store.read_run_id() is None
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(RuntimeError), mlflow_run(tracker, store, None, Preemption()):
        raise RuntimeError("rank 1 failed")
    assert not (tmp_path / "mlflow.db").exists()
