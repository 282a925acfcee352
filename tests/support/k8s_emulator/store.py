"""What the API server stores: cluster objects behind one lock, resource versions, the watch log.

One ``RLock`` guards everything; its ``Condition`` is notified on every change, so the kubelet
threads, watches, log follows and ``wait_for_pod`` all wake on the same signal.
"""

from __future__ import annotations

import copy
import subprocess
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from .status import not_found

POLL = 0.05
NODE_NAME = "emulator-node"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerRun:
    """The pod's container as the kubelet runs it: its process and its log (timestamp ns, line)."""

    def __init__(self, name: str):
        self.name = name
        self.lines: list[tuple[int, bytes]] = []
        self.proc: subprocess.Popen | None = None
        self.started = False
        self.finished = False
        self.exit_code: int | None = None
        self.kill_reason: str | None = None  # OOMKilled, or None for Error/Completed
        self.record: dict | None = None  # this process's entry in Store.container_runs


class PodRuntime:
    """A stored pod object and the kubelet's side of it."""

    def __init__(self, obj: dict, root: Path):
        self.obj = obj
        self.root = root  # the pod's local directories: volumes, home, working directory
        self.run = ContainerRun(obj["spec"]["containers"][0]["name"])
        self.thread: threading.Thread | None = None
        self.terminating = False
        self.disruption: dict | None = None  # status reason/message applied when the process ends
        self.gone = False
        self.removal_pending = False  # deleted, but a finalizer still holds the object (see Store.remove)

    @property
    def key(self) -> tuple[str, str]:
        return self.obj["metadata"]["namespace"], self.obj["metadata"]["name"]

    @property
    def running(self) -> bool:
        return self.run.proc is not None and not self.run.finished

    @property
    def ended(self) -> bool:
        return self.gone or self.obj["status"].get("phase") in ("Succeeded", "Failed")


class Store:
    """The cluster's objects; read or change them only while holding ``lock``."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.rv = 1
        self.namespaces: dict[str, dict] = {}
        self.priority_classes: dict[str, dict] = {}
        self.quotas: dict[str, dict[str, dict[str, str]]] = {}  # namespace -> name -> hard
        self.secrets: dict[str, dict[str, dict[str, str]]] = {}  # namespace -> name -> plain data
        self.pvcs: dict[tuple[str, str], Path] = {}
        self.pods: dict[tuple[str, str], PodRuntime] = {}
        self.removed: dict[tuple[str, str], PodRuntime] = {}  # deleted pods, for their logs only
        self.events: list[dict] = []
        self.changes: list[tuple[int, str, str, dict]] = []  # (rv, resource, type, object snapshot)
        # What tests ask about afterwards (see KubernetesEmulator's hooks).
        self.requests: list[tuple[str, str]] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self.received_pods: list[dict] = []
        self.admitted_pods: list[dict] = []
        # How the cluster behaves (see KubernetesEmulator's setters).
        self.scheduling_held = False  # no free GPU: new pods stay Pending, Unschedulable
        self.deleted_pod_linger = 0.1  # s a deleted pod stays readable after its process ended
        self.lose_create_responses = 0  # admitted creates answered 504, as an overloaded API server can
        # Each container process: pod uid, name, labels, monotonic start and end (None while running).
        self.container_runs: list[dict] = []
        # Reasons kube-scheduler would not bind an ungated pod yet (Kueue's preempted pods still there).
        self.scheduling_blockers: list[Callable[[PodRuntime], bool]] = []

    def bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def record(self, resource: str, kind: str, obj: dict) -> None:
        """Append a watch event (ADDED, MODIFIED, DELETED) and wake every waiter."""
        self.changes.append((self.rv, resource, kind, copy.deepcopy(obj)))
        self.changed.notify_all()

    def touch(self, runtime: PodRuntime, kind: str = "MODIFIED") -> None:
        runtime.obj["metadata"]["resourceVersion"] = self.bump()
        self.record("pods", kind, runtime.obj)

    def runtime(self, namespace: str, name: str) -> PodRuntime:
        runtime = self.pods.get((namespace, name))
        if runtime is None:
            raise not_found("pods", name)
        return runtime

    def remove(self, runtime: PodRuntime) -> None:
        """The object leaves the API, unless a finalizer holds it: then it waits, marked for deletion."""
        meta = runtime.obj["metadata"]
        if meta.get("finalizers"):
            runtime.removal_pending = True
            if not meta.get("deletionTimestamp"):
                meta.update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
                self.touch(runtime)
            return
        runtime.gone = True
        if self.pods.get(runtime.key) is runtime:
            del self.pods[runtime.key]
            self.removed[runtime.key] = runtime
        runtime.obj["metadata"]["resourceVersion"] = self.bump()
        self.record("pods", "DELETED", runtime.obj)

    def remove_finalizer(self, runtime: PodRuntime, finalizer: str) -> None:
        """Drop one finalizer; a deleted pod that no finalizer holds any more then leaves the API."""
        meta = runtime.obj["metadata"]
        finalizers = meta.get("finalizers") or []
        if finalizer not in finalizers:
            return
        finalizers.remove(finalizer)
        if not finalizers:
            del meta["finalizers"]
        self.touch(runtime)
        if runtime.removal_pending and not finalizers and not runtime.gone:
            self.remove(runtime)

    def event(  # noqa: PLR0917
        self,
        runtime: PodRuntime,
        reason: str,
        message: str,
        type_: str = "Normal",
        container: bool = False,
        component: str = "kubelet",
    ) -> None:
        """A core/v1 Event about the pod (or, with ``container``, its container), as kubelets write them."""
        meta = runtime.obj["metadata"]
        involved = {
            "kind": "Pod",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
            "apiVersion": "v1",
            "resourceVersion": meta["resourceVersion"],
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{runtime.run.name}}}"
        self.object_event(involved, reason, message, type_, component)

    def object_event(
        self, involved: dict, reason: str, message: str, type_: str = "Normal", component: str = "kubelet"
    ) -> None:
        """A core/v1 Event about any object (a pod, a Kueue Workload), from ``component``."""
        stamp = now()
        kubelet = component == "kubelet"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": involved["namespace"],
                "uid": str(uuid.uuid4()),
                "resourceVersion": self.bump(),
                "creationTimestamp": stamp,
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": {"component": component, **({"host": NODE_NAME} if kubelet else {})},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "type": type_,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if kubelet else "",
        }
        self.events.append(event)
        self.record("events", "ADDED", event)


def set_condition(obj: dict, type_: str, status: str, reason: str | None = None, message: str | None = None):
    """Set a pod condition; ``lastTransitionTime`` moves only when the status changes, as on a node."""
    conditions = obj["status"].setdefault("conditions", [])
    condition = next((c for c in conditions if c["type"] == type_), None)
    if condition is None:
        condition = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": now()}
        conditions.append(condition)
    elif condition["status"] != status:
        condition["lastTransitionTime"] = now()
    condition["status"] = status
    for key, value in (("reason", reason), ("message", message)):
        if value is None:
            condition.pop(key, None)
        else:
            condition[key] = value
