"""The registry adapter, observed through promote() on a real MLflow: which run is the candidate,
which model it registers, and that it works through the injected client only."""

from __future__ import annotations

import pytest
import yaml

from tests.support.mlflow_store import FP
from trainyard.config.loading import load_environment, load_pipeline
from trainyard.promote.promote import PromotionRefused, promote


def test_no_run_for_dag_run_refused(make_env):
    env = make_env()
    env.log_run("other-run", {"eval_f1_macro": 0.9})
    env.log_run("r1", {"eval_f1_macro": 0.9}, environment="prod")  # same DAG run id, other environment

    with pytest.raises(PromotionRefused) as err:
        env.promote("r1")

    message = str(err.value)
    assert "airflow.run_id='r1'" in message and f"airflow.dag_id='{env.pipeline.name}'" in message
    assert "trainyard.environment='local'" in message and env.pipeline.experiment_name in message
    assert env.versions() == []


def test_unfinished_run_refused(make_env):
    env = make_env()
    run_id = env.log_run("r1", {"eval_f1_macro": 0.9}, status="FAILED")
    with pytest.raises(PromotionRefused, match=f"found only: {run_id} \\(FAILED\\)"):
        env.promote("r1")
    assert env.versions() == []


def test_missing_experiment_refused(store):
    path = store["root"] / "no-experiment.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "no-experiment",
                "owner": "ml@example.com",
                "team": "nlp",
                "dataset": {"train": "a.csv", "validation": "b.csv", "label_names": ["a", "b"]},
                "model": {"base": "m"},
            }
        )
    )
    pipeline = load_pipeline(path, load_environment("local", store["envs"]), ["local"])
    with pytest.raises(PromotionRefused, match="no MLflow experiment 'no-experiment-local'"):
        promote(store["client"], pipeline, dag_run_id="r1", approved_fingerprint=FP)


def test_newest_finished_run_wins(make_env, caplog):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.7})
    newest = env.log_run("r1", {"eval_f1_macro": 0.8})

    with caplog.at_level("WARNING", logger="trainyard.promote.registry"):
        d = env.promote("r1")

    assert d.run_id == newest and d.candidate_value == pytest.approx(0.8)
    assert "2 FINISHED runs match" in caplog.text


def test_run_without_model_uri_tag_falls_back_to_logged_model(make_env):
    env = make_env()
    run_id = env.log_run("r1", {"eval_f1_macro": 0.9}, model_uri_tag=False)

    d = env.promote("r1")

    assert d.promoted
    version = env.client.get_model_version(env.model_name, d.version)
    assert version.run_id == run_id
    assert version.source.startswith("models:/m-")


def test_registers_through_the_injected_client_not_the_global_uri(make_env, tmp_path):
    import mlflow

    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.9})
    shared = mlflow.get_tracking_uri()
    elsewhere = f"file://{tmp_path}/elsewhere"
    mlflow.set_tracking_uri(elsewhere)  # what an Airflow worker has: not the pipeline's store
    try:
        d = env.promote("r1")
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(shared)
    assert d.promoted and env.champion() == "1"


def test_model_uri_of_another_run_refused(make_env):
    env = make_env()
    env.log_run("r0", {"eval_f1_macro": 0.9})
    foreign = env.client.search_runs([env.experiment_id])[0].data.tags["trainyard.model_uri"]
    run_id = env.log_run("r1", {"eval_f1_macro": 0.9}, model_uri_tag=False)
    env.client.set_tag(run_id, "trainyard.model_uri", foreign)

    with pytest.raises(PromotionRefused, match="which was logged by run"):
        env.promote("r1")
    assert env.versions() == []


def test_quote_in_dag_run_id(make_env):
    env = make_env()
    env.log_run("it's-manual", {"eval_f1_macro": 0.9})
    assert env.promote("it's-manual").promoted
