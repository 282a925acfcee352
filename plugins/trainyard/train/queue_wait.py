"""Waiting for Kueue to admit the training pod: a queued run is a waiting run, not a failing one.

Under Kueue a training pod is created with the scheduling gate ``kueue.x-k8s.io/admission`` and
stays Pending until its Workload fits the team's quota (or borrows idle GPUs). The provider would
count that wait against ``startup_timeout_seconds`` and fail a run only because the cluster is
busy, while saying nothing about why. This module waits for the gate to go, says every
``status_interval_seconds`` where the run stands (Kueue's reason and, from the visibility API,
its position in the team's and the cluster's queue), bounds the wait by its own
``kubernetes.max_queue_wait_minutes``, and records the wait for cost reports.

The loop is one coroutine with the reads injected: the sync operator runs it with the
``kubernetes`` client, the deferrable trigger with ``kubernetes_asyncio``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import Field

from trainer.spec import StrictModel
from trainyard import paths

ADMISSION_GATE = "kueue.x-k8s.io/admission"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
VISIBILITY_PATH = (
    "/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/{namespace}/localqueues/{name}/pendingworkloads"
)
MANAGED_LABEL = "kueue.x-k8s.io/managed"
#: How often the pod is read while it waits; Kueue's status is read only when a report is due.
CHECK_SECONDS = 5.0
#: (connect, read) seconds for each read of Kueue: a hung aggregated API must not hang the wait.
REQUEST_TIMEOUT = (5, 30)


class QueueSettings(StrictModel):
    """What a wait needs to know, small enough to travel in a trigger's kwargs."""

    namespace: str
    local_queue: str
    cluster_queue: str
    max_wait_seconds: float = Field(gt=0)
    status_interval_seconds: float = Field(gt=0)
    quota: str = Field(description="The team's quota in words, for the timeout message.")
    environment_file: str = Field(description="Where the quota is declared.")
    team: str

    @classmethod
    def for_pipeline(cls, pipeline: Any) -> QueueSettings | None:
        """None unless the environment schedules through Kueue."""
        env = pipeline.environment
        k8s = env.kubernetes
        if k8s is None or k8s.scheduling != "kueue":
            return None
        team_name = pipeline.config.team
        return cls(
            namespace=k8s.namespace,
            local_queue=env.local_queue(team_name),
            cluster_queue=env.cluster_queue(team_name),
            max_wait_seconds=k8s.max_queue_wait_minutes * 60,
            status_interval_seconds=k8s.kueue.status_interval_seconds,
            quota=quota_text(env, team_name),
            environment_file=str(paths.environments_dir() / f"{env.name}.yaml"),
            team=team_name,
        )


def quota_text(env: Any, team_name: str) -> str:
    """'2 a100 guaranteed, up to 4 more a100 borrowed while idle elsewhere' for one team."""
    team = env.team(team_name)
    k8s = env.kubernetes
    if team is None or k8s is None:
        return "no quota declared"
    nominal = k8s.gpu_counts(team_name, "gpus", team.gpus) or {}
    borrow = k8s.gpu_counts(team_name, "borrow_gpus", team.borrow_gpus)
    guaranteed = ", ".join(f"{count} {kind}" for kind, count in nominal.items()) or "0"
    if borrow is None:
        lent = "any idle GPU of the cohort borrowed"
    else:
        lent = "up to " + ", ".join(f"{count} more {kind}" for kind, count in borrow.items()) + " borrowed"
    return f"{guaranteed} GPUs guaranteed, {lent}; cpu {team.cpu}, memory {team.memory}"


class QueueFacts(StrictModel):
    """What Kueue says about one waiting Workload (positions are 1-based here, 0-based in Kueue)."""

    workload: str | None = None
    reason: str | None = None
    message: str | None = None
    position_in_local_queue: int | None = None
    position_in_cluster_queue: int | None = None
    visibility_error: str | None = None
    admitted_at: datetime | None = Field(None, description="When Kueue admitted it (Admitted=True).")


class QueueWaitRecord(StrictModel):
    """One pod's wait for admission, kept in the run state, the XCom and on the MLflow run."""

    pod: str
    local_queue: str
    cluster_queue: str
    started_at: datetime
    seconds: float = Field(ge=0)
    admitted: bool
    first_position_in_local_queue: int | None = None
    first_position_in_cluster_queue: int | None = None
    last_reason: str | None = None


class QueueError(Exception):
    """The run cannot wait for quota any longer; the message says why. Retrying would not help."""

    record: QueueWaitRecord | None = None


class QueueWaitTimeout(QueueError):
    """The pod waited longer than ``kubernetes.max_queue_wait_minutes``."""

    def __init__(self, message: str, record: QueueWaitRecord) -> None:
        super().__init__(message)
        self.record = record


class NotQueued(QueueError):
    """Under ``scheduling: kueue`` Kueue did not take the pod: it would run outside every quota."""


def is_gated(pod: Any) -> bool:
    """Whether Kueue still holds the pod (its admission gate is on); works for both clients' V1Pod."""
    spec = getattr(pod, "spec", None)
    gates = getattr(spec, "scheduling_gates", None) or []
    return any(getattr(gate, "name", None) == ADMISSION_GATE for gate in gates)


def facts_from(
    workload: dict[str, Any] | None, pending: dict[str, Any] | None, error: str | None
) -> QueueFacts:
    """Kueue's reason from the Workload's conditions, positions from a PendingWorkloadsSummary."""
    if workload is None:
        return QueueFacts(reason="NoWorkload", message="Kueue has not created the pod's Workload yet")
    name = workload["metadata"]["name"]
    conditions = {c["type"]: c for c in (workload.get("status") or {}).get("conditions") or []}
    reason = message = None
    for kind, status in (("Evicted", "True"), ("QuotaReserved", "False"), ("Admitted", "False")):
        condition = conditions.get(kind)
        if condition is not None and condition.get("status") == status:
            reason, message = condition.get("reason"), condition.get("message")
            break
    admitted = conditions.get("Admitted")
    admitted_at = None
    if admitted is not None and admitted.get("status") == "True" and admitted.get("lastTransitionTime"):
        admitted_at = datetime.fromisoformat(str(admitted["lastTransitionTime"]).replace("Z", "+00:00"))
    local = cluster = None
    for item in (pending or {}).get("items") or []:
        if item.get("metadata", {}).get("name") == name:
            local = _one_based(item.get("positionInLocalQueue"))
            cluster = _one_based(item.get("positionInClusterQueue"))
            break
    return QueueFacts(
        workload=name,
        reason=reason,
        message=message,
        position_in_local_queue=local,
        position_in_cluster_queue=cluster,
        visibility_error=error,
        admitted_at=admitted_at,
    )


def _one_based(position: Any) -> int | None:
    return position + 1 if isinstance(position, int) else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _positions(facts: QueueFacts | None) -> str:
    if facts is None or facts.position_in_local_queue is None:
        why = f" ({facts.visibility_error})" if facts is not None and facts.visibility_error else ""
        return f"position unknown{why}"
    return (
        f"position {facts.position_in_local_queue} in the team queue, "
        f"{facts.position_in_cluster_queue} in the cluster queue"
    )


def _reason(facts: QueueFacts | None) -> str:
    if facts is None or facts.reason is None:
        return "reason unknown"
    return f"reason {facts.reason}" + (f": {facts.message}" if facts.message else "")


def waiting_line(settings: QueueSettings, waited: float, facts: QueueFacts | None) -> str:
    return (
        f"waiting for GPU quota in {settings.local_queue} (ClusterQueue {settings.cluster_queue}) for "
        f"{_duration(waited)}: {_positions(facts)}, {_reason(facts)}"
    )


def not_queued_message(settings: QueueSettings, pod: Any) -> str:
    return (
        f"pod {pod.metadata.name} was not taken by Kueue (no admission gate, no {MANAGED_LABEL} label) "
        f"although {settings.environment_file} sets kubernetes.scheduling: kueue, so it would run outside "
        f"every team's quota; it was deleted. Check that Kueue is installed with the pod integration and "
        f"that its managedJobsNamespaceSelector selects namespace {settings.namespace} (docs/deploy.md)."
    )


def timeout_message(settings: QueueSettings, waited: float, facts: QueueFacts | None) -> str:
    limit = settings.max_wait_seconds / 60
    return (
        f"train waited {_duration(waited)} for GPU quota in LocalQueue {settings.local_queue} "
        f"(ClusterQueue {settings.cluster_queue}), longer than kubernetes.max_queue_wait_minutes "
        f"({limit:g}); at the end: {_positions(facts)}, {_reason(facts)}. Team {settings.team}'s quota: "
        f"{settings.quota}. The waiting pod was deleted. Trigger the run again later, or ask the platform "
        f"team to raise teams.{settings.team} in {settings.environment_file}."
    )


ReadPod = Callable[[], Awaitable[Any]]
ReadFacts = Callable[[Any], Awaitable[QueueFacts]]


async def await_admission(
    settings: QueueSettings,
    *,
    read_pod: ReadPod,
    read_facts: ReadFacts,
    log: logging.Logger | logging.LoggerAdapter,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    check_seconds: float = CHECK_SECONDS,
) -> QueueWaitRecord | None:
    """Wait while Kueue gates the pod; None if it was admitted before the first look.

    The wait is counted from the pod's creation (it is gated from then on), so a resumed trigger
    or an adopting retry keeps the same bound and records the whole wait.
    """
    pod = await read_pod()
    if not is_gated(pod):
        labels = getattr(pod.metadata, "labels", None) or {}
        if labels.get(MANAGED_LABEL) != "true":
            raise NotQueued(not_queued_message(settings, pod))
        return None
    created = getattr(pod.metadata, "creation_timestamp", None)
    started_at = created if isinstance(created, datetime) else datetime.now(UTC)
    started = clock() - max((datetime.now(UTC) - started_at).total_seconds(), 0.0)
    first: QueueFacts | None = None
    last: QueueFacts | None = None
    next_report = started
    while True:
        now = clock()
        waited = now - started
        if not is_gated(pod):
            # The pod is read every few seconds; Kueue's Admitted condition says when it really was.
            final = await read_facts(pod)
            if final.admitted_at is not None:
                waited = min(waited, max((final.admitted_at - started_at).total_seconds(), 0.0))
            log.info(
                "admitted by Kueue into ClusterQueue %s after %s in the queue",
                settings.cluster_queue,
                _duration(waited),
            )
            return _record(
                settings, pod, started_at=started_at, waited=waited, admitted=True, first=first, last=last
            )
        expired = waited >= settings.max_wait_seconds
        if now >= next_report or expired:
            last = await read_facts(pod)
            first = first if first is not None and first.position_in_local_queue is not None else last
            if expired:
                pod = await read_pod()  # admitted at the last moment: keep it
                if not is_gated(pod):
                    continue
                record = _record(
                    settings,
                    pod,
                    started_at=started_at,
                    waited=waited,
                    admitted=False,
                    first=first,
                    last=last,
                )
                raise QueueWaitTimeout(timeout_message(settings, waited, last), record)
            log.info("%s", waiting_line(settings, waited, last))
            next_report = now + settings.status_interval_seconds
        await sleep(min(check_seconds, max(settings.max_wait_seconds - waited, 0.05)))
        pod = await read_pod()


def _record(
    settings: QueueSettings,
    pod: Any,
    *,
    started_at: datetime,
    waited: float,
    admitted: bool,
    first: QueueFacts | None,
    last: QueueFacts | None,
) -> QueueWaitRecord:
    return QueueWaitRecord(
        pod=pod.metadata.name,
        local_queue=settings.local_queue,
        cluster_queue=settings.cluster_queue,
        started_at=started_at,
        seconds=round(waited, 3),
        admitted=admitted,
        first_position_in_local_queue=first.position_in_local_queue if first else None,
        first_position_in_cluster_queue=first.position_in_cluster_queue if first else None,
        last_reason=last.reason if last else None,
    )


def queue_summary(waits: list[QueueWaitRecord]) -> dict[str, Any]:
    """What later reports need: total seconds queued, how many waits (relaunches queue again), each."""
    return {
        "seconds": round(sum(w.seconds for w in waits), 3),
        "count": len(waits),
        "waits": [w.model_dump(mode="json") for w in waits],
    }


def queue_tags(summary: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of the run's queue time (a tag value holds at most 8,000 characters)."""
    first = summary["waits"][0] if summary["waits"] else {}
    waits = list(summary["waits"])
    while len(json.dumps(waits)) > 8000:  # the newest waits, as valid JSON
        waits.pop(0)
    return {
        "trainyard.queue.wait_seconds": str(summary["seconds"]),
        "trainyard.queue.waits": str(summary["count"]),
        "trainyard.queue.first_position_in_local_queue": str(first.get("first_position_in_local_queue")),
        "trainyard.queue.first_position_in_cluster_queue": str(first.get("first_position_in_cluster_queue")),
        "trainyard.queue.detail": json.dumps(waits),
    }


# ------------------------------------------------------------------------------ reading Kueue


def pod_uid(pod: Any) -> str:
    return pod.metadata.uid


def pick_workload(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod's Workload (one per pod; the newest if Kueue is replacing one)."""
    if not items:
        return None
    return max(items, key=lambda w: w.get("metadata", {}).get("creationTimestamp") or "")


def _workload_request(settings: QueueSettings, pod: Any) -> tuple[tuple[str, ...], dict[str, str]]:
    args = (KUEUE_GROUP, KUEUE_VERSION, settings.namespace, "workloads")
    return args, {"label_selector": f"{JOB_UID_LABEL}={pod_uid(pod)}", "_request_timeout": REQUEST_TIMEOUT}


def _visibility_request(settings: QueueSettings) -> tuple[tuple[str, str], dict[str, Any]]:
    path = VISIBILITY_PATH.format(namespace=settings.namespace, name=settings.local_queue)
    return (path, "GET"), {
        "query_params": [("limit", 1000)],
        "header_params": {"Accept": "application/json"},
        "response_types_map": {200: "object"},
        "auth_settings": ["BearerToken"],
        "_return_http_data_only": True,
        "_request_timeout": REQUEST_TIMEOUT,
    }


def _unreadable(exc: BaseException) -> QueueFacts:
    # The wait goes on; the report says why it knows less.
    return QueueFacts(reason="Unknown", message=f"could not read the Workload: {_short(exc)}")


def read_facts_sync(api_client: Any, settings: QueueSettings, pod: Any) -> QueueFacts:
    """The pod's Workload and its queue positions, with the ``kubernetes`` client; never raises."""
    from kubernetes.client import CustomObjectsApi

    args, kwargs = _workload_request(settings, pod)
    try:
        workload = pick_workload(
            CustomObjectsApi(api_client).list_namespaced_custom_object(*args, **kwargs)["items"]
        )
    except Exception as exc:
        return _unreadable(exc)
    call, options = _visibility_request(settings)
    try:
        return facts_from(workload, api_client.call_api(*call, **options), None)
    except Exception as exc:
        return facts_from(workload, None, f"visibility API: {_short(exc)}")


async def read_facts_async(api_client: Any, settings: QueueSettings, pod: Any) -> QueueFacts:
    """The same with ``kubernetes_asyncio`` (the triggerer)."""
    from kubernetes_asyncio.client import CustomObjectsApi

    args, kwargs = _workload_request(settings, pod)
    try:
        listed = await CustomObjectsApi(api_client).list_namespaced_custom_object(*args, **kwargs)
        workload = pick_workload(listed["items"])
    except Exception as exc:
        return _unreadable(exc)
    call, options = _visibility_request(settings)
    try:
        return facts_from(workload, await api_client.call_api(*call, **options), None)
    except Exception as exc:
        return facts_from(workload, None, f"visibility API: {_short(exc)}")


def _short(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"[:200]
