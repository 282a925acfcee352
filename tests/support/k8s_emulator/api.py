"""The API server's verbs on pods and events (Kueue's in kueue.py): each HTTP route's work, without HTTP.

Objects leave the store only as deep copies, so a caller can never change cluster state by
mutating what it was given (the real server's answers are serialized copies too).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from . import admission
from .kubelet import Kubelet
from .kueue import Kueue
from .selectors import field_selector, label_selector
from .status import ApiError, invalid, not_found
from .store import POLL, PodRuntime, Store, now, set_condition

MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
UNSUPPORTED_LOG_OPTIONS = ("sinceTime", "limitBytes")


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1", "yes")


class ApiServer:
    """The verbs the HTTP routes call; admission runs in :meth:`create_pod`."""

    def __init__(self, store: Store, kubelet: Kubelet):
        self.store = store
        self.kubelet = kubelet
        self.kueue = Kueue(store, self)  # inert until the first Kueue object is applied

    # ------------------------------------------------------------------------------------------ pods

    def create_pod(self, namespace: str, body: Any) -> dict:
        """Admit a pod (see admission.py for the order) and hand it to the kubelet; answers it Pending."""
        if not isinstance(body, dict):
            raise ApiError(400, "the object provided is unrecognized (must be of type Pod)")
        store, pod = self.store, copy.deepcopy(body)
        pod.setdefault("apiVersion", "v1")
        pod.setdefault("kind", "Pod")
        name = pod.setdefault("metadata", {}).get("name") or ""
        admission.validate(pod)
        with store.lock:
            if namespace not in store.namespaces:
                raise not_found("namespaces", namespace)
            admission.apply_defaults(pod, namespace)
            admission.admit_priority(pod, store.priority_classes)
            self.kueue.webhook(pod)  # a mutating webhook: after the built-in mutating plugins
            if pod["spec"].get("schedulingGates"):  # the pod strategy's PrepareForCreate
                message = "Scheduling is blocked due to non-empty scheduling gates"
                set_condition(pod, "PodScheduled", "False", "SchedulingGated", message)
            used = admission.namespace_usage(r.obj for (ns, _), r in store.pods.items() if ns == namespace)
            admission.admit_quota(pod, store.quotas.get(namespace, {}), used)
            if (namespace, name) in store.pods:
                raise ApiError(409, f'pods "{name}" already exists', details={"name": name, "kind": "pods"})
            runtime = PodRuntime(
                pod, store.root / "pods" / namespace / f"{name}-{pod['metadata']['uid'][:8]}"
            )
            store.pods[(namespace, name)] = runtime
            pod["metadata"]["resourceVersion"] = store.bump()
            store.record("pods", "ADDED", pod)
            store.admitted_pods.append(copy.deepcopy(pod))
            response = copy.deepcopy(pod)
        self.kubelet.start(runtime)
        return response

    def get_pod(self, namespace: str, name: str) -> dict:
        with self.store.lock:
            return copy.deepcopy(self.store.runtime(namespace, name).obj)

    def delete_pod(self, namespace: str, name: str, grace: float | None) -> dict:
        """Graceful deletion: marked, its process stopped within the grace period, then gone."""
        store = self.store
        with store.lock:
            runtime = store.runtime(namespace, name)
            meta = runtime.obj["metadata"]
            grace = runtime.obj["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now()
                meta["deletionGracePeriodSeconds"] = int(grace)
                store.touch(runtime)
            snapshot = copy.deepcopy(runtime.obj)
            if not runtime.running:
                store.remove(runtime)
                return snapshot
        self.kubelet.terminate_later(runtime, grace)  # the kubelet removes it when the process has ended
        return snapshot

    def patch_pod(self, namespace: str, name: str, content_type: str, patch: Any) -> dict:
        """A (strategic-)merge patch of ``metadata.labels``/``annotations``: what the pod operator sends."""
        if content_type not in MERGE_PATCHES or not isinstance(patch, dict):
            raise ApiError(415, f"the emulator accepts only {' or '.join(MERGE_PATCHES)} objects")
        metadata = patch.get("metadata") or {}
        if set(patch) - {"metadata"} or set(metadata) - {"labels", "annotations"}:
            raise invalid(
                name,
                "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only "
                "additions to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be "
                "set to 1 if it was previously negative)",
            )
        with self.store.lock:
            runtime = self.store.runtime(namespace, name)
            updated = _merge_patch(runtime.obj["metadata"], metadata)
            causes = [
                c
                for c in admission.semantic_errors({"metadata": updated})
                if c["field"].startswith("metadata")
            ]
            if causes:
                raise invalid(name, f"{causes[0]['field']}: {causes[0]['message']}", causes)
            for key in ("labels", "annotations"):
                if updated.get(key) is None:
                    runtime.obj["metadata"].pop(key, None)
                else:
                    runtime.obj["metadata"][key] = updated[key]
            self.store.touch(runtime)
            return copy.deepcopy(runtime.obj)

    # ---------------------------------------------------------------------------------- list and watch

    def list(
        self, resource: str, namespace: str | None, query: dict[str, str]
    ) -> tuple[list[dict], str, Callable]:
        """The matching pods or events, the list's resourceVersion, and the filter a watch goes on with."""
        if resource not in ("pods", "events"):  # a Kueue resource (kueue.py serves those)
            with self.store.lock:
                return self.kueue.list(resource, namespace, query)
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(query.get("fieldSelector", ""), resource)

        def matches(obj: dict) -> bool:
            return (
                obj["metadata"].get("namespace") == namespace
                and labels(obj["metadata"].get("labels"))
                and fields(obj)
            )

        with self.store.lock:
            if resource == "pods":
                source = [runtime.obj for _, runtime in sorted(self.store.pods.items())]
            else:
                source = self.store.events
            return [copy.deepcopy(o) for o in source if matches(o)], str(self.store.rv), matches

    def watch(
        self,
        resource: str,
        matches: Callable[[dict], bool],
        since: int | None,
        initial: list[dict],
        timeout: float,
    ) -> Iterator[dict]:
        """``initial`` as ADDED, then the changes after resourceVersion ``since``, until ``timeout``.

        ``{}`` is a heartbeat: it lets the writer notice a closed connection.
        """
        store = self.store
        for obj in initial:
            yield {"type": "ADDED", "object": obj}
        with store.lock:
            position = 0 if since is not None else len(store.changes)
        deadline = time.monotonic() + timeout
        while not store.stopping.is_set() and time.monotonic() < deadline:
            with store.lock:
                batch = store.changes[position:]
                position = len(store.changes)
                if not batch:
                    store.changed.wait(min(POLL * 4, max(0.0, deadline - time.monotonic())))
                    continue
            for rv, res, kind, obj in batch:
                if res == resource and rv > (since or 0) and matches(obj):
                    yield {"type": kind, "object": obj}
            yield {}

    # ------------------------------------------------------------------------------------------- logs

    def log(self, namespace: str, name: str, query: dict[str, str]) -> Iterator[bytes]:
        """The container's log (``sinceSeconds``, ``tailLines``, ``timestamps``, ``follow``).

        ``sinceSeconds`` is how the deferrable operator reads only the lines it has not shown yet.
        A container that has not started is a 400, as on the real server.
        """
        store = self.store
        unsupported = [option for option in UNSUPPORTED_LOG_OPTIONS if option in query]
        if truthy(query.get("previous")):
            unsupported.append("previous")
        if unsupported:
            raise ApiError(400, f"the Kubernetes emulator does not support the log options {unsupported}")
        with store.lock:
            runtime = store.runtime(namespace, name)
            run = runtime.run
            if query.get("container") not in (None, run.name):
                raise ApiError(400, f"container {query['container']} is not valid for pod {name}")
            if not (run.started or run.finished):
                state = runtime.obj["status"].get("containerStatuses", [{}])[0].get("state", {})
                reason = (state.get("waiting") or {}).get("reason", "ContainerCreating")
                raise ApiError(400, f'container "{run.name}" in pod "{name}" is waiting to start: {reason}')
            lines = list(run.lines)
            if query.get("sinceSeconds"):
                since_ns = time.time_ns() - int(query["sinceSeconds"]) * 1_000_000_000
                lines = [entry for entry in lines if entry[0] >= since_ns]
            if query.get("tailLines"):
                tail = int(query["tailLines"])
                lines = lines[-tail:] if tail > 0 else []
            position = len(run.lines)
        return self._stream_log(
            runtime, lines, position, truthy(query.get("timestamps")), truthy(query.get("follow"))
        )

    def _stream_log(
        self,
        runtime: PodRuntime,
        lines: list[tuple[int, bytes]],
        position: int,
        timestamps: bool,
        follow: bool,
    ) -> Iterator[bytes]:
        store, run = self.store, runtime.run

        def render(entry: tuple[int, bytes]) -> bytes:
            return (_log_timestamp(entry[0]).encode() + b" " + entry[1]) if timestamps else entry[1]

        yield from (render(entry) for entry in lines)
        while follow and not store.stopping.is_set():
            with store.lock:
                batch = run.lines[position:]
                position = len(run.lines)
                done = run.finished or runtime.gone
                if not batch and not done:
                    store.changed.wait(POLL * 4)
                    continue
            yield from (render(entry) for entry in batch)
            if done and not batch:
                return
            if not batch:
                yield b""


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 merge (``null`` deletes); strategic-merge directives (``$patch``, ...) are ignored."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _log_timestamp(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
