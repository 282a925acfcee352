"""The ``promote`` step: register this DAG run's model and move the alias only if it beats the champion.

Promotion is where trust is earned: never promote a worse model, a model without the metric, or a
model trained on data other than the data ``validate_data`` approved; every decision leaves an audit
trail on the model version (who, what, when, why).

The rule itself is the pure function :func:`decide`; :func:`promote` does the MLflow I/O with an
injected ``MlflowClient``. MLflow is imported only inside functions so that Airflow task code can
import this module while parsing DAG files, which must stay cheap (see docs/architecture.md).

Order of writes in :func:`promote`, chosen so that a retried task converges:

1. register (or reuse) the candidate version for the run;
2. record the decision as tags + description on the candidate version;
3. move the alias (only when promoted);
4. tag the previous champion ``trainyard.superseded_by``.

A retry after a crash between 3 and 4 finds the candidate already holding the alias, reads the
previous champion from the tags written in 2, and finishes step 4.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from trainer.spec import (
    MODEL_ARTIFACT,
    TAG_DAG_ID,
    TAG_ENVIRONMENT,
    TAG_FINGERPRINT,
    TAG_MODEL_URI,
    TAG_PIPELINE,
    TAG_RUN_ID,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

    from trainyard.config.loading import ResolvedPipeline
    from trainyard.config.pipeline_schema import Promotion

log = logging.getLogger(__name__)

#: Absolute slack for threshold comparisons, so 0.862 - 0.860 (= 0.00199999...) meets 0.002.
TOLERANCE = 1e-9

# Tags this module writes on model versions.
TAG_DECISION = "trainyard.decision"
TAG_REASON = "trainyard.reason"
TAG_METRIC = "trainyard.metric"
TAG_CANDIDATE_VALUE = "trainyard.candidate_value"
TAG_CHAMPION_VERSION = "trainyard.champion_version"
TAG_CHAMPION_VALUE = "trainyard.champion_value"
TAG_CHAMPION_FINGERPRINT = "trainyard.champion_dataset_fingerprint"
TAG_RULE = "trainyard.rule"
TAG_ALIAS = "trainyard.alias"
TAG_DECIDED_AT = "trainyard.decided_at"
TAG_DECIDED_BY = "trainyard.decided_by"
TAG_SUPERSEDED_BY = "trainyard.superseded_by"
TAG_SUPERSEDED_AT = "trainyard.superseded_at"
NONE = "none"  # tag value for "no champion" / "no value" (MLflow tag values are strings)


class PromotionRefused(Exception):
    """This run must never be registered or promoted; the task should fail without retrying."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    candidate_value: float
    champion_version: str | None
    champion_value: float | None
    version: str | None
    model_name: str
    alias: str
    run_id: str
    decided_at: str
    decided_by: str
    champion_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (the ``promote`` task returns it as its XCom)."""
        return asdict(self)


# --------------------------------------------------------------------------- the rule (pure)


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _better_by(direction: str, candidate: float, champion: float) -> float:
    return candidate - champion if direction == "max" else champion - candidate


def _must_reach_problem(rule: Promotion, value: float) -> str | None:
    """Why ``value`` misses the rule's absolute bar, or None when it passes (or there is none)."""
    if rule.must_reach is None:
        return None
    if rule.direction == "max" and value < rule.must_reach - TOLERANCE:
        return f"{rule.metric} {_fmt(value)} is below the required minimum {_fmt(rule.must_reach)}"
    if rule.direction == "min" and value > rule.must_reach + TOLERANCE:
        return f"{rule.metric} {_fmt(value)} is above the allowed maximum {_fmt(rule.must_reach)}"
    return None


def _bar(rule: Promotion) -> str:
    if rule.must_reach is None:
        return ""
    word = "minimum" if rule.direction == "max" else "maximum"
    return f" and meets the {word} {_fmt(rule.must_reach)}"


def decide(
    rule: Promotion,
    candidate_value: float,
    champion_value: float | None,
    *,
    champion_version: str | None = None,
    champion_has_metric: bool = True,
) -> tuple[bool, str]:
    """Whether the candidate replaces the champion, and why, as a sentence with the numbers.

    ``rule.direction`` says which way is better ("max": accuracy, F1; "min": loss). For "min",
    ``rule.must_reach`` is the largest acceptable value. With a champion, the candidate must be
    strictly better (a tie never replaces the champion) by at least ``rule.min_improvement``.
    ``champion_version`` only names the champion in the reason. ``champion_has_metric=False``
    means an alias holder exists but has no (finite) value of the metric: the candidate then
    replaces it only if it passes ``must_reach``.
    """
    metric = rule.metric
    name = f"champion v{champion_version}" if champion_version else "champion"
    if not math.isfinite(candidate_value):
        return False, f"{metric} of the candidate is {candidate_value}, not a number that can be compared"
    problem = _must_reach_problem(rule, candidate_value)
    if problem:
        return False, problem
    if champion_value is not None and not math.isfinite(champion_value):
        champion_value, champion_has_metric = None, False

    if champion_value is None:
        if not champion_has_metric:
            bar = _bar(rule) or "; no must_reach is set, so nothing else is required"
            return True, (
                f"{name} has no {metric} to compare with; the candidate's {metric} "
                f"{_fmt(candidate_value)} replaces it{' because it' if _bar(rule) else ''}{bar}"
            )
        return True, f"no {name} yet; {metric} {_fmt(candidate_value)} becomes the first{_bar(rule)}"

    gain = _better_by(rule.direction, candidate_value, champion_value)
    verb = "beats" if rule.direction == "max" else "improves on"
    if gain <= 0:
        relation = "ties" if gain == 0 else "is worse than"
        return False, (
            f"{metric} {_fmt(candidate_value)} {relation} {name} ({_fmt(champion_value)}); "
            f"{'higher' if rule.direction == 'max' else 'lower'} is better and a tie keeps the champion"
        )
    if gain < rule.min_improvement - TOLERANCE:
        return False, (
            f"{metric} {_fmt(candidate_value)} {verb} {name} ({_fmt(champion_value)}) by only "
            f"{_fmt(gain)} < required {_fmt(rule.min_improvement)}"
        )
    return True, (
        f"{metric} {_fmt(candidate_value)} {verb} {name} ({_fmt(champion_value)}) by "
        f"{_fmt(gain)} >= required {_fmt(rule.min_improvement)}"
    )


# --------------------------------------------------------------------------- MLflow I/O


def _is(exc: Exception, *codes: str) -> bool:
    return getattr(exc, "error_code", None) in codes


def _quote(value: str) -> str | None:
    """A quoted literal for an MLflow filter string, or None when the value cannot be quoted."""
    if "'" not in value and "\\" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    return None


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
    # Names from the pipeline/environment schemas are always quotable; an Airflow run id may not be,
    # and is then matched here instead of in the filter.
    clauses = [f"tags.`{k}` = {q}" for k, v in wanted.items() if (q := _quote(v)) is not None]
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            filter_string=" and ".join(clauses),
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=page_token,
        )
        runs.extend(r for r in page if all(r.data.tags.get(k) == v for k, v in wanted.items()))
        page_token = page.token
        if not page_token:
            break

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
    """The model version of ``run`` under ``name``: the existing one if any, else a new one."""
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


def _champion(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
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


def _champion_value(client: MlflowClient, champion: ModelVersion, metric: str) -> float | None:
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


def _rule_text(rule: Promotion) -> str:
    parts = [f"{rule.metric} ({'higher' if rule.direction == 'max' else 'lower'} is better)"]
    if rule.must_reach is not None:
        bound = "at least" if rule.direction == "max" else "at most"
        parts.append(f"must_reach={_fmt(rule.must_reach)} ({bound})")
    parts.append(f"min_improvement={_fmt(rule.min_improvement)}")
    return ", ".join(parts)


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
    decided_at = (now or datetime.now(UTC)).astimezone(UTC).isoformat()
    decided_by = f"airflow:{pipeline.name}/{dag_run_id}" + (
        f" triggered by {triggered_by}" if triggered_by else ""
    )

    run = find_candidate_run(client, pipeline, dag_run_id)
    run_id = run.info.run_id
    candidate_value = _check_run(run, rule.metric, approved_fingerprint)
    version = register_candidate(client, name, run).version

    champion = _champion(client, name, alias)
    retried = champion is not None and str(champion.version) == str(version)
    champion_fingerprint = None
    if retried:
        # An earlier try of this task already moved the alias here; keep its recorded verdict.
        tags = client.get_model_version(name, version).tags
        previous = tags.get(TAG_CHAMPION_VERSION)
        champion_version = None if previous in (None, NONE) else previous
        recorded = tags.get(TAG_CHAMPION_VALUE)
        champion_value = None if recorded in (None, NONE) else float(recorded)
        promoted = True
        reason = tags.get(TAG_REASON) or f"v{version} already holds alias '{alias}'"
        log.info("v%s already holds alias '%s' (an earlier try of promote moved it)", version, alias)
    else:
        champion_version = None if champion is None else str(champion.version)
        champion_value = None if champion is None else _champion_value(client, champion, rule.metric)
        promoted, reason = decide(
            rule,
            candidate_value,
            champion_value,
            champion_version=champion_version,
            champion_has_metric=champion is None or champion_value is not None,
        )
        champion_fingerprint = None if champion is None else (champion.tags or {}).get(TAG_FINGERPRINT)
        if champion_fingerprint not in (None, NONE, approved_fingerprint):
            # Metrics from different validation sets are not strictly comparable: say so in the audit.
            reason += (
                f" (note: the champion was evaluated on another dataset, {champion_fingerprint[:19]}...)"
            )

    decision = Decision(
        promoted=promoted,
        reason=reason,
        metric=rule.metric,
        candidate_value=candidate_value,
        champion_version=champion_version,
        champion_value=champion_value,
        version=str(version),
        model_name=name,
        alias=alias,
        run_id=run_id,
        decided_at=decided_at,
        decided_by=decided_by,
        champion_fingerprint=champion_fingerprint,
    )
    _record(client, pipeline, decision, run=run, dag_run_id=dag_run_id, rule=rule)
    if promoted:
        if not retried:
            client.set_registered_model_alias(name, alias, str(version))
            log.info("moved alias '%s' of %s to v%s", alias, name, version)
        if champion_version is not None and champion_version != str(version):
            client.set_model_version_tag(name, champion_version, TAG_SUPERSEDED_BY, str(version))
            client.set_model_version_tag(name, champion_version, TAG_SUPERSEDED_AT, decided_at)
    return decision


def _record(
    client: MlflowClient,
    pipeline: ResolvedPipeline,
    d: Decision,
    *,
    run: Run,
    dag_run_id: str,
    rule: Promotion,
) -> None:
    """The audit trail on the candidate version: tags for machines, the description for people."""
    assert d.version is not None
    tags = {
        TAG_DECISION: "promoted" if d.promoted else "rejected",
        TAG_REASON: d.reason,
        TAG_METRIC: d.metric,
        TAG_CANDIDATE_VALUE: repr(d.candidate_value),
        TAG_CHAMPION_VERSION: d.champion_version or NONE,
        TAG_CHAMPION_VALUE: NONE if d.champion_value is None else repr(d.champion_value),
        TAG_CHAMPION_FINGERPRINT: d.champion_fingerprint or NONE,
        TAG_RULE: _rule_text(rule),
        TAG_ALIAS: d.alias,
        TAG_FINGERPRINT: run.data.tags.get(TAG_FINGERPRINT, NONE),
        TAG_PIPELINE: pipeline.name,
        TAG_ENVIRONMENT: pipeline.environment.name,
        TAG_DAG_ID: pipeline.name,
        TAG_RUN_ID: dag_run_id,
        TAG_DECIDED_AT: d.decided_at,
        TAG_DECIDED_BY: d.decided_by,
    }
    for key, value in tags.items():
        client.set_model_version_tag(d.model_name, d.version, key, value)
    verdict = f"Promoted to '{d.alias}'" if d.promoted else f"Not promoted to '{d.alias}'"
    client.update_model_version(
        d.model_name,
        d.version,
        description=(
            f"{verdict}: {d.reason}. Decided {d.decided_at} by {d.decided_by} (MLflow run {d.run_id})."
        ),
    )
