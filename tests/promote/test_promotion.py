"""The promote step against a real MLflow (SQLite store + local artifacts in a temp dir)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from tests.support.registry import alias_holder
from trainyard.config.loading import ResolvedPipeline, load_environment, load_pipeline
from trainyard.config.pipeline_schema import Promotion
from trainyard.promote.promotion import PromotionRefused, decide, promote

FP = "sha256:" + "a" * 64
OTHER_FP = "sha256:" + "b" * 64
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# --------------------------------------------------------------------------- decide() (pure)


def rule(**kw: Any) -> Promotion:
    return Promotion(**kw)


class TestDecide:
    def test_no_champion_promotes(self):
        ok, reason = decide(rule(), 0.5, None)
        assert ok
        assert "no champion" in reason and "0.5" in reason

    def test_no_champion_but_below_must_reach(self):
        ok, reason = decide(rule(must_reach=0.7), 0.69, None)
        assert not ok
        assert "0.69" in reason and "0.7" in reason and "below" in reason

    def test_must_reach_is_inclusive(self):
        assert decide(rule(must_reach=0.7), 0.7, None)[0]

    def test_tie_keeps_champion(self):
        ok, reason = decide(rule(), 0.85, 0.85, champion_version="3")
        assert not ok
        assert "ties champion v3" in reason

    def test_tie_keeps_champion_for_min_direction(self):
        assert not decide(rule(metric="eval_loss"), 0.3, 0.3)[0]

    def test_better_by_enough(self):
        ok, reason = decide(rule(min_improvement=0.002), 0.861, 0.850, champion_version="3")
        assert ok
        assert reason == "eval_f1_macro 0.861 beats champion v3 (0.85) by 0.011 >= required 0.002"

    def test_better_but_not_by_enough(self):
        ok, reason = decide(rule(min_improvement=0.01), 0.855, 0.850, champion_version="3")
        assert not ok
        assert "by only 0.005 < required 0.01" in reason

    def test_improvement_exactly_at_margin_passes_despite_float_error(self):
        # 0.3 - 0.1 is 0.19999999999999998 in floats: without the tolerance this gain misses 0.2.
        ok, reason = decide(rule(min_improvement=0.2), 0.3, 0.1, champion_version="1")
        assert ok, reason
        assert reason == "eval_f1_macro 0.3 beats champion v1 (0.1) by 0.2 >= required 0.2"
        ok, reason = decide(rule(metric="eval_loss", min_improvement=0.2), 0.1, 0.3, champion_version="1")
        assert ok, reason
        assert reason == "eval_loss 0.1 improves on champion v1 (0.3) by 0.2 >= required 0.2"

    def test_the_float_tolerance_does_not_forgive_a_real_shortfall(self):
        ok, reason = decide(rule(min_improvement=0.2), 0.2999999, 0.1, champion_version="1")
        assert not ok
        assert "by only 0.2 < required 0.2" in reason, "a gain of 0.1999999 misses 0.2 (6 digits shown)"
        assert not decide(rule(metric="eval_loss", min_improvement=0.2), 0.1000001, 0.3)[0]

    def test_worse_rejected(self):
        ok, reason = decide(rule(), 0.80, 0.85, champion_version="2")
        assert not ok
        assert "worse than champion v2" in reason

    def test_min_direction_lower_wins(self):
        ok, reason = decide(rule(metric="eval_loss", min_improvement=0.01), 0.30, 0.35, champion_version="1")
        assert ok
        assert "improves on champion v1 (0.35) by 0.05" in reason
        assert not decide(rule(metric="eval_loss"), 0.36, 0.35)[0]

    def test_min_direction_must_reach_is_a_maximum(self):
        ok, reason = decide(rule(metric="eval_loss", must_reach=0.5), 0.6, None)
        assert not ok
        assert "above the allowed maximum 0.5" in reason
        assert decide(rule(metric="eval_loss", must_reach=0.5), 0.4, None)[0]

    def test_must_reach_applies_even_when_better_than_champion(self):
        assert not decide(rule(must_reach=0.9), 0.85, 0.80)[0]

    def test_champion_without_metric(self):
        ok, reason = decide(rule(must_reach=0.7), 0.8, None, champion_version="4", champion_has_metric=False)
        assert ok
        assert "champion v4 has no eval_f1_macro" in reason
        ok, reason = decide(rule(must_reach=0.7), 0.6, None, champion_version="4", champion_has_metric=False)
        assert not ok

    def test_nan_candidate_never_promoted(self):
        assert not decide(rule(), float("nan"), None)[0]
        assert not decide(rule(), float("nan"), 0.5)[0]

    def test_nan_champion_counts_as_missing_metric(self):
        ok, reason = decide(rule(), 0.5, float("nan"), champion_version="1")
        assert ok and "has no eval_f1_macro" in reason


def test_module_imports_without_mlflow():
    code = "import sys, trainyard.promote.promotion; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- promote() with real MLflow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    envs = root / "environments"
    envs.mkdir()
    (envs / "local.yaml").write_text(
        yaml.safe_dump(
            {
                "launcher": "local",
                "mlflow": {
                    "tracking_uri": uri,
                    "artifact_location": str(root / "artifacts"),
                    "experiment_name": "{pipeline}-{environment}",
                    "registered_model_name": "{team}.{pipeline}",
                },
                "storage": {"data_root": str(root), "models_root": str(root), "checkpoint_root": str(root)},
            }
        )
    )
    yield {"root": root, "uri": uri, "envs": envs, "client": MlflowClient(tracking_uri=uri)}
    mlflow.set_tracking_uri(previous)


class Env:
    """One pipeline (unique name) in the shared store, with helpers to log candidate runs."""

    def __init__(self, store: dict[str, Any], promotion: dict[str, Any]):
        self.client = store["client"]
        name = f"p-{uuid.uuid4().hex[:10]}"
        path = store["root"] / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "owner": "ml@example.com",
                    "team": "nlp",
                    "dataset": {
                        "train": "t/train.csv",
                        "validation": "t/validation.csv",
                        "label_names": ["negative", "positive"],
                    },
                    "model": {"base": "tiny-bert"},
                    "promotion": promotion,
                }
            )
        )
        env = load_environment("local", store["envs"])
        self.pipeline: ResolvedPipeline = load_pipeline(path, env, ["local"])
        self.experiment_id = self.client.create_experiment(
            self.pipeline.experiment_name, artifact_location=str(store["root"] / "artifacts" / name)
        )
        self.model_name = self.pipeline.registered_model_name

    def log_run(
        self,
        dag_run_id: str,
        metrics: dict[str, float],
        *,
        fingerprint: str | None = FP,
        status: str = "FINISHED",
        model_uri_tag: bool = True,
        environment: str | None = None,
    ) -> str:
        import mlflow

        tags = {
            "trainyard.pipeline": self.pipeline.name,
            "trainyard.environment": environment or self.pipeline.environment.name,
            "airflow.dag_id": self.pipeline.name,
            "airflow.run_id": dag_run_id,
            "airflow.try_number": "1",
        }
        if fingerprint is not None:
            tags["trainyard.dataset_fingerprint"] = fingerprint
        with mlflow.start_run(experiment_id=self.experiment_id, tags=tags) as run:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=tiny_model(), pip_requirements=["mlflow"]
            )
            if model_uri_tag:
                mlflow.set_tag("trainyard.model_uri", info.model_uri)
            mlflow.log_metrics(metrics)
        if status != "FINISHED":
            self.client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    def promote(self, dag_run_id: str, **kw: Any):
        kw.setdefault("approved_fingerprint", FP)
        kw.setdefault("now", NOW)
        return promote(self.client, self.pipeline, dag_run_id=dag_run_id, **kw)

    def versions(self) -> list[Any]:
        found = self.client.search_model_versions(f"name = '{self.model_name}'")
        return sorted(found, key=lambda v: int(v.version))

    def champion(self) -> str | None:
        return alias_holder(self.client, self.model_name)

    def tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(self.model_name, version).tags


@functools.cache
def _identity_class() -> type:
    from mlflow.pyfunc import PythonModel

    class Identity(PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    return Identity


def tiny_model() -> Any:
    """A real, tiny pyfunc model (logging it takes a few ms)."""
    return _identity_class()()


@pytest.fixture
def make_env(store):
    def factory(**promotion: Any) -> Env:
        return Env(store, promotion)

    return factory


def test_first_model_becomes_champion(make_env):
    env = make_env(metric="eval_f1_macro", must_reach=0.7, min_improvement=0.002)
    run_id = env.log_run("manual__1", {"eval_f1_macro": 0.8, "eval_accuracy": 0.81, "eval_loss": 0.4})

    d = env.promote("manual__1", triggered_by="alice")

    assert d.promoted and d.version == "1" and d.run_id == run_id
    assert d.champion_version is None and d.champion_value is None
    assert d.model_name == "nlp." + env.pipeline.name and d.alias == "champion"
    assert env.champion() == "1"
    tags = env.tags("1")
    assert tags["trainyard.decision"] == "promoted"
    assert tags["trainyard.champion_version"] == "none"
    assert tags["trainyard.candidate_value"] == "0.8"
    assert tags["trainyard.dataset_fingerprint"] == FP
    assert tags["airflow.dag_id"] == env.pipeline.name and tags["airflow.run_id"] == "manual__1"
    assert tags["trainyard.decided_at"] == "2026-01-02T03:04:05+00:00"
    assert tags["trainyard.decided_by"] == f"airflow:{env.pipeline.name}/manual__1 triggered by alice"
    assert tags["trainyard.reason"] == d.reason
    version = env.client.get_model_version(env.model_name, "1")
    assert version.run_id == run_id
    assert version.description.startswith("Promoted to 'champion': no champion yet")
    assert d.to_dict()["promoted"] is True


def test_worse_model_leaves_alias_and_records_why(make_env):
    env = make_env(min_improvement=0.002)
    env.log_run("r1", {"eval_f1_macro": 0.85})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.84})

    d = env.promote("r2")

    assert not d.promoted and d.version == "2"
    assert d.champion_version == "1" and d.champion_value == pytest.approx(0.85)
    assert env.champion() == "1"
    tags = env.tags("2")
    assert tags["trainyard.decision"] == "rejected"
    assert (
        tags["trainyard.reason"] == "eval_f1_macro 0.84 is worse than champion v1 (0.85); "
        "higher is better and a tie keeps the champion"
    )
    assert tags["trainyard.champion_version"] == "1" and tags["trainyard.champion_value"] == "0.85"
    assert env.client.get_model_version(env.model_name, "2").description.startswith("Not promoted")
    assert "trainyard.superseded_by" not in env.tags("1")


def test_better_model_moves_alias_and_supersedes(make_env):
    env = make_env(min_improvement=0.002)
    env.log_run("r1", {"eval_f1_macro": 0.850})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.861})

    d = env.promote("r2")

    assert d.promoted and d.version == "2"
    assert d.reason == "eval_f1_macro 0.861 beats champion v1 (0.85) by 0.011 >= required 0.002"
    assert env.champion() == "2"
    assert env.tags("1")["trainyard.superseded_by"] == "2"
    assert env.tags("1")["trainyard.superseded_at"] == "2026-01-02T03:04:05+00:00"
    assert env.tags("2")["trainyard.decision"] == "promoted"


def test_a_champion_from_another_dataset_is_noted_in_the_audit(make_env):
    env = make_env(min_improvement=0.0)
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    other = "sha256:" + "e" * 64
    env.log_run("r2", {"eval_f1_macro": 0.82}, fingerprint=other)

    d = env.promote("r2", approved_fingerprint=other)

    assert d.promoted and d.champion_fingerprint == FP
    assert "the champion was evaluated on another dataset" in d.reason
    assert env.tags("2")["trainyard.champion_dataset_fingerprint"] == FP
    assert env.tags("1")["trainyard.champion_dataset_fingerprint"] == "none"


def test_below_must_reach_rejected(make_env):
    env = make_env(must_reach=0.7)
    env.log_run("r1", {"eval_f1_macro": 0.65})

    d = env.promote("r1")

    assert not d.promoted and d.version == "1"
    assert "below the required minimum 0.7" in d.reason
    assert env.champion() is None
    assert env.tags("1")["trainyard.decision"] == "rejected"


def test_improvement_below_margin_rejected(make_env):
    env = make_env(min_improvement=0.01)
    env.log_run("r1", {"eval_f1_macro": 0.850})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.855})

    d = env.promote("r2")

    assert not d.promoted
    assert "by only 0.005 < required 0.01" in d.reason
    assert env.champion() == "1"


def test_eval_loss_lower_is_better(make_env):
    env = make_env(metric="eval_loss", must_reach=0.5)
    env.log_run("r1", {"eval_loss": 0.40})
    assert env.promote("r1").promoted
    env.log_run("r2", {"eval_loss": 0.45})
    assert not env.promote("r2").promoted
    env.log_run("r3", {"eval_loss": 0.30})

    d = env.promote("r3")

    assert d.promoted and d.champion_version == "1"
    assert env.champion() == "3"
    assert env.tags("1")["trainyard.superseded_by"] == "3"


def test_mismatched_fingerprint_refused_and_nothing_registered(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.9}, fingerprint=OTHER_FP)

    with pytest.raises(PromotionRefused) as err:
        env.promote("r1")

    assert OTHER_FP in str(err.value) and FP in str(err.value)
    assert env.versions() == []


def test_missing_fingerprint_refused(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.9}, fingerprint=None)
    with pytest.raises(PromotionRefused, match=r"no trainyard\.dataset_fingerprint tag"):
        env.promote("r1")
    assert env.versions() == []


def test_missing_metric_refused(make_env):
    env = make_env(metric="eval_f1_macro")
    env.log_run("r1", {"eval_accuracy": 0.9, "eval_loss": 0.3})

    with pytest.raises(PromotionRefused) as err:
        env.promote("r1")

    assert "no metric 'eval_f1_macro'" in str(err.value)
    assert "eval_accuracy, eval_loss" in str(err.value)
    assert env.versions() == []


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

    with caplog.at_level("WARNING", logger="trainyard.promote.promotion"):
        d = env.promote("r1")

    assert d.run_id == newest and d.candidate_value == pytest.approx(0.8)
    assert "2 FINISHED runs match" in caplog.text


def test_retried_promote_is_idempotent(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.90})

    first = env.promote("r2")
    again = env.promote("r2")  # the task is retried after it had already moved the alias

    assert first.promoted and again.promoted
    assert first.version == again.version == "2"
    assert again.champion_version == "1" and again.reason == first.reason
    assert [str(v.version) for v in env.versions()] == ["1", "2"]
    assert env.champion() == "2"
    assert env.tags("2")["trainyard.decision"] == "promoted"


def test_retried_rejection_registers_once(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.70})
    assert not env.promote("r2").promoted
    assert not env.promote("r2").promoted
    assert [str(v.version) for v in env.versions()] == ["1", "2"]
    assert env.champion() == "1"


def test_retry_finishes_superseded_tag_after_crash(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.90})
    env.promote("r2")
    env.client.delete_model_version_tag(env.model_name, "1", "trainyard.superseded_by")  # crash before step 4

    env.promote("r2")

    assert env.tags("1")["trainyard.superseded_by"] == "2"


def test_champion_without_metric_replaced_only_past_must_reach(make_env):
    env = make_env(metric="eval_f1_macro", must_reach=0.7)
    env.log_run("r1", {"eval_f1_macro": 0.9})
    env.promote("r1")
    # Simulate a champion whose run lacks the metric (e.g. registered by hand from another run).
    import mlflow

    with mlflow.start_run(experiment_id=env.experiment_id) as bare:
        info = mlflow.pyfunc.log_model(name="model", python_model=tiny_model(), pip_requirements=["mlflow"])
    manual = env.client.create_model_version(env.model_name, info.model_uri, run_id=bare.info.run_id)
    env.client.set_registered_model_alias(env.model_name, "champion", manual.version)

    env.log_run("low", {"eval_f1_macro": 0.6})
    low = env.promote("low")
    env.log_run("ok", {"eval_f1_macro": 0.75})
    ok = env.promote("ok")

    assert not low.promoted and "below the required minimum" in low.reason
    assert ok.promoted and f"champion v{manual.version} has no eval_f1_macro" in ok.reason
    assert env.champion() == ok.version


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
