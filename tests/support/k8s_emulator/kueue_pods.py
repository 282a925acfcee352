"""Kueue's pod integration: the job reconciler's side of a plain Pod (``pkg/controller/jobs/pod``).

``reconcile_pod`` follows ``jobframework.ReconcileGenericJob`` in its order of checks: a pod being
deleted is finalized (its Workload finished ``OwnerNotFound``, the finalizers dropped); a finished
Workload or pod releases the pod; a pod without a Workload gets one (``ConstructComposableWorkload``
+ ``ExtractPriority``); an evicted Workload stops its pod (``Pod.Stop``) and loses its reservation
at once (a single pod is never "active"); an admitted one starts it (``Pod.Run``).
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

from . import kueue_schema
from .admission import DNS1123_LABEL
from .kueue_model import (
    ADMISSION_GATE,
    CLUSTER_QUEUE_LABEL,
    DEFAULT_PODSET,
    JOB_COMPONENT,
    JOB_UID_LABEL,
    LOCAL_QUEUE_LABEL,
    POD_FINALIZER,
    POD_INDEX_LABEL,
    PODSET_LABEL,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    RESOURCE_IN_USE_FINALIZER,
    TOPOLOGY_GATE,
    WORKLOAD_ANNOTATION,
    condition,
    gpus,
    has_quota,
    is_admitted,
    is_evicted,
    is_finished,
    key,
    set_condition,
    unset_quota_reservation,
    workload_name,
)
from .store import PodRuntime, now


class PodController:
    """Mixed into :class:`~.kueue.Kueue`; runs under ``store.lock`` in Kueue's manager thread."""

    def reconcile_pod(self, runtime: PodRuntime) -> None:
        """``ReconcileGenericJob`` for a single pod, in upstream's order of checks."""
        pod = runtime.obj
        meta, status = pod["metadata"], pod["status"]
        wl = self.workload_of(meta["uid"])
        if meta.get("deletionTimestamp"):  # Load(): finalize
            if wl is not None:
                self._finish(wl, "OwnerNotFound", "The workload's owner no longer exists")
                self._remove_finalizer(wl)
            self.store.remove_finalizer(runtime, POD_FINALIZER)
            return
        if wl is not None and is_finished(wl):
            if POD_FINALIZER in (meta.get("finalizers") or []):
                self.store.event(
                    runtime,
                    "FinishedWorkload",
                    f"Workload '{key(wl)}' is declared finished",
                    component=JOB_COMPONENT,
                )
                self.store.remove_finalizer(runtime, POD_FINALIZER)
            self._remove_finalizer(wl)
            return
        if status.get("phase") in ("Succeeded", "Failed"):
            if wl is not None:
                reason = "Succeeded" if status["phase"] == "Succeeded" else "Failed"
                self._finish(wl, reason, status.get("message", ""))
                self.store.event(
                    runtime,
                    "FinishedWorkload",
                    f"Workload '{key(wl)}' is declared finished",
                    component=JOB_COMPONENT,
                )
            self.store.remove_finalizer(runtime, POD_FINALIZER)
            return
        if wl is None:
            self._create_workload(runtime)
            return
        gated = any(g["name"] == ADMISSION_GATE for g in pod["spec"].get("schedulingGates") or [])
        evicted = condition(wl, "Evicted")
        if evicted is not None and evicted["status"] == "True":
            if not gated:
                self._stop(runtime, f"WorkloadEvictedDueTo{evicted['reason']}", evicted["message"])
            if has_quota(wl):  # a single pod is never "active": the reservation goes at once
                set_condition(wl, "Requeued", False, evicted["reason"], evicted["message"])
                unset_quota_reservation(wl, "Pending", evicted["message"])
                self.touch(wl)
                self.scheduler.inadmissible.clear()
            return
        if gated:
            if is_admitted(wl):
                self._start(runtime, wl)
            return
        if not is_admitted(wl):
            self._stop(runtime, "NotAdmitted", "Not admitted by cluster queue")

    def _create_workload(self, runtime: PodRuntime) -> None:
        """``ConstructComposableWorkload`` + ``prepareWorkload`` for one pod, then ``CreatedWorkload``."""
        pod = runtime.obj
        meta = pod["metadata"]
        try:
            ref, value = self._priority(pod)
        except LookupError:  # the reconciler returns the error and retries: no Workload, no event
            return
        namespace = meta["namespace"]
        spec: dict[str, Any] = {
            "active": True,
            "podSets": [
                {
                    "count": 1,
                    "name": DEFAULT_PODSET,
                    "template": {"metadata": {}, "spec": copy.deepcopy(pod["spec"])},
                    "topologyRequest": {"podIndexLabel": POD_INDEX_LABEL},
                }
            ],
            "priority": value,
            "queueName": meta["labels"][QUEUE_LABEL],
        }
        if ref is not None:
            spec["priorityClassRef"] = ref
        wl = {
            "apiVersion": kueue_schema.API_VERSION,
            "kind": "Workload",
            "metadata": {
                "name": workload_name(meta["name"], meta["uid"]),
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": self.store.bump(),
                "generation": 1,
                "creationTimestamp": now(),
                "labels": {JOB_UID_LABEL: meta["uid"]},
                "finalizers": [RESOURCE_IN_USE_FINALIZER],
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
            "status": {},
        }
        kueue_schema.apply_defaults(wl)
        self._seq += 1
        self._order[wl["metadata"]["uid"]] = self._seq
        self.workloads[(namespace, wl["metadata"]["name"])] = wl
        self.store.record("workloads", "ADDED", wl)
        self.store.event(runtime, "CreatedWorkload", f"Created Workload: {key(wl)}", component=JOB_COMPONENT)

    def _priority(self, pod: dict) -> tuple[dict | None, int]:
        """``ExtractPriority``: the WorkloadPriorityClass label, else the pod's PriorityClass, else 0."""
        wpc_name = pod["metadata"]["labels"].get(PRIORITY_LABEL)
        if wpc_name:
            wpc = self.objects["WorkloadPriorityClass"].get(("", wpc_name))
            if wpc is None:
                raise LookupError(f'workloadpriorityclasses.kueue.x-k8s.io "{wpc_name}" not found')
            return {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass", "name": wpc_name}, wpc[
                "value"
            ]
        class_name = pod["spec"].get("priorityClassName")
        if class_name:  # admission guaranteed it exists
            value = self.store.priority_classes[class_name]["value"]
            return {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": class_name}, value
        return None, 0  # no globalDefault PriorityClass in the emulator

    def _start(self, runtime: PodRuntime, wl: dict) -> None:
        """``Pod.Run``: merge the PodSetInfo (flavor node labels and tolerations, labels), ungate."""
        pod = runtime.obj
        meta, spec = pod["metadata"], pod["spec"]
        admission = wl["status"]["admission"]
        assignment = admission["podSetAssignments"][0]
        node_selector: dict[str, str] = {}
        tolerations: list[dict] = []
        for flavor_name in dict.fromkeys(assignment.get("flavors", {}).values()):
            flavor = self.flavor(flavor_name) or {"spec": {}}
            node_selector.update(flavor["spec"].get("nodeLabels") or {})
            tolerations += flavor["spec"].get("tolerations") or []
        labels = {PODSET_LABEL: assignment["name"], LOCAL_QUEUE_LABEL: wl["spec"]["queueName"]}
        if DNS1123_LABEL.match(admission["clusterQueue"]) and len(admission["clusterQueue"]) <= 63:
            labels[CLUSTER_QUEUE_LABEL] = admission["clusterQueue"]
        annotations = {WORKLOAD_ANNOTATION: wl["metadata"]["name"]}
        for what, current, new in (
            ("annotations", meta.get("annotations") or {}, annotations),
            ("labels", meta.get("labels") or {}, labels),
            ("nodeSelector", spec.get("nodeSelector") or {}, node_selector),
        ):
            for name, value in current.items():
                if name in new and new[name] != value:
                    conflict = f"conflict for key={name}, value1={value}, value2={new[name]}"
                    message = f"invalid admission check PodSetUpdate: conflict for {what}: {conflict}"
                    self._finish(wl, "FailedToStart", message)
                    return
        meta.setdefault("annotations", {}).update(annotations)
        meta.setdefault("labels", {}).update(labels)
        if node_selector:
            spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **node_selector}
        existing = spec.setdefault("tolerations", [])
        existing += [t for t in tolerations if t not in existing]
        spec["schedulingGates"] = [
            g for g in spec.get("schedulingGates") or [] if g["name"] not in (ADMISSION_GATE, TOPOLOGY_GATE)
        ]
        if not spec["schedulingGates"]:
            del spec["schedulingGates"]
        self.store.touch(runtime)
        message = f"Admitted by clusterQueue {admission['clusterQueue']}"
        self.store.event(runtime, "Started", message, component=JOB_COMPONENT)

    def _stop(self, runtime: PodRuntime, reason: str, message: str) -> None:
        """``Pod.Stop``: condition ``TerminationTarget`` (the stop reason), DELETE, event ``Stopped``."""
        pod = runtime.obj
        if pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") in ("Succeeded", "Failed"):
            return
        self.api.kubelet.mark_disrupted(
            runtime,
            ("TerminationTarget", reason, message),
            ("Stopped", message, "Normal"),
            component=JOB_COMPONENT,
        )
        namespace, name = runtime.key
        self.api.delete_pod(namespace, name, None)

    def _finish(self, wl: dict, reason: str, message: str) -> None:
        """``workloadfinish.Finish``: Finished True once; the quota goes with it."""
        if is_finished(wl):
            return
        held = has_quota(wl)
        set_condition(wl, "Finished", True, reason, message)
        self.touch(wl)
        if held or is_evicted(wl):
            cq_name = self._last_cq.get(wl["metadata"]["uid"], "")
            self.log.append((time.monotonic(), key(wl), cq_name, "finished", gpus(wl)))
        if held:
            self.scheduler.inadmissible.clear()

    def _remove_finalizer(self, wl: dict) -> None:
        finalizers = wl["metadata"].get("finalizers") or []
        if RESOURCE_IN_USE_FINALIZER in finalizers:
            finalizers.remove(RESOURCE_IN_USE_FINALIZER)
            if not finalizers:
                del wl["metadata"]["finalizers"]
            self.touch(wl)

    def _waits_for_victims(self, runtime: PodRuntime) -> bool:
        """kube-scheduler's stand-in: the pods preempted for this one still hold the node's resources."""
        victims = self._victims.get(runtime.obj["metadata"]["uid"])
        if not victims:
            return False
        alive = {r.obj["metadata"]["uid"] for r in self.store.pods.values()}
        victims &= alive
        return bool(victims)
