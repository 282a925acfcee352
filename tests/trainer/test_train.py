"""``trainer.train.run`` for real: a tiny BERT trains in a subprocess, MLflow on a SQLite file, no mocks."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.support.s3 import CREDENTIALS
from tests.support.synthetic_data import sentiment_rows, unpunctuated_text, write_csv
from tests.support.trainer_runs import (
    TIMEOUT_S,
    child_env,
    long_spec,
    make_spec,
    mlflow_client,
    result_of,
    run_trainer,
    trainer_command,
)
from trainer.spec import (
    CHAMPION_METRIC_PREFIX,
    CONFUSION_CANDIDATE_ARTIFACT,
    CONFUSION_CHAMPION_ARTIFACT,
    EVAL_METRICS,
    EVALUATION_ARTIFACT_DIR,
    MODEL_ARTIFACT,
    PER_CLASS_ARTIFACT,
    TAG_CHAMPION_SCORED_VERSION,
    TAG_CHAMPION_UNSCORABLE,
    RunSpec,
    run_tags,
)


@pytest.mark.slow
def test_trains_logs_to_mlflow_and_removes_checkpoints(tmp_path, tiny_model, splits):
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    proc = run_trainer(spec, child_env(tmp_path))
    result = result_of(proc)

    assert re.search(r"step \d+/75 .* loss [\d.]+ .* lr .* samples/s  \d+ tokens/s  ETA ", proc.stderr)
    assert "Speed: length-grouped batches, dynamic padding, attention sdpa, optimizer adamw_torch_fused" in (
        proc.stderr
    )
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
    assert params["group_by_length"] == "True" and params["speed.group_by_length"] == "True"
    assert params["speed.optimizer"] == "adamw_torch_fused"
    assert params["speed.eval_batch_size"] == "32", "twice the training batch"
    assert params["speed.dataloader_workers"] == "0" and params["speed.pin_memory"] == "False", "CPU"
    assert params["speed.world_size"] == "1"

    metrics = run.data.metrics
    for name in EVAL_METRICS:
        assert result["metrics"][name] == pytest.approx(metrics[name])
    assert 0.0 <= metrics["eval_f1_macro"] <= 1.0
    assert 0.8 <= metrics["eval_accuracy"] <= 1.0, "the synthetic data is learnable"
    assert metrics["eval_loss"] < 0.5, "well below log(2) = 0.69, the loss of a coin flip"
    assert {"train_runtime", "train_samples_per_second", "loss", "learning_rate"} <= set(metrics)
    assert metrics["train_tokens_per_second"] > 0
    assert 0.0 <= metrics["padding_fraction"] < 0.5, "length-grouped batches of the synthetic texts"
    assert "mfu" not in metrics and "train_mfu" not in metrics, "no MFU without a GPU's peak"
    assert len(client.get_metric_history(run.info.run_id, "tokens_per_second")) > 5
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


# -- no work lost to a failure after training ----------------------------------------------------


PROGRESS_LINE = re.compile(r"step \d+/\d+ +epoch")


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


# -- the champion, scored on the candidate's validation split -----------------------------------------


@dataclass(frozen=True)
class Champion:
    """A model an earlier trainer run logged and registered, in a store later runs log to."""

    mlflow: dict  # the spec's mlflow section: the shared store
    name: str
    version: str
    model_uri: str  # the logged model's URI (models:/m-...)
    run_id: str
    metrics: dict[str, float]  # its own run's evaluation, on `splits`' validation file

    def ref(self, model_uri: str | None = None) -> dict:
        uri = model_uri or f"models:/{self.name}/{self.version}"
        return {"name": self.name, "version": self.version, "model_uri": uri, "run_id": self.run_id}


@pytest.fixture(scope="session")
def champion(tmp_path_factory, tiny_model, splits) -> Champion:
    root = tmp_path_factory.mktemp("champion")
    spec = make_spec(root, str(tiny_model), str(splits[0]), str(splits[1]))
    trained = result_of(run_trainer(spec, child_env(root)))
    client = mlflow_client(spec)
    client.create_registered_model("tweet-sentiment")
    version = client.create_model_version(
        "tweet-sentiment",
        source=trained["model_uri"],
        run_id=trained["mlflow_run_id"],
        model_id=trained["model_uri"].removeprefix("models:/"),
    )
    return Champion(
        spec["mlflow"],
        "tweet-sentiment",
        str(version.version),
        trained["model_uri"],
        trained["mlflow_run_id"],
        trained["metrics"],
    )


def candidate_spec(tmp_path: Path, champion: Champion, model: Path, train: Path, validation: Path) -> dict:
    """A short candidate run (its own quality is beside the point) in the champion's store."""
    spec = make_spec(tmp_path, str(model), str(train), str(validation), max_steps=3)
    spec["mlflow"] = champion.mlflow
    spec["identity"]["run_id"] = f"manual__{tmp_path.name}"
    spec["champion"] = champion.ref()
    return spec


def champion_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix(CHAMPION_METRIC_PREFIX): v for k, v in metrics.items() if k in CHAMPION_METRICS}


CHAMPION_METRICS = {CHAMPION_METRIC_PREFIX + name for name in EVAL_METRICS}


def evaluation_artifacts(client, run_id: str, directory: Path) -> tuple[set[str], dict]:
    paths = {a.path for a in client.list_artifacts(run_id, EVALUATION_ARTIFACT_DIR)}
    local = Path(client.download_artifacts(run_id, PER_CLASS_ARTIFACT, str(directory)))
    return paths, json.loads(local.read_text())


@pytest.mark.slow
@pytest.mark.extended
def test_the_champion_scored_on_the_same_validation_split_matches_its_own_evaluation(
    tmp_path, tiny_model, splits, champion
):
    """Like for like: same data, same code, so the champion's own eval metrics come out again."""
    spec = candidate_spec(tmp_path, champion, tiny_model, *splits)
    result = result_of(run_trainer(spec, child_env(tmp_path)))

    client = mlflow_client(spec)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_CHAMPION_SCORED_VERSION] == champion.version
    assert TAG_CHAMPION_UNSCORABLE not in run.data.tags
    assert champion_metrics(run.data.metrics) == pytest.approx(champion.metrics, abs=1e-5)
    assert result["champion"]["version"] == champion.version
    assert result["champion"]["metrics"] == pytest.approx(champion.metrics, abs=1e-5)
    final_step = result["global_step"]
    history = client.get_metric_history(run.info.run_id, "champion_eval_f1_macro")
    assert [m.step for m in history] == [final_step]

    paths, report = evaluation_artifacts(client, run.info.run_id, tmp_path / "downloaded")
    assert paths == {PER_CLASS_ARTIFACT, CONFUSION_CANDIDATE_ARTIFACT, CONFUSION_CHAMPION_ARTIFACT}
    assert report["labels"] == ["negative", "positive"]
    assert report["champion_version"] == champion.version
    assert report["dataset_fingerprint"] == spec["dataset_fingerprint"]
    for model, f1_macro in (
        ("candidate", result["metrics"]["eval_f1_macro"]),
        ("champion", champion.metrics["eval_f1_macro"]),
    ):
        per_class = report[model]
        assert sum(stats["support"] for stats in per_class.values()) == 100
        assert np.mean([stats["f1"] for stats in per_class.values()]) == pytest.approx(f1_macro, abs=1e-5)
    assert run.data.metrics["eval_f1.positive"] == pytest.approx(report["candidate"]["positive"]["f1"])
    assert run.data.metrics["champion_eval_recall.negative"] == pytest.approx(
        report["champion"]["negative"]["recall"]
    )


def write_noisy_validation(directory: Path) -> Path:
    """New validation texts, a fifth of them labelled against their sentiment words: no model that
    learned the sentiment words scores as on the original split."""
    rows = sentiment_rows(100, seed=3, prefix="w")
    for row in rows[::5]:
        row["label"] = "negative" if row["label"] == "positive" else "positive"
    return write_csv(directory / "validation-noisy.csv", rows)


@pytest.mark.slow
@pytest.mark.extended
def test_on_a_changed_validation_split_the_champion_is_scored_on_the_new_one(
    tmp_path, tiny_model, splits, champion
):
    validation = write_noisy_validation(tmp_path)
    spec = candidate_spec(tmp_path, champion, tiny_model, splits[0], validation)
    spec["champion"] = champion.ref(champion.model_uri)  # the logged model's URI works as well
    result = result_of(run_trainer(spec, child_env(tmp_path)))

    run = mlflow_client(spec).get_run(result["mlflow_run_id"])
    scored = champion_metrics(run.data.metrics)
    assert scored == pytest.approx(result["champion"]["metrics"])
    assert scored["eval_accuracy"] < champion.metrics["eval_accuracy"] - 0.1
    assert scored["eval_loss"] > champion.metrics["eval_loss"] + 0.1
    assert scored != pytest.approx(champion.metrics, abs=1e-3)

    import mlflow

    # The served champion (its pyfunc, another code path) agrees on the new split's accuracy.
    served = mlflow.pyfunc.load_model(champion.model_uri)
    with validation.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    texts, labels = [row["text"] for row in rows], [row["label"] for row in rows]
    predicted = list(served.predict(texts)["label"])
    assert scored["eval_accuracy"] == pytest.approx(np.mean(np.array(predicted) == np.array(labels)))


@pytest.mark.slow
@pytest.mark.extended
def test_a_champion_with_the_labels_in_another_order_is_scored_by_class_name(
    tmp_path, tiny_model, splits, champion
):
    """The champion's class 0 is "negative", this run's is "positive": columns are remapped."""
    spec = candidate_spec(tmp_path, champion, tiny_model, *splits)
    spec["data"]["label_names"] = ["positive", "negative"]
    spec["champion"] = champion.ref(f"runs:/{champion.run_id}/model")
    result = result_of(run_trainer(spec, child_env(tmp_path)))

    run = mlflow_client(spec).get_run(result["mlflow_run_id"])
    assert run.data.tags[TAG_CHAMPION_SCORED_VERSION] == champion.version
    assert champion_metrics(run.data.metrics) == pytest.approx(champion.metrics, abs=1e-5)


@pytest.mark.slow
@pytest.mark.extended
def test_a_champion_with_other_labels_is_unscorable_and_the_run_still_finishes(
    tmp_path, tiny_model, splits, champion
):
    spec = candidate_spec(tmp_path, champion, tiny_model, *splits)
    spec["data"]["label_names"] = ["negative", "positive", "neutral"]
    proc = run_trainer(spec, child_env(tmp_path))
    result = result_of(proc)

    reason = (
        f"champion v{champion.version} predicts labels [negative, positive], "
        "this run's labels are [negative, positive, neutral]"
    )
    assert reason in proc.stderr and "WARNING" in proc.stderr
    client = mlflow_client(spec)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_CHAMPION_UNSCORABLE] == reason
    assert TAG_CHAMPION_SCORED_VERSION not in run.data.tags
    assert not [k for k in run.data.metrics if k.startswith(CHAMPION_METRIC_PREFIX)]
    assert result["champion"] == {"version": champion.version, "unscorable": reason}
    assert result["model_uri"] and run.data.tags["trainyard.model_uri"] == result["model_uri"]

    paths, report = evaluation_artifacts(client, run.info.run_id, tmp_path / "downloaded")
    assert paths == {PER_CLASS_ARTIFACT, CONFUSION_CANDIDATE_ARTIFACT}
    assert report["champion"] is None and report["champion_version"] is None
    assert report["champion_unscorable"] == reason
    assert set(report["candidate"]) == {"negative", "positive", "neutral"}


def test_a_champion_that_cannot_be_downloaded_is_unscorable(tmp_path):
    """No training needed: the download fails first, against a real (empty) MLflow store."""
    from trainer.scoring import score_champion
    from trainer.train import compute_metrics

    spec = make_spec(
        tmp_path, "unused-model", "train.csv", "validation.csv", fingerprint="sha256:" + "0" * 64
    )
    spec["champion"] = {"name": "tweet-sentiment", "version": "7", "model_uri": "models:/tweet-sentiment/7"}
    mlflow_client(spec)  # the store exists, the version does not
    scored = score_champion(
        RunSpec.model_validate(spec), None, compute_metrics, batch_size=8, device=None, precision="fp32"
    )
    assert scored.predictions is None
    assert scored.unscorable.startswith(
        "champion v7 could not be downloaded from models:/tweet-sentiment/7: "
    ), scored.unscorable


@pytest.mark.slow
@pytest.mark.extended
def test_with_two_processes_rank_zero_alone_scores_the_champion(tmp_path, tiny_model, splits, champion):
    """The other rank does not wait in a collective for a scoring it takes no part in."""
    spec = candidate_spec(tmp_path, champion, tiny_model, *splits)
    launcher = [sys.executable, "-m", "trainer.launcher", "--nproc-per-node=2", "--shutdown-timeout=30", "--"]
    argv = [*launcher, *trainer_command(spec)[3:]]  # what a pod with 2 GPUs runs
    proc = subprocess.run(
        argv, env=child_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    result = result_of(proc)
    assert proc.stderr.count("Scoring champion") == 1
    run = mlflow_client(spec).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert champion_metrics(run.data.metrics) == pytest.approx(champion.metrics, abs=1e-5)


@pytest.mark.slow
@pytest.mark.extended
def test_a_retry_after_training_scores_the_champion_again(tmp_path, tiny_model, splits, champion):
    """Model logging fails after the champion was scored; the retry (training complete) scores it
    again and ends FINISHED with the one scored tag."""
    spec = candidate_spec(tmp_path, champion, tiny_model, *splits)
    # Its own experiment, so the blocked model folder is not the champion's.
    spec["mlflow"] = {
        **champion.mlflow,
        "experiment_name": "retry",
        "artifact_location": str(tmp_path / "art"),
    }
    blocker = block_model_artifacts(tmp_path / "art")
    env = child_env(tmp_path)
    first = run_trainer(spec, env)
    assert first.returncode == 1, first.stderr[-4000:]
    client = mlflow_client(spec)
    (run,) = client.search_runs([client.get_experiment_by_name("retry").experiment_id])
    assert run.data.tags["trainyard.error_stage"] == "model logging"
    assert run.data.tags[TAG_CHAMPION_SCORED_VERSION] == champion.version

    blocker.unlink()
    spec["identity"]["try_number"] = 2
    second = run_trainer(spec, env)
    result = result_of(second)
    assert "Training already complete" in second.stderr and "Scoring champion" in second.stderr
    assert result["champion"]["metrics"] == pytest.approx(champion.metrics, abs=1e-5)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_CHAMPION_SCORED_VERSION] == champion.version
    assert TAG_CHAMPION_UNSCORABLE not in run.data.tags
    history = client.get_metric_history(run.info.run_id, "champion_eval_loss")
    assert [m.step for m in history] == [result["global_step"]] * 2, "scored on each attempt"
