"""The exact pod a ``train`` task would create, without a cluster (``trainyard render``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from trainyard.config.loading import ResolvedPipeline
from trainyard.validate.trigger_conf import validate_conf

#: Stands in for the fingerprint that validate_data computes at run time.
PLACEHOLDER_FINGERPRINT = "sha256:" + "0" * 64


def render_pod(
    pipeline: ResolvedPipeline,
    conf: dict[str, Any] | None = None,
    *,
    run_id: str = "manual__render",
    try_number: int = 1,
    fingerprint: str = PLACEHOLDER_FINGERPRINT,
) -> dict[str, Any]:
    """The camelCase pod manifest, after the same conf validation a triggered run gets."""
    from kubernetes.client import ApiClient

    from trainyard.dag import build_dag
    from trainyard.handoff import TRAIN_TASK, Approval

    if pipeline.environment.launcher != "kubernetes":
        raise ValueError(
            f"environment '{pipeline.environment.name}' runs the trainer as a local process, not a pod; "
            "render a kubernetes environment (e.g. --env dev)"
        )
    hyperparameters = validate_conf(pipeline, conf)
    dag = build_dag(pipeline)
    task = dag.get_task(TRAIN_TASK)
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=TRAIN_TASK, map_index=-1, try_number=try_number)
    context: Any = {"ti": ti, "run_id": run_id, "dag": dag, "dag_run": SimpleNamespace(run_id=run_id)}
    task.prepare_run(context, Approval(fingerprint=fingerprint, hyperparameters=hyperparameters))
    pod = task.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)
