"""``KubernetesEmulator``: the one object tests use. It sets the cluster up, serves it, disrupts pods.

Everything a test may read or do is a public method here; tests never reach into the store.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from pathlib import Path

from .admission import parse_quantity
from .api import ApiServer
from .http import Handler
from .kubelet import Kubelet, kill_group
from .status import ApiError
from .store import NODE_NAME, POLL, PodRuntime, Store, now

BUILTIN_PRIORITY_CLASSES = {"system-cluster-critical": 2000000000, "system-node-critical": 2000001000}


class KubernetesEmulator:
    """A Kubernetes API server + kubelet emulator on 127.0.0.1 (see the package docstring)."""

    def __init__(self) -> None:
        self.token = "emulator-" + secrets.token_hex(8)
        self._tmp = Path(tempfile.mkdtemp(prefix="k8s-emulator-"))
        self._store = Store(self._tmp)
        self._kubelet = Kubelet(self._store)
        self._api = ApiServer(self._store, self._kubelet)
        self._server: ThreadingHTTPServer | None = None
        self.add_namespace("default")
        for name, value in BUILTIN_PRIORITY_CLASSES.items():
            self.add_priority_class(name, value)

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KubernetesEmulator:
        handler = type("Handler", (Handler,), {"api": self._api, "token": self.token})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL},
            name="k8s-emulator",
            daemon=True,
        ).start()
        return self

    def stop(self) -> None:
        """Kill every pod's process group, stop serving, remove the local directories."""
        store = self._store
        store.stopping.set()
        with store.lock:
            runtimes = list(store.pods.values())
            store.changed.notify_all()
        for runtime in runtimes:
            kill_group(runtime.run.proc, signal.SIGKILL)
        for runtime in runtimes:
            if runtime.run.proc is not None:
                with contextlib.suppress(Exception):
                    runtime.run.proc.wait(timeout=5)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for runtime in runtimes:
            if runtime.thread is not None:
                runtime.thread.join(timeout=2)
        if self._api.kueue.thread is not None:
            self._api.kueue.thread.join(timeout=5)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> KubernetesEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | os.PathLike) -> Path:
        """Write a kubeconfig (context ``emulator``, bearer token) for this server and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        return path

    # -------------------------------------------------------------------------------------- cluster setup

    def add_namespace(self, name: str) -> None:
        store = self._store
        with store.lock:
            store.namespaces[name] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": store.bump(),
                    "creationTimestamp": now(),
                    "labels": {"kubernetes.io/metadata.name": name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }

    def add_priority_class(
        self, name: str, value: int, preemption_policy: str = "PreemptLowerPriority"
    ) -> None:
        with self._store.lock:
            self._store.priority_classes[name] = {"value": int(value), "preemptionPolicy": preemption_policy}

    def add_resource_quota(self, namespace: str, name: str, hard: dict[str, str]) -> None:
        for resource, quantity in hard.items():
            parse_quantity(quantity)  # raise early on a typo in the test itself
            if "/" in resource and not resource.startswith("requests.") and resource != "count/pods":
                raise ValueError(f"extended resources are quota'd as requests.<name>, not {resource!r}")
        with self._store.lock:
            self._store.quotas.setdefault(namespace, {})[name] = {
                key: str(value) for key, value in hard.items()
            }

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """A Secret with plain (not base64) values; only the kubelet's process environment sees them."""
        with self._store.lock:
            self._store.secrets.setdefault(namespace, {})[name] = dict(data)
            self._store.changed.notify_all()  # a container waiting for it (CreateContainerConfigError) starts

    def add_persistent_volume_claim(self, namespace: str, name: str) -> Path:
        """A bound PVC; its local directory persists across pods (returned for assertions)."""
        with self._store.lock:
            directory = self._store.pvcs.get((namespace, name))
            if directory is None:
                directory = self._tmp / "pvc" / namespace / name
                directory.mkdir(parents=True, exist_ok=True)
                self._store.pvcs[(namespace, name)] = directory
            return directory

    # ------------------------------------------------------------------------------------------- Kueue

    def apply_kueue(self, obj: dict) -> dict:
        """Create or update a ``kueue.x-k8s.io/v1beta2`` ResourceFlavor, ClusterQueue, LocalQueue,
        WorkloadPriorityClass or Cohort; the first one installs Kueue (see ``kueue.py``).

        The object is validated strictly against its upstream CRD when ``../shared`` has it: an
        unknown field is a 400 ``ApiError``, any other schema error a 422. Returns it as stored.
        """
        return self._api.kueue.apply(obj)

    def apply_kueue_objects(self, objects: Iterable[dict]) -> list[dict]:
        """``apply_kueue`` for each, in order (flavors before the ClusterQueues that name them)."""
        return [self.apply_kueue(obj) for obj in objects]

    def configure_kueue(
        self, exclude_resource_prefixes: Iterable[str] = (), quota_check_strategy: str = "BlockUndeclared"
    ) -> None:
        """Kueue's manager Configuration ``resources``: which requests quota ignores.

        Upstream's default (``BlockUndeclared``, no prefixes) leaves a pod unadmitted when it requests
        a resource its ClusterQueue does not cover ("resource cpu unavailable in ClusterQueue");
        ``IgnoreUndeclared`` or ``exclude_resource_prefixes=["cpu", "memory"]`` count only the rest.
        """
        self._api.kueue.configure(list(exclude_resource_prefixes), quota_check_strategy)

    def delete_kueue(self, kind: str, name: str, namespace: str = "") -> None:
        self._api.kueue.delete(kind, name, namespace)

    def kueue_object(self, kind: str, name: str, namespace: str = "") -> dict | None:
        """A Kueue object as the API serves it (ClusterQueue/LocalQueue with their status), or None."""
        with self._store.lock:
            try:
                return self._api.kueue.read(kind, namespace, name)
            except ApiError:
                return None

    def workloads(self, namespace: str | None = None, include_deleted: bool = False) -> list[dict]:
        """Kueue's Workloads (copies), oldest first; with ``include_deleted`` the garbage-collected too."""
        kueue = self._api.kueue
        with self._store.lock:
            live = list(kueue.workloads.values())
            found = (kueue.deleted + live) if include_deleted else live
            return [
                copy.deepcopy(w)
                for w in sorted(found, key=kueue.order)
                if namespace in (None, w["metadata"]["namespace"])
            ]

    def workload_for_pod(self, namespace: str, pod_name: str) -> dict | None:
        """The Workload Kueue made for a live pod (found by its ``kueue.x-k8s.io/job-uid`` label)."""
        with self._store.lock:
            runtime = self._store.pods.get((namespace, pod_name))
            found = self._api.kueue.workload_of(runtime.obj["metadata"]["uid"]) if runtime else None
            return copy.deepcopy(found)

    def wait_for_workload(
        self, namespace: str, predicate: Callable[[dict], bool], timeout: float = 30
    ) -> dict:
        """Block until a Workload in ``namespace`` satisfies ``predicate`` (called with a copy)."""
        store = self._store
        deadline = time.monotonic() + timeout
        with store.lock:
            while True:
                for workload in self.workloads(namespace):
                    if predicate(workload):
                        return workload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no Workload in {namespace!r} matched within {timeout}s")
                store.changed.wait(min(remaining, POLL * 4))

    def admission_log(self) -> list[tuple[float, str, str, str, int]]:
        """Kueue's quota decisions in order: ``(monotonic time, "ns/workload", cluster queue, what, gpus)``.

        ``what`` is ``admitted`` (quota reserved), ``preempted`` (evicted for another workload) or
        ``finished`` (a workload that had been admitted ended). A workload holds its GPUs from
        ``admitted`` to its next ``preempted`` or ``finished``: what a GPU-busy-time benchmark sums.
        Times are ``time.monotonic()``, comparable with :meth:`container_runs`.
        """
        with self._store.lock:
            return list(self._api.kueue.log)

    # --------------------------------------------------------------------------- what tests read (hooks)

    @property
    def requests_log(self) -> list[tuple[str, str]]:
        """Every request received, as ``(method, path with query)``, in order (a copy)."""
        with self._store.lock:
            return list(self._store.requests)

    @property
    def unknown_routes(self) -> list[tuple[str, str]]:
        """Requests for paths the emulator does not serve (answered 404): empty if it lacked nothing."""
        with self._store.lock:
            return list(self._store.unknown_routes)

    def received_pods(self) -> list[dict]:
        """Every pod body POSTed to the API server, as the client sent it, refused ones too."""
        with self._store.lock:
            return copy.deepcopy(self._store.received_pods)

    def admitted_pods(self) -> list[dict]:
        """Every pod admitted, as it was at admission (defaults applied), deleted ones too."""
        with self._store.lock:
            return copy.deepcopy(self._store.admitted_pods)

    def pods(self, namespace: str) -> list[dict]:
        with self._store.lock:
            return [
                copy.deepcopy(r.obj) for (ns, _), r in sorted(self._store.pods.items()) if ns == namespace
            ]

    def pod(self, namespace: str, name: str) -> dict | None:
        with self._store.lock:
            runtime = self._store.pods.get((namespace, name))
            return copy.deepcopy(runtime.obj) if runtime else None

    def events(self, namespace: str, name: str | None = None) -> list[dict]:
        with self._store.lock:
            return [
                copy.deepcopy(e)
                for e in self._store.events
                if e["metadata"]["namespace"] == namespace and name in (None, e["involvedObject"]["name"])
            ]

    def logs(self, namespace: str, name: str) -> str:
        """The container's log; for a deleted pod too (the API answers 404; a log collector would not)."""
        with self._store.lock:
            runtime = self._store.pods.get((namespace, name)) or self._store.removed.get((namespace, name))
            if runtime is None:
                raise KeyError(f"{namespace}/{name}")
            return b"".join(line for _, line in runtime.run.lines).decode("utf-8", "replace")

    def process_environ(self, namespace: str, name: str) -> dict[str, str] | None:
        """The environment the pod's running process actually has (read from /proc); None if not running.

        Secrets reach a pod only here, so this is how a test proves the kubelet delivered them.
        """
        with self._store.lock:
            runtime = self._store.pods.get((namespace, name))
            proc = runtime.run.proc if runtime and runtime.running else None
        if proc is None:
            return None
        try:
            raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
        except OSError:
            return None
        return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)

    def wait_for_pod(self, namespace: str, predicate: Callable[[dict], bool], timeout: float = 30) -> dict:
        """Block until a pod in ``namespace`` satisfies ``predicate`` (called with a copy); return it."""
        store = self._store
        deadline = time.monotonic() + timeout
        with store.lock:
            while True:
                for (ns, _), runtime in sorted(store.pods.items()):
                    if ns == namespace:
                        snapshot = copy.deepcopy(runtime.obj)
                        if predicate(snapshot):
                            return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no pod in {namespace!r} matched within {timeout}s")
                store.changed.wait(min(remaining, POLL * 4))

    # ------------------------------------------------------------------------ how the cluster behaves

    def hold_scheduling(self) -> None:
        """No free GPU from now on: new pods stay Pending (``Unschedulable``) until released."""
        with self._store.lock:
            self._store.scheduling_held = True

    def release_scheduling(self) -> None:
        with self._store.lock:
            self._store.scheduling_held = False
            self._store.changed.notify_all()

    def set_deleted_pod_linger(self, seconds: float) -> None:
        """How long a deleted pod stays readable after its process ended (default 0.1 s; 0: at once)."""
        with self._store.lock:
            self._store.deleted_pod_linger = seconds

    def lose_create_responses(self, count: int = 1) -> None:
        """Admit the next ``count`` pod creations but answer each 504 Timeout, as if the reply was lost."""
        with self._store.lock:
            self._store.lose_create_responses = count

    def container_runs(self) -> list[dict]:
        """Every container process so far: pod ``uid``, ``name``, ``labels``, monotonic start and end.

        ``started`` and ``ended`` (None while running) let a test prove two processes never overlapped.
        """
        with self._store.lock:
            return copy.deepcopy(self._store.container_runs)

    # ---------------------------------------------------------------------------- what tests do to pods

    def create_pod(self, namespace: str, body: dict) -> dict:
        """Admit a pod directly, not over HTTP (so it is not among ``received_pods``)."""
        return self._api.create_pod(namespace, body)

    def delete_pod(self, namespace: str, name: str, grace: float | None = None) -> dict:
        return self._api.delete_pod(namespace, name, grace)

    def preempt(self, namespace: str, name: str, grace_seconds: float | None = None) -> dict:
        """Preempt a running pod as kube-scheduler does: DisruptionTarget, then a graceful DELETE.

        The pod is SIGTERMed, SIGKILLed after the grace period, and removed once its process has ended
        (after the linger, see :meth:`set_deleted_pod_linger`). Returns its last state.
        """
        return self._disrupt(
            namespace,
            name,
            grace_seconds,
            condition=(
                "DisruptionTarget",
                "PreemptionByScheduler",
                "preempting to accommodate a higher priority pod",
            ),
            event=("Preempted", f"Preempted by pod {uuid.uuid4()} on node {NODE_NAME}", "Normal"),
            delete=True,
        )

    def drain(self, namespace: str, name: str, grace_seconds: float | None = None) -> dict:
        """``kubectl drain`` (the Eviction API): DisruptionTarget ``EvictionByEvictionAPI``, then DELETE."""
        return self._disrupt(
            namespace,
            name,
            grace_seconds,
            condition=("DisruptionTarget", "EvictionByEvictionAPI", "Eviction API: evicting"),
            event=("Evicted", "Evicted by the Eviction API", "Warning"),
            delete=True,
        )

    def kueue_stop(
        self,
        namespace: str,
        name: str,
        reason: str = "WorkloadEvictedDueToPreempted",
        grace_seconds: float | None = None,
    ) -> dict:
        """Kueue stopping a pod's Workload: condition ``TerminationTarget`` (its stop reason), then DELETE."""
        return self._disrupt(
            namespace,
            name,
            grace_seconds,
            condition=("TerminationTarget", reason, "Preempted to accommodate a workload of higher priority"),
            event=("Stopped", f"Stopped by Kueue: {reason}", "Normal"),
            delete=True,
        )

    def evict(
        self, namespace: str, name: str, grace_seconds: float | None = None, resource: str = "memory"
    ) -> dict:
        """Node-pressure eviction by the kubelet: the pod object stays, Failed with reason ``Evicted``."""
        message = f"The node was low on resource: {resource}. "
        return self._disrupt(
            namespace,
            name,
            grace_seconds,
            condition=("DisruptionTarget", "TerminationByKubelet", message),
            event=("Evicted", message, "Warning"),
            status={"reason": "Evicted", "message": message},
        )

    def vanish(self, namespace: str, name: str) -> None:
        """Force-delete a pod (grace 0, as a node that is lost): gone now, its process killed."""
        with self._store.lock:
            runtime = self._store.runtime(namespace, name)
            self._store.remove(runtime)
            proc = runtime.run.proc
        kill_group(proc, signal.SIGKILL)

    def oom_kill(self, namespace: str, name: str) -> dict:
        """SIGKILL the pod's process as the kernel OOM killer would: terminated OOMKilled, exit 137."""
        with self._store.lock:
            runtime = self._kubelet.running_pod(namespace, name)
            runtime.run.kill_reason = "OOMKilled"
            message = f"Memory cgroup out of memory: Killed process in {name}"
            self._store.event(runtime, "OOMKilling", message, "Warning")
        kill_group(runtime.run.proc, signal.SIGKILL)
        return self._await_end(runtime)

    def _disrupt(  # noqa: PLR0917
        self,
        namespace: str,
        name: str,
        grace_seconds: float | None,
        condition: tuple[str, str, str],
        event: tuple[str, str, str],
        status: dict | None = None,
        delete: bool = False,
    ) -> dict:
        """Mark the pod (a condition and an event), then stop it: by DELETE, or in place with ``status``."""
        with self._store.lock:
            runtime = self._kubelet.running_pod(namespace, name)
            self._kubelet.mark_disrupted(runtime, condition, event, status)
            grace = runtime.obj["spec"].get("terminationGracePeriodSeconds", 30)
        grace = grace if grace_seconds is None else grace_seconds
        if delete:
            self._api.delete_pod(namespace, name, grace)
        else:
            self._kubelet.terminate_later(runtime, grace)
        return self._await_end(runtime)

    def _await_end(self, runtime: PodRuntime) -> dict:
        if runtime.thread is not None:
            runtime.thread.join()
        with self._store.lock:
            return copy.deepcopy(runtime.obj)
