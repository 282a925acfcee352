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
from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchTimeoutException
from airflow.triggers.base import TriggerEvent

from trainyard.train.pod_failures import failure_facts
from trainyard.train.queue_wait import (
    QueueError,
    QueueFacts,
    QueueSettings,
    QueueWaitRecord,
    await_admission,
    read_facts_async,
)

STARTED_KEY = "trainyard_pod_started"
LAST_SEEN_KEY = "trainyard_pod_last_seen"
QUEUE_WAIT_KEY = "trainyard_queue_wait"
QUEUE_TIMEOUT_KEY = "trainyard_queue_timeout"


class TrainPodTrigger(KubernetesPodTrigger):
    """Adds ``trainyard_pod_started`` and ``trainyard_pod_last_seen`` to its events.

    With ``queue`` (Kueue scheduling) it first waits for the pod's admission, reporting its place
    in the queue, and adds the wait (``trainyard_queue_wait``) to the event.
    """

    _started = False
    _last_seen: Any = None

    def __init__(self, *, queue: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue = queue
        self._queue_wait: QueueWaitRecord | None = None
        self._queue_timed_out = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        if self.queue is not None:
            kwargs["queue"] = self.queue
        return f"{__name__}.{type(self).__name__}", kwargs

    async def _wait_for_pod_start(self) -> Any:
        if self.queue is not None:
            settings = QueueSettings.model_validate(self.queue)

            async def read_facts(pod: Any) -> QueueFacts:
                async with self.hook.get_conn() as connection:
                    return await read_facts_async(connection, settings, pod)

            try:
                self._queue_wait = await await_admission(
                    settings, read_pod=self._get_pod, read_facts=read_facts, log=self.log
                )
            except QueueError as exc:
                # The provider turns a launch timeout into a "timeout" event without a traceback.
                self._queue_wait, self._queue_timed_out = exc.record, True
                raise PodLaunchTimeoutException(str(exc)) from exc
        return await super()._wait_for_pod_start()

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
            wait = self._queue_wait.model_dump(mode="json") if self._queue_wait is not None else None
            yield TriggerEvent(
                {
                    **event.payload,
                    STARTED_KEY: self._started,
                    LAST_SEEN_KEY: failure_facts(self._last_seen),
                    QUEUE_WAIT_KEY: wait,
                    QUEUE_TIMEOUT_KEY: self._queue_timed_out,
                }
            )
