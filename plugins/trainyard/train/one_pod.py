"""One run, one pod: before a training pod is created, every other pod of its DAG run is gone.

Two trainers on one run write, and prune, the same checkpoints and log to the same MLflow run, so
the task never creates a pod while another of its run exists: a pod a previous try created (its
worker was killed, its Pending pod timed out, its create response was lost) is adopted if it is
the one this run recorded (by UID, never by name alone) and still useful, and deleted otherwise.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airflow.providers.cncf.kubernetes.kubernetes_helper_functions import TRANSIENT_STATUS_CODES
from kubernetes.client.exceptions import ApiException

from trainyard.train.pod import LABEL_PREFIX

LAUNCH_ANNOTATION = f"{LABEL_PREFIX}/launch-id"
ACTIVE_PHASES = ("Pending", "Running")
#: The provider's transient statuses, but a 409 on create is not transient: it may be our own pod.
TRANSIENT_STATUSES = TRANSIENT_STATUS_CODES - {409}
CREATE_ATTEMPTS = 5

log = logging.getLogger(__name__)


class PodNotGone(RuntimeError):
    """A pod of this run is still there after its grace period; creating another would overlap it."""


def new_launch_id() -> str:
    """A token only this create call knows: it proves that a pod found after a 409 is ours."""
    return secrets.token_hex(8)


def is_stopping(pod: Any) -> bool:
    """Being deleted, or marked by the cluster for termination: not a pod to adopt."""
    if pod.metadata.deletion_timestamp is not None:
        return True
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type in ("DisruptionTarget", "TerminationTarget") and c.status == "True" for c in conditions)


def is_active(pod: Any) -> bool:
    """Pending or Running (terminating included): a pod that may still start or run a trainer."""
    return (pod.status.phase if pod.status else "Pending") in ACTIVE_PHASES


def adoptable(pod: Any, uid: str | None) -> bool:
    """The pod this run recorded, still Pending or Running or already Succeeded, and not stopping.

    A pod the provider labelled ``already_checked`` was finished with by an earlier try.
    """
    phase = pod.status.phase if pod.status else None
    return (
        uid is not None
        and pod.metadata.uid == uid
        and (pod.metadata.labels or {}).get("already_checked") != "True"
        and phase in (*ACTIVE_PHASES, "Succeeded")
        and not is_stopping(pod)
    )


@dataclass
class RunPods:
    """The pods of one DAG run, found by its labels, through an injected ``CoreV1Api``."""

    client: Any
    namespace: str
    selector: str
    grace_seconds: int
    margin: float = 60  # beyond the grace period, for the kubelet to report and the API to remove
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    #: Told of each pod this removed, once it is gone (the run's cost counts its time).
    on_removed: Callable[[Any], None] | None = None

    def list(self) -> list[Any]:
        return list(self.client.list_namespaced_pod(self.namespace, label_selector=self.selector).items)

    def settle(self, keep_uid: str | None) -> Any | None:
        """Adopt the recorded pod if it is still useful; delete every other active pod, wait for them.

        Finished pods train no more and are left to ``on_finish_action`` (they hold the logs).
        """
        kept, doomed = None, []
        for pod in self.list():
            if kept is None and adoptable(pod, keep_uid):
                kept = pod
            elif is_active(pod):
                doomed.append(pod)
        self._remove(doomed, "left by an earlier attempt: one run trains in one pod")
        if kept is not None:
            log.info("Adopting pod %s (uid %s) of this run", kept.metadata.name, kept.metadata.uid)
        return kept

    def stop_active(self) -> None:
        """Delete every Pending or Running pod of the run and wait until they are gone."""
        self._remove([pod for pod in self.list() if is_active(pod)], "the task is ending")

    def _remove(self, pods: list[Any], why: str) -> None:
        for pod in pods:
            log.warning(
                "Deleting pod %s (phase %s): %s",
                pod.metadata.name,
                pod.status.phase if pod.status else "?",
                why,
            )
            self.delete(pod)
        self.wait_gone([pod.metadata.name for pod in pods])
        if self.on_removed is not None:
            for pod in pods:
                self.on_removed(pod)

    def delete(self, pod: Any) -> None:
        try:
            self.client.delete_namespaced_pod(
                pod.metadata.name, self.namespace, grace_period_seconds=self.grace_seconds
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def wait_gone(self, names: list[str]) -> None:
        """Until no pod of these names exists: a terminating pod may still be training."""
        if not names:
            return
        deadline = self.clock() + self.grace_seconds + self.margin
        remaining = set(names)
        while remaining:
            remaining &= {pod.metadata.name for pod in self.list()}
            if not remaining:
                return
            if self.clock() >= deadline:
                raise PodNotGone(
                    f"pod(s) {', '.join(sorted(remaining))} of this run still there "
                    f"{self.grace_seconds + self.margin:.0f}s after deletion; not starting another beside it"
                )
            self.sleep(1.0)

    def create(self, pod: Any) -> Any:
        """POST the pod; transient errors are retried, and a 409 adopts the pod only if it is ours."""
        launch_id = (pod.metadata.annotations or {}).get(LAUNCH_ANNOTATION)
        attempt = 0
        while True:
            try:
                return self.client.create_namespaced_pod(self.namespace, pod)
            except ApiException as exc:
                if exc.status == 409:
                    return self._after_conflict(pod.metadata.name, launch_id, exc)
                attempt += 1
                if exc.status not in TRANSIENT_STATUSES or attempt == CREATE_ATTEMPTS:
                    raise
                # The server may have created the pod before failing to answer: the next POST
                # then gets a 409, which adopts it.
                log.warning("Creating pod %s failed (%s); retrying", pod.metadata.name, exc.status)
                self.sleep(min(2 ** (attempt - 1), 15))

    def _after_conflict(self, name: str, launch_id: str | None, exc: ApiException) -> Any:
        try:
            existing = self.client.read_namespaced_pod(name, self.namespace)
        except ApiException:
            raise exc from None
        if (
            launch_id is not None
            and (existing.metadata.annotations or {}).get(LAUNCH_ANNOTATION) == launch_id
        ):
            log.warning(
                "Pod %s already exists from this very request (its reply was lost); adopting it", name
            )
            return existing
        raise exc
