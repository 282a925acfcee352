"""The provider's pod trigger, telling the resumed task what it last saw of the pod.

The cluster deletes a pod it preempts, drains or stops, usually before the task resumes from
deferral and looks at it (the provider then raises ``PodNotFoundException``). Whether the pod had
been running, and what it said when it was last read, decide between a disruption (relaunch),
a genuine failure and a pod that never got a node, so the trigger puts both in its event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger
from airflow.triggers.base import TriggerEvent

from trainyard.train.pod_failures import failure_facts

STARTED_KEY = "trainyard_pod_started"
LAST_SEEN_KEY = "trainyard_pod_last_seen"


class TrainPodTrigger(KubernetesPodTrigger):
    """Adds ``trainyard_pod_started`` and ``trainyard_pod_last_seen`` to its events."""

    _started = False
    _last_seen: Any = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return f"{__name__}.{type(self).__name__}", kwargs

    async def _wait_for_pod_start_within_deadline(self) -> Any:
        state = await super()._wait_for_pod_start_within_deadline()
        self._started = True  # the pod left Pending: its container ran
        return state

    async def _get_pod(self) -> Any:
        pod = await super()._get_pod()
        self._last_seen = pod
        return pod

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async for event in super().run():
            yield TriggerEvent(
                {**event.payload, STARTED_KEY: self._started, LAST_SEEN_KEY: failure_facts(self._last_seen)}
            )
