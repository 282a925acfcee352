"""A throwaway MLflow store (SQLite + local artifacts) with one pipeline per test, for promote tests.

Each :class:`Env` is a pipeline with a unique name in the shared store, so tests never see each
other's runs, versions or aliases; it logs real candidate runs with a real (tiny) pyfunc model.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tests.support.registry import alias_holder
from trainyard.config.loading import ResolvedPipeline, load_environment, load_pipeline
from trainyard.promote.decision import Decision
from trainyard.promote.promote import promote

FP = "sha256:" + "a" * 64
OTHER_FP = "sha256:" + "b" * 64
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def open_store(root: Path) -> Iterator[dict[str, Any]]:
    """The store under ``root`` and an environment ``local`` pointing at it; the global URI too."""
    import mlflow
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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
        champion_scores: dict[str, float] | str | None = "same data",
        unscorable: str | None = None,
    ) -> str:
        """A FINISHED (or ``status``) candidate run with ``metrics`` and a model.

        ``champion_scores`` are the trainer's re-score of the current champion on this run's data:
        by default the champion's own recorded metrics (the validation data did not change), a dict
        to say what the champion scored here, None for a run that scored no champion (then
        ``unscorable`` may say why).
        """
        import mlflow

        champion_tags: dict[str, str] = {}
        holder = self.champion()
        if champion_scores == "same data":
            champion_scores = None
            if holder is not None:
                champion_run = self.client.get_model_version(self.model_name, holder).run_id
                champion_scores = {
                    k: v
                    for k, v in self.client.get_run(champion_run).data.metrics.items()
                    if k.startswith("eval_")
                }
        if champion_scores is not None and holder is not None:
            champion_tags["trainyard.champion.version"] = holder
            metrics = {**metrics, **{f"champion_{k}": v for k, v in champion_scores.items()}}
        if unscorable is not None:
            champion_tags["trainyard.champion.unscorable"] = unscorable

        tags = {
            "trainyard.pipeline": self.pipeline.name,
            "trainyard.environment": environment or self.pipeline.environment.name,
            "airflow.dag_id": self.pipeline.name,
            "airflow.run_id": dag_run_id,
            "airflow.try_number": "1",
        }
        if fingerprint is not None:
            tags["trainyard.dataset_fingerprint"] = fingerprint
        tags.update(champion_tags)
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

    def promote(self, dag_run_id: str, **kw: Any) -> Decision:
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
