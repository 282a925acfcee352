"""Kueue v0.19.2 for plain Pods: its objects, pod webhook, job and workload controllers, read API.

Installed by the first :meth:`Kueue.apply` (a cluster without Kueue ignores Kueue labels). Then:

* **Webhook** (``pod_webhook.go``, synchronous in pod admission): a pod with
  ``kueue.x-k8s.io/queue-name`` (or none while a LocalQueue ``default`` exists) gets label
  ``kueue.x-k8s.io/managed=true``, finalizer ``kueue.x-k8s.io/managed``, scheduling gates
  ``kueue.x-k8s.io/admission`` and ``kueue.x-k8s.io/topology`` (TAS is on by default) and the
  ``kueue.x-k8s.io/role-hash`` annotation.
* **Controllers** run in one background thread woken by every store change (like Kueue's
  informers, a few milliseconds after the API write): the pod reconciler (``jobframework``
  ``ReconcileGenericJob`` with the pod integration's ``Run``/``Stop``/``Finished``/``Finalize``),
  the workload controller's "why is it not queued" conditions, garbage collection of a Workload
  whose pod is gone, then a scheduling cycle (``kueue_scheduler``).
* **API**: the Kueue objects read-only under ``/apis/kueue.x-k8s.io/v1beta2`` (list, get, watch;
  ClusterQueue and LocalQueue ``status`` computed on read) and the visibility API's
  ``pendingworkloads``.
"""

from __future__ import annotations

import copy
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import kueue_schema
from .kueue_api import KueueReadApi
from .kueue_model import (
    ADMISSION_GATE,
    DEFAULT_LOCAL_QUEUE,
    MANAGED_LABEL,
    POD_FINALIZER,
    QUEUE_LABEL,
    ROLE_HASH_ANNOTATION,
    TOPOLOGY_GATE,
    UNMANAGED_NAMESPACES,
    condition,
    gpus,
    has_quota,
    is_finished,
    key,
    podset_requests,
    priority,
    role_hash,
    set_condition,
)
from .kueue_pods import PodController
from .kueue_scheduler import Scheduler
from .status import ApiError, not_found
from .store import POLL, PodRuntime, Store, now

if TYPE_CHECKING:
    from .api import ApiServer

API_VERSION = kueue_schema.API_VERSION


class Kueue(PodController, KueueReadApi):
    """Kueue's state and controllers over the store; every method runs under ``store.lock``."""

    def __init__(self, store: Store, api: ApiServer):
        self.store, self.api = store, api
        self.installed = False
        self.objects: dict[str, dict[tuple[str, str], dict]] = {kind: {} for kind in kueue_schema.KINDS}
        self.workloads = self.objects["Workload"]
        self.deleted: list[dict] = []  # garbage-collected Workloads, for tests
        self.log: list[tuple[float, str, str, str, int]] = []
        self.scheduler = Scheduler(self)
        self.thread: threading.Thread | None = None
        self._seq = 0
        self._order: dict[str, int] = {}  # uid -> creation order (timestamps have 1 s resolution)
        self._reserved: dict[str, int] = {}  # uid -> quota reservation order
        self._last_cq: dict[str, str] = {}  # uid -> the ClusterQueue it last reserved quota in
        self._victims: dict[str, set[str]] = {}  # preemptor pod uid -> pods preempted for it
        # The manager Configuration's ``resources`` (config.kueue.x-k8s.io/v1beta2), upstream's defaults.
        self.config: dict[str, Any] = {"excludeResourcePrefixes": [], "quotaCheckStrategy": "BlockUndeclared"}
        store.scheduling_blockers.append(self._waits_for_victims)

    # ------------------------------------------------------------------------------------------ setup

    def apply(self, obj: dict) -> dict:
        """Create or update a Kueue object after strict validation against its CRD (see kueue_schema)."""
        obj = copy.deepcopy(obj)
        kueue_schema.validate(obj)
        kind = obj["kind"]
        if kind == "Workload":
            raise ApiError(400, "Workloads are created by Kueue's pod integration; apply pods instead")
        if kueue_schema.available():
            kueue_schema.schema("Workload")  # loaded now, outside the lock, for the Workloads to come
        kueue_schema.apply_defaults(obj)
        namespaced = kueue_schema.KINDS[kind][1]
        meta = obj["metadata"]
        namespace = (
            meta.setdefault("namespace", "default") if namespaced else meta.pop("namespace", None) or ""
        )
        store = self.store
        with store.lock:
            if namespaced and namespace not in store.namespaces:
                raise not_found("namespaces", namespace)
            old = self.objects[kind].get((namespace, meta["name"]))
            if (
                kind == "LocalQueue"
                and old
                and old["spec"].get("clusterQueue") != obj["spec"].get("clusterQueue")
            ):
                message = f'LocalQueue.kueue.x-k8s.io "{meta["name"]}" is invalid: spec.clusterQueue'
                raise ApiError(422, f"{message}: field is immutable")
            obj.pop("status", None)
            generation = (
                1 if old is None else old["metadata"]["generation"] + (old.get("spec") != obj.get("spec"))
            )
            meta.update(
                uid=old["metadata"]["uid"] if old else str(uuid.uuid4()),
                creationTimestamp=old["metadata"]["creationTimestamp"] if old else now(),
                generation=generation,
                resourceVersion=store.bump(),
            )
            self.objects[kind][(namespace, meta["name"])] = obj
            store.record(kueue_schema.KINDS[kind][0], "MODIFIED" if old else "ADDED", obj)
            self.scheduler.inadmissible.clear()
            self._install()
            return self.read(kind, namespace, meta["name"])

    def configure(self, exclude_resource_prefixes: list[str], quota_check_strategy: str) -> None:
        """The Configuration's ``resources`` section, validated as ``pkg/config/validation.go`` does."""
        if quota_check_strategy not in ("BlockUndeclared", "IgnoreUndeclared"):
            raise ValueError(f"resources.quotaCheckStrategy: Unsupported value: {quota_check_strategy!r}")
        if exclude_resource_prefixes and quota_check_strategy == "IgnoreUndeclared":
            raise ValueError(
                'resources.quotaCheckStrategy: Invalid value: "IgnoreUndeclared": excludeResourcePrefixes is '
                "not allowed when quotaCheckStrategy is IgnoreUndeclared"
            )
        with self.store.lock:
            self.config = {
                "excludeResourcePrefixes": list(exclude_resource_prefixes),
                "quotaCheckStrategy": quota_check_strategy,
            }
            self.scheduler.inadmissible.clear()
            self.store.bump()
            self.store.changed.notify_all()

    def requests(self, podset: dict) -> dict[str, int]:
        """A PodSet's requests as ``workload.Info`` counts them: without ``excludeResourcePrefixes``."""
        prefixes = tuple(self.config["excludeResourcePrefixes"])
        return {r: v for r, v in podset_requests(podset).items() if not (prefixes and r.startswith(prefixes))}

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        with self.store.lock:
            obj = self.objects[kind].pop((namespace, name), None)
            if obj is None:
                raise KeyError(f"{kind} {namespace}/{name}")
            obj["metadata"]["resourceVersion"] = self.store.bump()
            self.store.record(kueue_schema.KINDS[kind][0], "DELETED", obj)
            self.scheduler.inadmissible.clear()

    def _install(self) -> None:
        if self.installed:
            return
        self.installed = True
        self.thread = threading.Thread(target=self._run, name="kueue-manager", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------------------------------- webhook

    def webhook(self, pod: dict) -> None:
        """``PodWebhook.Default`` + ``ValidateCreate``: gate a pod that names a LocalQueue."""
        meta = pod["metadata"]
        if not self.installed or meta["namespace"] in UNMANAGED_NAMESPACES:
            return
        labels = meta.setdefault("labels", {})
        if labels.get(MANAGED_LABEL, "true") != "true":
            raise ApiError(
                403,
                f'admission webhook "vpod.kb.io" denied the request: metadata.labels[{MANAGED_LABEL}]: '
                "Forbidden: managed label value can only be 'true'",
            )
        if "kueue.x-k8s.io/pod-group-name" in labels or "kueue.x-k8s.io/pod-group-name" in (
            meta.get("annotations") or {}
        ):
            raise ApiError(
                400, f"the Kubernetes emulator does not run Kueue pod groups (pod {meta['name']!r})"
            )
        if (
            not labels.get(QUEUE_LABEL)
            and (meta["namespace"], DEFAULT_LOCAL_QUEUE) in self.objects["LocalQueue"]
        ):
            labels[QUEUE_LABEL] = DEFAULT_LOCAL_QUEUE
        if not labels.get(QUEUE_LABEL):
            if not labels:
                meta.pop("labels")
            return
        labels[MANAGED_LABEL] = "true"
        finalizers = meta.setdefault("finalizers", [])
        if POD_FINALIZER not in finalizers:
            finalizers.append(POD_FINALIZER)
        gates = pod["spec"].setdefault("schedulingGates", [])
        for gate in (ADMISSION_GATE, TOPOLOGY_GATE):
            if not any(g["name"] == gate for g in gates):
                gates.append({"name": gate})
        meta.setdefault("annotations", {}).setdefault(ROLE_HASH_ANNOTATION, role_hash(pod["spec"]))

    # --------------------------------------------------------------------------------- the controllers

    def _run(self) -> None:
        store, seen = self.store, -1
        with store.lock:
            while not store.stopping.is_set():
                if store.rv == seen:
                    store.changed.wait(POLL * 4)
                    continue
                seen = store.rv
                try:
                    for _ in range(50):  # to a fixpoint: a stopped pod is finalized before the next cycle
                        before = store.rv
                        self._reconcile()
                        if store.rv == before:
                            break
                    self.scheduler.cycle()
                except Exception:  # never let the manager die silently: the test would only hang
                    traceback.print_exc()

    def _reconcile(self) -> None:
        pods = {r.obj["metadata"]["uid"]: r for r in self.store.pods.values()}
        for runtime in list(pods.values()):
            labels = runtime.obj["metadata"].get("labels") or {}
            if labels.get(MANAGED_LABEL) == "true" and labels.get(QUEUE_LABEL):  # else Skip / ignored
                self.reconcile_pod(runtime)
        for wl in list(self.workloads.values()):
            self._reconcile_workload(wl, pods)

    def _reconcile_workload(self, wl: dict, pods: dict[str, PodRuntime]) -> None:
        """Garbage collection of an orphan, and the workload controller's queue blockers (legacy)."""
        owner = wl["metadata"]["ownerReferences"][0]["uid"]
        if owner not in pods:  # the pod is gone: the garbage collector deletes its dependents
            self._finish(wl, "OwnerNotFound", "The workload's owner no longer exists")
            self._remove_finalizer(wl)
            del self.workloads[(wl["metadata"]["namespace"], wl["metadata"]["name"])]
            wl["metadata"]["resourceVersion"] = self.store.bump()
            self.store.record("workloads", "DELETED", wl)
            self.deleted.append(copy.deepcopy(wl))
            return
        if is_finished(wl) or has_quota(wl):
            return
        blocker = self._queue_blocker(wl)
        if blocker and set_condition(wl, "QuotaReserved", False, "Inadmissible", blocker):
            self.touch(wl)

    def _queue_blocker(self, wl: dict) -> str | None:
        queue = wl["spec"]["queueName"]
        lq = self.objects["LocalQueue"].get((wl["metadata"]["namespace"], queue))
        if lq is None:
            return f"LocalQueue {queue} doesn't exist"
        if lq["spec"].get("stopPolicy", "None") != "None":
            return f"LocalQueue {queue} is inactive"
        cq_name = lq["spec"]["clusterQueue"]
        if ("", cq_name) not in self.objects["ClusterQueue"]:
            return f"ClusterQueue {cq_name} doesn't exist"
        if self.inactive_reason(cq_name):
            return f"ClusterQueue {cq_name} is inactive"
        return None

    # ------------------------------------------------------------------------- what the scheduler reads

    def cluster_queue(self, name: str) -> dict:
        return self.objects["ClusterQueue"][("", name)]

    def cluster_queues(self) -> dict[str, dict]:
        return {name: obj for (_, name), obj in self.objects["ClusterQueue"].items()}

    def cohorts(self) -> dict[str, dict]:
        return {name: obj for (_, name), obj in self.objects["Cohort"].items()}

    def flavor(self, name: str) -> dict | None:
        return self.objects["ResourceFlavor"].get(("", name))

    def inactive_reason(self, cq_name: str) -> tuple[str, str] | None:
        """``clusterQueue.inactiveReason`` for the causes the emulator has: stopped, missing flavors."""
        spec = self.cluster_queue(cq_name)["spec"]
        messages, reasons = [], []
        if spec.get("stopPolicy", "None") != "None":
            reasons.append("Stopped")
            messages.append("is stopped")
        missing = [
            f["name"]
            for g in spec.get("resourceGroups") or []
            for f in g.get("flavors") or []
            if not self.flavor(f["name"])
        ]
        if missing:
            reasons.append("FlavorNotFound")
            messages.append(f"references missing ResourceFlavor(s): {','.join(missing)}")
        if not reasons:
            return None
        return reasons[0], f"Can't admit new workloads: {', '.join(messages)}."

    def namespace_selected(self, wl: dict, cq_name: str) -> bool:
        """The ClusterQueue's ``namespaceSelector``: unset selects nothing, ``{}`` every namespace."""
        selector = self.cluster_queue(cq_name)["spec"].get("namespaceSelector")
        if selector is None:
            return False
        namespace = self.store.namespaces.get(wl["metadata"]["namespace"])
        labels = (namespace or {}).get("metadata", {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
            return False
        for expression in selector.get("matchExpressions") or []:
            value, values = labels.get(expression["key"]), expression.get("values") or []
            operator = expression["operator"]
            if (
                (operator == "In" and value not in values)
                or (operator == "NotIn" and value in values)
                or (operator == "Exists" and value is None)
                or (operator == "DoesNotExist" and value is not None)
            ):
                return False
        return True

    def local_queue_cq(self, wl: dict) -> str | None:
        lq = self.objects["LocalQueue"].get((wl["metadata"]["namespace"], wl["spec"]["queueName"]))
        return lq["spec"]["clusterQueue"] if lq else None

    def reserving(self) -> list[tuple[dict, str]]:
        return [(w, self.cq_of(w)) for w in self.workloads.values() if has_quota(w) and not is_finished(w)]

    def pending_by_cluster_queue(self, active_only: bool = True) -> dict[str, list[dict]]:
        """Each ClusterQueue's queue, as upstream orders it: priority, then creation (FIFO)."""
        queues: dict[str, list[dict]] = {}
        for wl in self.workloads.values():
            if is_finished(wl) or has_quota(wl) or (self._queue_blocker(wl) and active_only):
                continue
            cq_name = self.local_queue_cq(wl)
            if cq_name is None or ("", cq_name) not in self.objects["ClusterQueue"]:
                continue
            lq = self.objects["LocalQueue"][(wl["metadata"]["namespace"], wl["spec"]["queueName"])]
            if lq["spec"].get("stopPolicy", "None") != "None":
                continue
            queues.setdefault(cq_name, []).append(wl)
        for pending in queues.values():
            pending.sort(key=lambda w: (-priority(w), self.order(w)))
        return queues

    def order(self, wl: dict) -> tuple[str, int]:
        return wl["metadata"]["creationTimestamp"], self._order.get(wl["metadata"]["uid"], 0)

    def candidate_order(self, cq_name: str) -> Callable[[dict], tuple]:
        """``CandidatesOrdering``: other ClusterQueues first, lower priority, most recently reserved."""

        def order(wl: dict) -> tuple:
            reserved = condition(wl, "QuotaReserved")
            stamp = reserved["lastTransitionTime"] if reserved else now()
            return (
                self.cq_of(wl) == cq_name,
                priority(wl),
                _negate(stamp),
                -self._reserved.get(wl["metadata"]["uid"], 0),
                wl["metadata"]["uid"],
            )

        return order

    def usage(self, wl: dict) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        podsets = {ps["name"]: ps for ps in wl["spec"]["podSets"]}
        for psa in (wl["status"].get("admission") or {}).get("podSetAssignments") or []:
            requests = self.requests(podsets[psa["name"]])
            for res, flavor in (psa.get("flavors") or {}).items():
                out[(flavor, res)] = out.get((flavor, res), 0) + requests.get(res, 0)
        return out

    def cq_of(self, wl: dict) -> str:
        return (wl["status"].get("admission") or {}).get("clusterQueue", "")

    def cq_path(self, cq_name: str) -> str:
        """``buildCQPath``: ``/<root cohort>/.../<cluster queue>``."""
        parts, cohort = [cq_name], self.cluster_queue(cq_name)["spec"].get("cohortName")
        while cohort and len(parts) < 16:
            parts.append(cohort)
            obj = self.objects["Cohort"].get(("", cohort))
            cohort = obj["spec"].get("parentName") if obj else None
        return "/" + "/".join(reversed(parts))

    # ------------------------------------------------------------------------ what the scheduler does

    def touch(self, wl: dict) -> None:
        wl["metadata"]["resourceVersion"] = self.store.bump()
        self.store.record("workloads", "MODIFIED", wl)

    def event(
        self, wl: dict, reason: str, message: str, type_: str = "Normal", component: str = "kueue-admission"
    ) -> None:
        meta = wl["metadata"]
        involved = {
            "kind": "Workload",
            "apiVersion": API_VERSION,
            **{k: meta[k] for k in ("namespace", "name", "uid")},
        }
        self.store.object_event(involved, reason, message[:1024], type_, component)

    def admitted(self, wl: dict, cq_name: str) -> None:
        self._seq += 1
        self._reserved[wl["metadata"]["uid"]] = self._seq
        self._last_cq[wl["metadata"]["uid"]] = cq_name
        self.log.append((time.monotonic(), key(wl), cq_name, "admitted", gpus(wl)))

    def preempted(self, target: dict, preemptor: dict) -> None:
        self.log.append((time.monotonic(), key(target), self.cq_of(target), "preempted", gpus(target)))
        owner = preemptor["metadata"]["ownerReferences"][0]["uid"]
        self._victims.setdefault(owner, set()).add(target["metadata"]["ownerReferences"][0]["uid"])


def _negate(stamp: str) -> tuple[int, ...]:
    """A timestamp key that sorts the most recent first."""
    return tuple(-ord(char) for char in stamp)
