"""The MLflow side of promotion: the candidate run, its model version, the champion and the alias.

Every function takes the ``MlflowClient`` it works through and never builds one, so the operator
decides which tracking server is used and tests pass a client on a throwaway store. MLflow itself
is imported only inside functions, like everywhere in this package: Airflow imports task code
while parsing DAG files, which must stay cheap (see docs/architecture.md).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from trainer.spec import MODEL_ARTIFACT, TAG_DAG_ID, TAG_ENVIRONMENT, TAG_MODEL_URI, TAG_RUN_ID
from trainyard.promote.decision import PromotionRefused

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

    from trainyard.config.loading import ResolvedPipeline

log = logging.getLogger(__name__)


def _is(exc: Exception, *codes: str) -> bool:
    return getattr(exc, "error_code", None) in codes


def _quote(value: str) -> str | None:
    """A quoted literal for an MLflow filter string, or None when the value cannot be quoted."""
    if "'" not in value and "\\" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    return None


def runs_tagged(client: MlflowClient, experiment_id: str, wanted: Mapping[str, str]) -> list[Run]:
    """Every run of the experiment carrying all of ``wanted``'s tags, newest first, any status.

    Names from the pipeline/environment schemas are always quotable; an Airflow run id may not be,
    and is then matched here instead of in the filter.
    """
    clauses = [f"tags.`{k}` = {q}" for k, v in wanted.items() if (q := _quote(v)) is not None]
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=" and ".join(clauses),
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=page_token,
        )
        runs.extend(r for r in page if all(r.data.tags.get(k) == v for k, v in wanted.items()))
        page_token = page.token
        if not page_token:
            return runs


def find_candidate_run(client: MlflowClient, pipeline: ResolvedPipeline, dag_run_id: str) -> Run:
    """The newest FINISHED MLflow run tagged with this DAG run, or PromotionRefused."""
    experiment = client.get_experiment_by_name(pipeline.experiment_name)
    wanted = {
        TAG_DAG_ID: pipeline.name,
        TAG_RUN_ID: dag_run_id,
        TAG_ENVIRONMENT: pipeline.environment.name,
    }
    searched = ", ".join(f"{k}={v!r}" for k, v in wanted.items())
    if experiment is None:
        raise PromotionRefused(
            f"no MLflow experiment '{pipeline.experiment_name}' exists, so there is no run with "
            f"{searched} to promote (did train run against tracking URI "
            f"{pipeline.environment.mlflow.tracking_uri}?)"
        )
    runs = runs_tagged(client, experiment.experiment_id, wanted)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    where = f"experiment '{experiment.name}' (id {experiment.experiment_id})"
    if not finished:
        if runs:
            states = ", ".join(f"{r.info.run_id} ({r.info.status})" for r in runs)
            raise PromotionRefused(f"no FINISHED MLflow run with {searched} in {where}; found only: {states}")
        raise PromotionRefused(f"no MLflow run with {searched} in {where}; did train log its run?")
    finished.sort(key=lambda r: (r.info.end_time or 0, r.info.start_time or 0), reverse=True)
    if len(finished) > 1:
        log.warning(
            "%d FINISHED runs match %s; promoting the newest, %s (others: %s)",
            len(finished),
            searched,
            finished[0].info.run_id,
            ", ".join(r.info.run_id for r in finished[1:]),
        )
    return finished[0]


def _model_source(client: MlflowClient, run: Run) -> tuple[str, str | None]:
    """(source URI, logged-model id or None) of the run's model; refuses a run without one."""
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id
    uri = run.data.tags.get(TAG_MODEL_URI)
    if uri and uri.startswith("models:/") and "/" not in uri[len("models:/") :]:
        model_id = uri[len("models:/") :]
        try:
            model = client.get_logged_model(model_id)
        except MlflowException as exc:
            raise PromotionRefused(
                f"run {run_id} points {TAG_MODEL_URI} at {uri}, which cannot be read: {exc}"
            ) from None
        if model.source_run_id != run_id:
            raise PromotionRefused(
                f"run {run_id} points {TAG_MODEL_URI} at {uri}, which was logged by run {model.source_run_id}"
            )
        return uri, model_id
    if uri:
        return uri, None
    # No tag: the model logged under the contract's name by this very run.
    fallback = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    log.warning("run %s has no %s tag; looking for %s", run_id, TAG_MODEL_URI, fallback)
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'"
    )
    ready = [m for m in models if str(getattr(m.status, "name", m.status)) == "READY"]
    if ready:
        newest = max(ready, key=lambda m: m.creation_timestamp or 0)
        return f"models:/{newest.model_id}", newest.model_id
    if any(f.path.endswith("MLmodel") for f in client.list_artifacts(run_id, MODEL_ARTIFACT)):
        return f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}", None
    raise PromotionRefused(f"run {run_id} has no {TAG_MODEL_URI} tag and no model at {fallback}")


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
    try:
        client.create_registered_model(name, description="Registered by Trainyard's promote step.")
        log.info("created registered model %s", name)
    except MlflowException as exc:  # created concurrently
        if not _is(exc, "RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the duration, then restore it.

    MLflow's SQL registry store resolves a ``models:/<model_id>`` source through a fresh
    ``MlflowClient()``, i.e. the *global* tracking URI, not the injected client's (see the TODO in
    ``SqlAlchemyStore.create_model_version``). In an Airflow task nothing sets the global URI, so
    registering from a local SQLite store would look the logged model up in the wrong place.
    """
    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    previous = mlflow.get_tracking_uri()
    if previous == uri:
        yield
        return
    was_set, env_before = is_tracking_uri_set(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous if was_set else None)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def register_candidate(client: MlflowClient, name: str, run: Run) -> ModelVersion:
    """The model version of ``run`` under ``name``: the existing one if any (a retry), else a new one."""
    run_id = run.info.run_id
    source, model_id = _model_source(client, run)
    _ensure_registered_model(client, name)
    quoted = _quote(name)
    filter_string = f"name = {quoted} and run_id = '{run_id}'" if quoted else f"run_id = '{run_id}'"
    existing = [v for v in client.search_model_versions(filter_string) if v.name == name]
    if existing:
        version = min(existing, key=lambda v: int(v.version))
        log.info("reusing %s v%s, already registered for run %s", name, version.version, run_id)
        return version
    with _global_tracking_uri(client.tracking_uri):
        version = client.create_model_version(name, source, run_id=run_id, model_id=model_id)
    log.info("registered %s v%s from %s", name, version.version, source)
    return version


def champion(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``; None only when no version does (other errors propagate)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # The SQL store says INVALID_PARAMETER_VALUE "alias ... not found"; anything else is a real
        # error and must not be mistaken for "no champion" (which would promote any candidate).
        if _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
            _is(exc, "INVALID_PARAMETER_VALUE") and "not found" in str(exc.message)
        ):
            return None
        raise


def champion_value(client: MlflowClient, champion: ModelVersion, metric: str) -> float | None:
    """The champion's finite ``metric`` from the run it was registered from, or None."""
    from mlflow.exceptions import MlflowException

    if not champion.run_id:
        return None
    try:
        value = client.get_run(champion.run_id).data.metrics.get(metric)
    except MlflowException as exc:
        if _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise
    return None if value is None or not math.isfinite(value) else float(value)


def version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    """The tags on one model version (where the audit trail is read back from)."""
    return client.get_model_version(name, version).tags


def tag_version(
    client: MlflowClient,
    name: str,
    version: str,
    tags: Mapping[str, str],
    *,
    description: str | None = None,
) -> None:
    """Set ``tags`` on one model version, in order, then its description if one is given."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description is not None:
        client.update_model_version(name, version, description=description)


def move_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of the registered model ``name`` at ``version``: the promotion itself."""
    client.set_registered_model_alias(name, alias, version)
    log.info("moved alias '%s' of %s to v%s", alias, name, version)


def run_url(tracking_uri: str, run: Run) -> str | None:
    """The run's page in the MLflow UI; None for a local store (no UI is served from it)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def per_class(client: MlflowClient, run_id: str) -> dict | None:
    """The run's per-class metrics document (candidate and champion), or None when not logged."""
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    from trainer.spec import PER_CLASS_ARTIFACT

    with tempfile.TemporaryDirectory(prefix="trainyard-per-class-") as tmp:
        try:
            path = client.download_artifacts(run_id, PER_CLASS_ARTIFACT, tmp)
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (MlflowException, OSError, ValueError):
            return None
