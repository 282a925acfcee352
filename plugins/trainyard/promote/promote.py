"""The ``promote`` step: register this DAG run's model and move the alias only if it beats the champion.

Promotion is where trust is earned: never promote a worse model, a model without the metric, or a
model trained on data other than the data ``validate_data`` approved; every decision leaves an audit
trail on the model version (who, what, when, why). This module refuses runs that are not eligible
and orders the steps; the rule is :mod:`~trainyard.promote.decision`, the MLflow I/O
:mod:`~trainyard.promote.registry` and the record :mod:`~trainyard.promote.audit`. Like them it
imports no MLflow at module level.

Order of writes in :func:`promote`, chosen so that a retried task converges:

1. register (or reuse) the candidate version for the run;
2. record the decision as tags + description on the candidate version;
3. move the alias (only when promoted);
4. tag the previous champion ``trainyard.superseded_by``.

A retry after a crash between 3 and 4 finds the candidate already holding the alias, reads the
previous champion from the audit written in 2, and finishes step 4.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from trainer.spec import (
    CHAMPION_METRIC_PREFIX,
    EVALUATION_ARTIFACT_DIR,
    TAG_CHAMPION_SCORED_VERSION,
    TAG_CHAMPION_UNSCORABLE,
    TAG_FINGERPRINT,
)
from trainyard.cost import cost_tags
from trainyard.promote import registry
from trainyard.promote.audit import NONE, Audit, Superseded, description
from trainyard.promote.decision import (
    Decision,
    PromotionRefused,
    decide,
    decide_against_champion,
    unscorable_reason,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from trainyard.config.loading import ResolvedPipeline

__all__ = ["Decision", "PromotionRefused", "promote"]

log = logging.getLogger(__name__)


def _check_run(run: Run, metric: str, approved_fingerprint: str) -> float:
    """The candidate's metric value, after the safety checks that would refuse the run."""
    run_id = run.info.run_id
    fingerprint = run.data.tags.get(TAG_FINGERPRINT)
    if fingerprint != approved_fingerprint:
        raise PromotionRefused(
            f"run {run_id} was trained on dataset {fingerprint or '<no ' + TAG_FINGERPRINT + ' tag>'}, "
            f"but validate_data approved {approved_fingerprint}; refusing to register it"
        )
    metrics = run.data.metrics
    if metric not in metrics:
        have = ", ".join(sorted(metrics)) or "none"
        raise PromotionRefused(
            f"run {run_id} has no metric '{metric}' (it has: {have}); refusing to register it"
        )
    value = float(metrics[metric])
    if not math.isfinite(value):
        raise PromotionRefused(f"run {run_id} has {metric} = {value}; refusing to register it")
    return value


def _rescored_value(run: Run, metric: str, champion_version: str) -> float | None:
    """The champion's ``metric`` as the trainer scored it on this run's validation split, if the
    version it scored is the one holding the alias now."""
    if run.data.tags.get(TAG_CHAMPION_SCORED_VERSION) != champion_version:
        return None
    value = run.data.metrics.get(CHAMPION_METRIC_PREFIX + metric)
    return None if value is None or not math.isfinite(value) else float(value)


def _evaluation_uri(client: MlflowClient, run: Run) -> str | None:
    """Where the run's per-class metrics and confusion matrices are, when it logged them."""
    from mlflow.exceptions import MlflowException

    try:
        logged = client.list_artifacts(run.info.run_id, EVALUATION_ARTIFACT_DIR)
    except (MlflowException, OSError):
        return None
    return f"runs:/{run.info.run_id}/{EVALUATION_ARTIFACT_DIR}" if logged else None


def promote(
    client: MlflowClient,
    pipeline: ResolvedPipeline,
    *,
    dag_run_id: str,
    approved_fingerprint: str,
    triggered_by: str | None = None,
    now: datetime | None = None,
) -> Decision:
    """Register this DAG run's model and move ``promotion.alias`` to it only if it wins.

    Raises PromotionRefused (before anything is registered) when there is no FINISHED run for the
    DAG run, its dataset fingerprint is not ``approved_fingerprint``, it lacks the metric, or it has
    no model. A candidate that loses is still registered, with the decision recorded on its version;
    the alias is left alone and ``promoted`` is False.
    """
    rule = pipeline.config.promotion
    name = pipeline.registered_model_name
    alias = rule.alias
    approval_required = rule.approval is not None and rule.approval.required
    decided_at = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
    decided_by = f"airflow:{pipeline.name}/{dag_run_id}" + (
        f" triggered by {triggered_by}" if triggered_by else ""
    )

    run = registry.find_candidate_run(client, pipeline, dag_run_id)
    candidate_value = _check_run(run, rule.metric, approved_fingerprint)
    version = str(registry.register_candidate(client, name, run).version)

    champion = registry.champion(client, name, alias)
    retried = champion is not None and str(champion.version) == version
    champion_fingerprint = None
    recorded_value: float | None = None
    source: str | None = None
    unscorable: str | None = None
    awaiting = False
    if retried:
        # An earlier try of this task already moved the alias here; keep its recorded verdict.
        recorded = Audit.from_tags(registry.version_tags(client, name, version))
        champion_version = None if recorded is None else recorded.champion_version
        champion_value = None if recorded is None else recorded.champion_value
        champion_fingerprint = None if recorded is None else recorded.champion_fingerprint
        if recorded is not None:
            source, recorded_value = recorded.champion_value_source, recorded.champion_recorded_value
            unscorable = recorded.champion_unscorable
        promoted = True
        reason = (
            recorded.reason if recorded and recorded.reason else f"v{version} already holds alias '{alias}'"
        )
        log.info("v%s already holds alias '%s' (an earlier try of promote moved it)", version, alias)
    else:
        champion_version = None if champion is None else str(champion.version)
        recorded_value = None if champion is None else registry.champion_value(client, champion, rule.metric)
        champion_fingerprint = None if champion is None else (champion.tags or {}).get(TAG_FINGERPRINT)
        if champion_fingerprint in (None, NONE):
            champion_fingerprint = None
        if champion is None:
            promoted, reason = decide(rule, candidate_value, None)
            champion_value, source = None, None
        else:
            assert champion_version is not None
            rescored = _rescored_value(run, rule.metric, champion_version)
            if rescored is None:
                unscorable = unscorable_reason(
                    champion_version,
                    run.data.tags.get(TAG_CHAMPION_SCORED_VERSION),
                    run.data.tags.get(TAG_CHAMPION_UNSCORABLE),
                )
            promoted, reason, source = decide_against_champion(
                rule,
                candidate_value,
                champion_version=champion_version,
                rescored_value=rescored,
                recorded_value=recorded_value,
                unscorable=unscorable,
            )
            champion_value = (
                rescored if source == "rescored" else recorded_value if source == "recorded" else None
            )
        awaiting = promoted and approval_required

    decision = Decision(
        promoted=promoted,
        reason=reason,
        metric=rule.metric,
        candidate_value=candidate_value,
        champion_version=champion_version,
        champion_value=champion_value,
        version=version,
        model_name=name,
        alias=alias,
        run_id=run.info.run_id,
        decided_at=decided_at,
        decided_by=decided_by,
        champion_fingerprint=champion_fingerprint,
        champion_value_source=source,
        champion_recorded_value=recorded_value,
        compared_on=approved_fingerprint if source == "rescored" else None,
        champion_unscorable=unscorable,
        evaluation_uri=_evaluation_uri(client, run),
        run_url=registry.run_url(pipeline.environment.mlflow.tracking_uri, run),
        awaiting_approval=awaiting,
    )
    if awaiting:
        decision = replace(decision, promoted=False)
    audit = Audit.of(
        decision,
        rule=rule,
        dataset_fingerprint=run.data.tags.get(TAG_FINGERPRINT),
        pipeline=pipeline.name,
        environment=pipeline.environment.name,
        dag_run_id=dag_run_id,
    )
    # What the run cost goes on the version's audit too: the registry is where a model is judged.
    tags = {**audit.to_tags(), **cost_tags(run)}
    registry.tag_version(client, name, version, tags, description=description(decision))
    if awaiting:
        log.info("v%s is better; the alias moves once promotion.approval is given", version)
        return decision
    if promoted:
        if not retried:
            registry.move_alias(client, name, alias, version)
        if champion_version is not None and champion_version != version:
            registry.tag_version(
                client, name, champion_version, Superseded(by=version, at=decided_at).to_tags()
            )
    return decision
