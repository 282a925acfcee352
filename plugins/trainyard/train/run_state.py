"""What the ``train`` task remembers across the Airflow tries of one DAG run.

XComs are cleared at the start of every try, so a relaunch count kept there bounds each try, not
the run, and a pod created by a try that died is forgotten. Airflow's task state store is kept per
task instance across tries; this is the one record Trainyard keeps in it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Protocol

from pydantic import Field, ValidationError

from trainer.spec import StrictModel
from trainyard.cost import PodTime, merge_times
from trainyard.train.queue_wait import QueueWaitRecord

STATE_KEY = "trainyard.train"

log = logging.getLogger(__name__)


class StateStore(Protocol):
    """``context["task_state_store"]``: JSON values by key, kept across the tries of a task instance."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...


class MemoryStore:
    """A store for one process, where Airflow gives none (an older Airflow, ``trainyard render``)."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._values[key] = value


class OwnedPod(StrictModel):
    """The pod this run created last; a later try adopts a pod only if its UID is this one."""

    namespace: str
    name: str
    uid: str


class RunState(StrictModel):
    relaunches: int = Field(0, ge=0, description="Pods relaunched after a disruption, in this DAG run.")
    requeues: int = Field(0, ge=0, description="Pods relaunched after Kueue preempted them (not counted).")
    pod: OwnedPod | None = None
    try_number: int | None = Field(None, description="The Airflow try the deadline belongs to.")
    deadline: datetime | None = Field(None, description="When that try's execution_timeout ends.")
    queue_waits: list[QueueWaitRecord] = Field(
        default_factory=list, description="Each pod's wait for Kueue admission, in order."
    )
    pods: list[PodTime] = Field(
        default_factory=list, description="Every pod of the run, in order, with its times (trainyard.cost)."
    )

    def with_wait(self, record: QueueWaitRecord) -> RunState:
        """This state with one more wait (a re-read of the same pod's wait replaces it)."""
        kept = [w for w in self.queue_waits if w.pod != record.pod]
        return self.model_copy(update={"queue_waits": [*kept, record]})

    def pod_time(self, *, uid: str | None = None, name: str | None = None) -> PodTime | None:
        """The record of one pod, by UID (or by name, when only that was seen)."""
        return next((p for p in self.pods if (uid and p.uid == uid) or (not uid and p.pod == name)), None)

    def with_pod_time(
        self,
        *,
        uid: str,
        name: str,
        times: dict[str, datetime] | None = None,
        **update: Any,
    ) -> RunState:
        """This state with what was seen of one pod merged into its record (a new pod is appended)."""
        known = self.pod_time(uid=uid)
        record = known or PodTime(pod=name, uid=uid)
        record = merge_times(record, times or {})
        record = record.model_copy(update=update) if update else record
        pods = [record if p.uid == uid else p for p in self.pods] if known else [*self.pods, record]
        return self.model_copy(update={"pods": pods})

    @classmethod
    def load(cls, store: StateStore) -> RunState:
        value = store.get(STATE_KEY)
        if value is None:
            return cls()
        try:
            return cls.model_validate(value)
        except ValidationError:
            # A record from another Trainyard version: forgetting it costs at most one extra relaunch.
            log.warning("Ignoring an unreadable train state %r; starting afresh", value)
            return cls()

    def save(self, store: StateStore) -> None:
        store.set(STATE_KEY, self.model_dump(mode="json"))


def state_store(context: Any) -> StateStore:
    store = context.get("task_state_store")
    return store if store is not None else MemoryStore()
