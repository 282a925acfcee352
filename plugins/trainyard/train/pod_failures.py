"""Why a training pod ended badly, and what the ``train`` task does about it.

Preemption and eviction are normal on a shared GPU cluster: the pod is relaunched and resumes
from its checkpoint without spending an Airflow retry. Everything else is a genuine failure that
gets a message naming its cause, and fails for good when a retry would fail the same way.
All of it is pure, so every decision is tested as a table without a cluster.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Literal

from trainer.spec import PERMANENT_EXIT_CODES

Kind = Literal[
    "requeued",
    "preempted",
    "evicted",
    "stopped",
    "vanished",
    "unscheduled",
    "oom_killed",
    "image_pull",
    "config",
    "deadline",
    "exit_code",
    "unknown",
    "refused",
    "invalid_pod",
]
#: The cluster took the pod away from a healthy trainer: relaunch it, do not spend a retry.
DISRUPTIONS: frozenset[str] = frozenset({"requeued", "preempted", "evicted", "stopped", "vanished"})
#: Kueue's reason on a pod it evicts to give its quota to another workload: the queue at work.
KUEUE_PREEMPTED = "WorkloadEvictedDueToPreempted"
#: How Kueue's eviction message (its "Stopped" event on the pod) begins when it preempted it.
KUEUE_PREEMPTION_EVENT = "Preempted to accommodate a workload"
#: Conditions the cluster sets on a pod it is about to stop: kube-scheduler preemption, the
#: Eviction API (drain), taint and node-pressure eviction (DisruptionTarget); Kueue (TerminationTarget).
DISRUPTION_CONDITIONS = ("DisruptionTarget", "TerminationTarget")
#: The API server refused to create the pod: it never ran.
REFUSALS: frozenset[str] = frozenset({"refused", "invalid_pod"})
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")


@dataclass(frozen=True)
class PodFailure:
    kind: Kind
    message: str
    exit_code: int | None = None

    @property
    def is_disruption(self) -> bool:
        return self.kind in DISRUPTIONS

    @property
    def is_refusal(self) -> bool:
        return self.kind in REFUSALS


def _get(obj: Any, *names: str) -> Any:
    for name in names:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _disruption(pod: Any) -> PodFailure | None:
    """The disruption the cluster marked ``pod`` with, if any."""
    name = _get(pod, "metadata", "name") or "the pod"
    for condition in _get(pod, "status", "conditions") or []:
        type_ = _get(condition, "type")
        if type_ in DISRUPTION_CONDITIONS and _get(condition, "status") == "True":
            reason = _get(condition, "reason") or "Disruption"
            detail = _get(condition, "message") or ""
            if type_ == "TerminationTarget":
                if reason == KUEUE_PREEMPTED:
                    return PodFailure(
                        "requeued", f"pod {name} was preempted by Kueue ({reason}) {detail}".strip()
                    )
                return PodFailure("stopped", f"pod {name} was stopped by Kueue ({reason}) {detail}".strip())
            kind: Kind = "preempted" if reason == "PreemptionByScheduler" else "evicted"
            return PodFailure(kind, f"pod {name} was {kind} by the cluster ({reason}) {detail}".strip())
    return None


def has_run(pod: Any, container: str = "base") -> bool:
    """Whether the pod's container ever started (a pod that never ran was never scheduled or pulled)."""
    if _get(pod, "status", "phase") in ("Running", "Succeeded"):
        return True
    statuses = _get(pod, "status", "container_statuses") or _get(pod, "status", "containerStatuses") or []
    state = next((_get(s, "state") for s in statuses if _get(s, "name") == container), None)
    return (
        _get(state, "running") is not None
        or _get(state, "terminated", "started_at") is not None
        or (_get(state, "terminated", "startedAt") is not None)
    )


def classify_gone(
    last_seen: Any, ran: bool, name: str, container: str = "base", last_event: str | None = None
) -> PodFailure:
    """A pod that can no longer be read, judged by what was last seen of it and whether it ran.

    The cluster deletes what it preempts, drains or stops, often before the task looks again;
    its events outlive it, so the last one (``last_event``) says who deleted it.
    """
    said = f"; its last event: {last_event}" if last_event else ""
    if last_seen is not None:
        marked = _disruption(last_seen)
        if marked is not None:
            return marked
        if _get(last_seen, "status", "phase") in ("Succeeded", "Failed"):
            return classify(last_seen, container)
    if last_event and KUEUE_PREEMPTION_EVENT in last_event:
        # Deleted before its TerminationTarget was seen (even before it started): Kueue's own word.
        return PodFailure("requeued", f"pod {name} was preempted by Kueue ({KUEUE_PREEMPTED}){said}")
    if ran:
        return PodFailure(
            "vanished",
            f"pod {name} disappeared while its trainer was running (deleted by the cluster: preemption, "
            f"a node drain or a lost node){said}",
        )
    return PodFailure(
        "unscheduled",
        f"pod {name} was deleted before its trainer ever started; it never got a node. Check that the "
        f"queue, quota and node selectors can fit its resources{said}",
    )


def classify(pod: Any, container: str = "base") -> PodFailure:
    """Classify a finished (or stuck) pod; ``pod`` is a V1Pod or its dict form."""
    name = _get(pod, "metadata", "name") or "the pod"
    status = _get(pod, "status")
    marked = _disruption(pod)
    if marked is not None:
        return marked
    if _get(status, "reason") == "Evicted":
        return PodFailure("evicted", f"pod {name} was evicted: {_get(status, 'message') or 'node pressure'}")
    if _get(status, "reason") == "DeadlineExceeded":
        return PodFailure(
            "deadline",
            f"pod {name} ran past activeDeadlineSeconds (the task's execution timeout) and was stopped",
        )
    statuses = [s for s in _get(status, "container_statuses") or _get(status, "containerStatuses") or []]
    state = next((_get(s, "state") for s in statuses if _get(s, "name") == container), None)
    waiting = _get(state, "waiting")
    if waiting is not None:
        reason = _get(waiting, "reason") or ""
        detail = _get(waiting, "message") or ""
        if reason in IMAGE_PULL_REASONS:
            image = next((_get(s, "image") for s in statuses if _get(s, "name") == container), "?")
            return PodFailure("image_pull", f"image pull failed for {image} ({reason}) {detail}".strip())
        if reason in CONFIG_REASONS:
            return PodFailure("config", f"the container could not start ({reason}): {detail}".strip())
    terminated = _get(state, "terminated")
    if terminated is not None:
        code = _get(terminated, "exit_code")
        code = _get(terminated, "exitCode") if code is None else code
        reason = _get(terminated, "reason") or ""
        if reason == "OOMKilled":
            return PodFailure(
                "oom_killed",
                f"the trainer was OOMKilled (exit code {code}): it needed more memory than the pod's limit; "
                "raise resources.memory or lower training.batch_size",
            )
        message = (_get(terminated, "message") or "").strip()
        suffix = f": {message}" if message else ""
        return PodFailure(
            "exit_code", f"the trainer exited with code {code} ({reason or 'Error'}){suffix}", code
        )
    phase = _get(status, "phase") or "Unknown"
    if phase == "Pending":
        scheduled = next(
            (c for c in _get(status, "conditions") or [] if _get(c, "type") == "PodScheduled"), None
        )
        if scheduled is not None and _get(scheduled, "status") == "False":
            why = _get(scheduled, "message") or _get(scheduled, "reason") or "no node fits it"
            return PodFailure(
                "unscheduled", f"pod {name} was never scheduled within the startup timeout: {why}"
            )
        return PodFailure("unknown", f"pod {name} was still Pending at the startup timeout")
    return PodFailure("unknown", f"pod {name} ended in phase {phase}")


def failure_facts(pod: Any) -> dict[str, Any] | None:
    """The part of a pod :func:`classify` reads, as JSON: what a trigger hands the resumed task."""
    if pod is None:
        return None
    status = _get(pod, "status")
    statuses = _get(status, "container_statuses") or []

    def state_of(s: Any) -> dict[str, Any]:
        state = _get(s, "state")
        out: dict[str, Any] = {}
        if _get(state, "waiting") is not None:
            out["waiting"] = {k: _get(state, "waiting", k) for k in ("reason", "message")}
        if _get(state, "running") is not None:
            out["running"] = {}
        if _get(state, "terminated") is not None:
            t = _get(state, "terminated")
            out["terminated"] = {
                "exitCode": _get(t, "exit_code"),
                "reason": _get(t, "reason"),
                "message": (_get(t, "message") or "")[-2048:],
                "startedAt": str(_get(t, "started_at")) if _get(t, "started_at") else None,
            }
        return out

    return {
        "metadata": {"name": _get(pod, "metadata", "name")},
        "status": {
            "phase": _get(status, "phase"),
            "reason": _get(status, "reason"),
            "message": _get(status, "message"),
            "conditions": [
                {k: _get(c, k) for k in ("type", "status", "reason", "message")}
                for c in _get(status, "conditions") or []
            ],
            "containerStatuses": [
                {"name": _get(s, "name"), "image": _get(s, "image"), "state": state_of(s)} for s in statuses
            ],
        },
    }


def api_refusal(exc: Exception) -> str | None:
    """The API server's own words for a refused pod (admission, quota, schema), if ``exc`` is one."""
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    if status not in (403, 404, 409, 422) or not body:
        return None
    try:
        payload = json.loads(body)
    except (TypeError, ValueError):
        return None
    message = payload.get("message") or str(payload)
    details = payload.get("details") or {}
    # A 404 is a refusal only when the namespace is missing; a pod that vanished mid-run is not one.
    if status == 404 and details.get("kind") != "namespaces" and "namespaces" not in message:
        return None
    return message


def refused_pod(exc: Exception) -> PodFailure | None:
    """The refusal ``exc`` reports, if it is one; an invalid spec or unknown PriorityClass stays so."""
    refusal = api_refusal(exc)
    if refusal is None:
        return None
    invalid = getattr(exc, "status", None) == 422 or "PriorityClass" in refusal
    return PodFailure("invalid_pod" if invalid else "refused", refusal)


class Action(enum.Enum):
    RELAUNCH = "relaunch"  # a fresh pod in the same Airflow try, resuming from the checkpoint
    FAIL_PERMANENTLY = "fail permanently"  # no Airflow retry: it would fail the same way
    FAIL_RETRYABLE = "fail retryable"  # Airflow's retries apply


@dataclass(frozen=True)
class NextStep:
    action: Action
    message: str  # what the task log shows: the warning before a relaunch, or the error
    counted: bool = True  # whether a relaunch counts against max_preemption_relaunches


def after_pod_failure(failure: PodFailure, relaunches: int, limit: int) -> NextStep:
    """What the ``train`` task does after ``failure``, having relaunched ``relaunches`` of ``limit`` times."""
    if failure.kind == "requeued":
        # Kueue gave the GPUs to a higher-priority workload or to the team that lent them: the run
        # queues again for quota. Not a fault to bound by a count; execution_timeout bounds it.
        return NextStep(
            Action.RELAUNCH,
            f"{failure.message}. Relaunching: the new pod queues for quota again and the trainer "
            "resumes from its last checkpoint (not counted against max_preemption_relaunches).",
            counted=False,
        )
    if failure.is_disruption:
        if relaunches < limit:
            return NextStep(
                Action.RELAUNCH,
                f"{failure.message}. Relaunching ({relaunches + 1}/{limit}, no Airflow retry used); "
                "the trainer resumes from its last checkpoint.",
            )
        return NextStep(
            Action.FAIL_RETRYABLE,
            f"Training pod failed: {failure.message}; gave up after {relaunches} relaunches "
            "(max_preemption_relaunches)",
        )
    if failure.is_refusal:
        # A refused pod never started; an invalid spec will not fix itself, a full quota may.
        action = Action.FAIL_PERMANENTLY if failure.kind == "invalid_pod" else Action.FAIL_RETRYABLE
        return NextStep(action, f"Kubernetes refused the training pod: {failure.message}")
    # A bad spec or bad input fails the same way on every retry: do not spend them.
    permanent = failure.exit_code in PERMANENT_EXIT_CODES
    return NextStep(
        Action.FAIL_PERMANENTLY if permanent else Action.FAIL_RETRYABLE,
        f"Training pod failed: {failure.message}",
    )
