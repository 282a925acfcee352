"""One Airflow DAG per pipeline YAML, for the environment named by TRAINYARD_ENV.

A pipeline file that fails to load never hides the others: it becomes a paused placeholder DAG
whose docs and only task carry the error, so the owner sees it in the Airflow UI, and the error
is also emitted as a warning (kept by the DAG processor with the file).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, BaseOperator, Context, Param
from airflow.sdk.exceptions import AirflowFailException

from trainyard import paths
from trainyard.config.environment_schema import EnvironmentConfig
from trainyard.config.errors import ConfigError
from trainyard.config.loading import ResolvedPipeline, load_environment, load_pipelines
from trainyard.config.parse_cache import ParseCache, default_cache_dir
from trainyard.handoff import PROMOTE_TASK, TRAIN_TASK, VALIDATE_TASK
from trainyard.loader_files import Shard, shard_of_loader
from trainyard.notify import run_failed_callback
from trainyard.promote.operator import PromoteOperator
from trainyard.train.local import LocalTrainOperator
from trainyard.validate.operator import ValidateDataOperator
from trainyard.validate.trigger_conf import PARAM_SCHEMA_DIALECT, param_schemas

START_DATE = datetime(2024, 1, 1, tzinfo=UTC)
INVALID_TAG = "trainyard:invalid"
#: What a team's Airflow role may do on its own pipelines' DAGs (FAB's resource-based
#: ``access_control`` format): see them, pause and edit them, see and trigger their runs. Nothing on
#: any other DAG: FAB revokes every permission a DAG's access_control does not list (Admin keeps all).
TEAM_DAG_PERMISSIONS: dict[str, frozenset[str]] = {
    "DAGs": frozenset({"can_read", "can_edit"}),
    "DAG Runs": frozenset({"can_read", "can_create"}),
}
#: The DAG warns about the airflow.security.permissions *module* whenever access_control is set. We
#: do not use that module and access_control has no successor under the FAB auth manager; left
#: alone, the warning would be shown on every loader file in the UI.
_ACCESS_CONTROL_WARNING = "The airflow.security.permissions module is deprecated"


class TrainyardConfigWarning(UserWarning):
    """A pipeline file that could not be loaded; its DAG is replaced by a placeholder."""


class ConfigErrorOperator(BaseOperator):
    """The only task of a placeholder DAG: fails with the configuration error."""

    ui_color = "#fde8e8"

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def execute(self, context: Context) -> None:
        raise AirflowFailException(self.message)


def _doc_md(pipeline: ResolvedPipeline) -> str:
    cfg = pipeline.config
    data = pipeline.data_spec
    rule = cfg.promotion
    hp = cfg.training.model_dump()
    overridable = ", ".join(f"`{name}`" for name in cfg.overridable) or "none"
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hp.items())
    bound = "at least" if rule.direction == "max" else "at most"
    threshold = f", {bound} {rule.must_reach}" if rule.must_reach is not None else ""
    policy = rule.approval
    approval = (
        f"; a person approves first (within {policy.timeout_hours:g} h"
        + (f"; approvers: {', '.join(policy.approvers)}" if policy.approvers else "")
        + ")"
        if policy is not None and policy.required
        else ""
    )
    return f"""### {cfg.name}

{cfg.description}

* **Owner:** {cfg.owner} (team `{cfg.team}`) · **environment:** `{pipeline.environment.name}`
  · **schedule:** `{pipeline.schedule}`{" + on dataset update" if pipeline.on_dataset_update else ""}
  · **source:** `{pipeline.source.name}`
* **Data:** `{data.train_uri}` / `{data.validation_uri}` ({data.format}; text `{data.text_column}`,
  label `{data.label_column}`: {", ".join(data.label_names)})
* **Model:** `{pipeline.model_base}` (max {cfg.model.max_length} tokens)
* **Promotion:** `{rule.metric}` ({rule.direction}imise){threshold}, beating the champion by
  at least {rule.min_improvement}, both scored on the candidate's validation data (champion not
  scorable: `{rule.if_champion_unscorable}`); alias `{rule.alias}` on
  `{pipeline.registered_model_name}`{approval}
* **Overridable at trigger time:** {overridable}

| hyperparameter | value |
| --- | --- |
{rows}
"""


def access_control(pipeline: ResolvedPipeline) -> dict[str, dict[str, set[str]]] | None:
    """The DAG's ``access_control``: its team's role only; None where the environment has no teams.

    With teams declared the mapping is authoritative (FAB revokes what it does not list), so a team
    the environment does not declare gets ``{}``: no team role keeps rights on a DAG it does not own.
    """
    environment = pipeline.environment
    if not environment.teams:
        return None
    role = environment.team_airflow_role(pipeline.config.team)
    if role is None:
        return {}
    return {role: {resource: set(actions) for resource, actions in TEAM_DAG_PERMISSIONS.items()}}


def build_dag(pipeline: ResolvedPipeline) -> DAG:
    cfg = pipeline.config
    airflow = pipeline.environment.airflow
    params = {
        name: Param(**schema, **{"$schema": PARAM_SCHEMA_DIALECT})
        for name, schema in param_schemas(pipeline).items()
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _ACCESS_CONTROL_WARNING, DeprecationWarning)
        dag = DAG(
            dag_id=cfg.name,
            description=(cfg.description or f"Trainyard pipeline {cfg.name}")[:200],
            schedule=schedule(pipeline),
            start_date=START_DATE,
            catchup=False,
            max_active_runs=1,
            tags=["trainyard", f"team:{cfg.team}", f"env:{pipeline.environment.name}"],
            doc_md=_doc_md(pipeline),
            default_args={
                "owner": cfg.owner,
                "retries": airflow.retries,
                "retry_delay": timedelta(minutes=airflow.retry_delay_minutes),
                # A hung S3 or MLflow call must not hold the DAG's only active run forever.
                "execution_timeout": timedelta(minutes=airflow.task_timeout_minutes),
                # Mail / Slack after a task's last try; a notification never changes the outcome.
                **(
                    {"on_failure_callback": run_failed_callback(pipeline)}
                    if pipeline.environment.notifications
                    else {}
                ),
            },
            access_control=access_control(pipeline),
        )
    with dag:
        validate = ValidateDataOperator(task_id=VALIDATE_TASK, pipeline=pipeline)
        train = _train_operator(pipeline)
        promote = PromoteOperator(task_id=PROMOTE_TASK, pipeline=pipeline)
        validate >> train >> promote
        policy = cfg.promotion.approval
        if policy is not None and policy.required:
            from trainyard.promote.approval_operator import (
                APPROVE_TASK,
                MOVE_ALIAS_TASK,
                ApproveOperator,
                MoveAliasOperator,
            )

            approve = ApproveOperator(task_id=APPROVE_TASK, pipeline=pipeline)
            promote >> approve >> MoveAliasOperator(task_id=MOVE_ALIAS_TASK, pipeline=pipeline)
    # Set after the tasks exist: Airflow deep-copies a DAG's params into each operator once per
    # __init__ in its class hierarchy (seven copies here), which tasks never need, because the task
    # runner merges dag.params into the context itself (airflow.sdk.definitions.param.process_params).
    # Assigning them runs the same conversion and validation as the constructor, once.
    dag.params = params
    return dag


def schedule(pipeline: ResolvedPipeline) -> Any:
    """The DAG's schedule: the cron, and with ``on_dataset_update`` an asset event for any of the
    dataset's locations (from a producer DAG's outlet or ``POST /api/v2/assets/events``)."""
    if not pipeline.on_dataset_update:
        return pipeline.schedule
    from airflow.sdk import Asset, AssetAny, AssetOrTimeSchedule, CronTriggerTimetable

    assets = AssetAny(*(Asset(uri) for uri in pipeline.dataset_uris))
    if pipeline.schedule is None:
        return assets
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(pipeline.schedule, timezone="UTC"), assets=assets
    )


def _train_operator(pipeline: ResolvedPipeline) -> BaseOperator:
    timeout = timedelta(minutes=pipeline.environment.airflow.execution_timeout_minutes)
    if pipeline.environment.launcher == "local":
        return LocalTrainOperator(task_id=TRAIN_TASK, pipeline=pipeline, execution_timeout=timeout)
    from trainyard.train.pod_operator import KubernetesTrainOperator

    return KubernetesTrainOperator(task_id=TRAIN_TASK, pipeline=pipeline, execution_timeout=timeout)


def placeholder_dag_id(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem) or "unnamed"


def build_error_dag(error: ConfigError, environment: EnvironmentConfig) -> DAG:
    message = f"This pipeline file could not be loaded and will not run until it is fixed.\n\n{error}"
    # No access_control: the team of a file that does not load is not known. Roles that had this DAG
    # keep it (its owners see the error), and no role gains it; its only task fails.
    dag = DAG(
        dag_id=placeholder_dag_id(error.file),
        description=f"INVALID: {error.file.name}: {error.problems[0].render() if error.problems else ''}"[
            :200
        ],
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        is_paused_upon_creation=True,
        tags=["trainyard", INVALID_TAG, f"env:{environment.name}"],
        doc_md=f"### Invalid pipeline file `{error.file.name}`\n\n```\n{error}\n```\n\n"
        "Run `trainyard lint` to check every pipeline against every environment.",
    )
    with dag:
        ConfigErrorOperator(task_id="config_error", message=message)
    return dag


def build_dags(
    dags_folder: Path | None = None, environment: str | None = None, shard: Shard | None = None
) -> dict[str, DAG]:
    """{dag_id: DAG} for every pipeline file (of ``shard``); broken files become placeholders."""
    pipelines_dir = paths.pipelines_dir(dags_folder)
    environments_dir = paths.environments_dir(dags_folder)
    env = load_environment(environment, environments_dir)  # a broken environment is an import error
    good, errors = load_pipelines(
        env,
        pipelines_dir,
        environments_dir,
        select=shard.holds if shard is not None else None,
        cache=_parse_cache(pipelines_dir, shard),
    )
    dags: dict[str, DAG] = {}
    for pipeline in good:
        dags[pipeline.name] = build_dag(pipeline)
    for error in errors:
        warnings.warn(str(error), TrainyardConfigWarning, stacklevel=2)
        dag_id = placeholder_dag_id(error.file)
        if dag_id not in dags:
            dags[dag_id] = build_error_dag(error, env)
    return dags


def _parse_cache(pipelines_dir: Path, shard: Shard | None) -> ParseCache:
    """One cache file per (pipelines folder, slice): each loader file keeps only its own entries."""
    folder = hashlib.sha256(str(pipelines_dir.resolve()).encode()).hexdigest()[:12]
    part = f"{shard.index}-of-{shard.count}" if shard is not None else "all"
    return ParseCache(default_cache_dir() / f"pipelines-{folder}-{part}.json")


def build_loader_dags(loader_file: str) -> dict[str, DAG]:
    """The DAGs of the pipelines that hash to this loader file (see trainyard.loader_files)."""
    path = Path(loader_file)
    return build_dags(path.parent, shard=shard_of_loader(path))
