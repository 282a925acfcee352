"""Whether this DAG run's inputs are those of an earlier run, and the record of a run that skipped.

MLflow is the system of record: every training run carries its content key as a tag
(``trainyard.content_key``), so the champion's run and the pipeline's last successful run are
found and compared without any other state. A skipped DAG run still leaves an MLflow run (FINISHED,
tagged ``trainyard.outcome=skipped``, naming the run it repeats), so reports and summaries count it.
Every function takes the ``MlflowClient`` it works through.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trainer.spec import (
    OUTCOME_SKIPPED,
    TAG_CONTENT_KEY,
    TAG_ENVIRONMENT,
    TAG_OUTCOME,
    TAG_PIPELINE,
    TAG_RUN_ID,
    TAG_SKIP_REASON,
    TAG_SKIPPED_FOR,
    ChampionRef,
    RunIdentity,
    run_tags,
)
from trainyard.handoff import Unchanged
from trainyard.promote import registry

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

    from trainyard.config.loading import ResolvedPipeline

log = logging.getLogger(__name__)

#: How many of the newest FINISHED runs are read to find the last one that trained.
RECENT_RUNS = 50


def champion_ref(
    client: MlflowClient, pipeline: ResolvedPipeline
) -> tuple[ChampionRef | None, ModelVersion | None]:
    """The version holding the pipeline's alias (what the trainer re-scores), or (None, None)."""
    name = pipeline.registered_model_name
    version = registry.champion(client, name, pipeline.config.promotion.alias)
    if version is None:
        return None, None
    ref = ChampionRef(
        name=name,
        version=str(version.version),
        model_uri=version.source or f"models:/{name}/{version.version}",
        run_id=version.run_id or None,
    )
    return ref, version


def _get_run(client: MlflowClient, run_id: str | None) -> Run | None:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None  # a champion whose run was deleted cannot be repeated


def last_successful_run(client: MlflowClient, pipeline: ResolvedPipeline) -> Run | None:
    """The newest FINISHED run of this pipeline here that trained (skipped records do not count)."""
    experiment = client.get_experiment_by_name(pipeline.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"attributes.status = 'FINISHED' and tags.`{TAG_PIPELINE}` = '{pipeline.name}' "
            f"and tags.`{TAG_ENVIRONMENT}` = '{pipeline.environment.name}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=RECENT_RUNS,
    )
    return next((r for r in runs if r.data.tags.get(TAG_OUTCOME) != OUTCOME_SKIPPED), None)


def _registered_version(client: MlflowClient, pipeline: ResolvedPipeline, run_id: str) -> str | None:
    name = pipeline.registered_model_name
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    return min((str(v.version) for v in versions), key=int) if versions else None


def find_unchanged(
    client: MlflowClient, pipeline: ResolvedPipeline, key: str, champion: ModelVersion | None
) -> Unchanged | None:
    """The run this one would repeat: the champion's, or the last successful run's, with ``key``."""
    champion_run = _get_run(client, champion.run_id if champion is not None else None)
    if champion_run is not None and champion_run.data.tags.get(TAG_CONTENT_KEY) == key:
        return Unchanged(
            mlflow_run_id=champion_run.info.run_id,
            dag_run_id=champion_run.data.tags.get(TAG_RUN_ID),
            version=str(champion.version),  # type: ignore[union-attr]
            champion=True,
        )
    last = last_successful_run(client, pipeline)
    if last is not None and last.data.tags.get(TAG_CONTENT_KEY) == key:
        return Unchanged(
            mlflow_run_id=last.info.run_id,
            dag_run_id=last.data.tags.get(TAG_RUN_ID),
            version=_registered_version(client, pipeline, last.info.run_id),
        )
    return None


def record_skipped(
    client: MlflowClient,
    pipeline: ResolvedPipeline,
    *,
    dag_run_id: str,
    try_number: int,
    fingerprint: str,
    key: str,
    unchanged: Unchanged,
) -> str:
    """The MLflow run of a DAG run that trained nothing (one per DAG run: a retry reuses it)."""
    experiment = client.get_experiment_by_name(pipeline.experiment_name)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(
            pipeline.experiment_name, artifact_location=pipeline.environment.mlflow.artifact_location
        )
    )
    existing = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_OUTCOME}` = '{OUTCOME_SKIPPED}' and tags.`{TAG_PIPELINE}` = '{pipeline.name}'"
        ),
        max_results=RECENT_RUNS,
        order_by=["attributes.start_time DESC"],
    )
    for run in existing:
        if run.data.tags.get(TAG_RUN_ID) == dag_run_id:
            return run.info.run_id
    identity = RunIdentity(
        pipeline=pipeline.name,
        environment=pipeline.environment.name,
        dag_id=pipeline.name,
        run_id=dag_run_id,
        try_number=try_number,
    )
    tags = {
        **run_tags(identity, fingerprint, team=pipeline.config.team, content_key=key),
        TAG_OUTCOME: OUTCOME_SKIPPED,
        TAG_SKIPPED_FOR: unchanged.mlflow_run_id,
        TAG_SKIP_REASON: unchanged.reason,
        "mlflow.runName": f"skipped {dag_run_id}"[:250],
    }
    run = client.create_run(experiment_id, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("recorded skipped run %s (repeats %s)", run.info.run_id, unchanged.mlflow_run_id)
    return run.info.run_id
