"""Kueue's read API: the objects under ``/apis/kueue.x-k8s.io/v1beta2`` and the visibility API.

ClusterQueue and LocalQueue ``status`` is computed on read (the Active condition and the workload
counts; ``flavorsUsage``/``flavorsReservation`` are left out). ``pendingworkloads`` follows
``pkg/visibility/storage``: the ClusterQueue's queue order, 0-based positions, ``limit``
(default 1000) and ``offset``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from . import kueue_schema
from .kueue_model import has_quota, is_admitted, is_finished, key, priority
from .selectors import field_selector, label_selector
from .status import ApiError

VISIBILITY_API = "visibility.kueue.x-k8s.io/v1beta2"
CRD_SELECTABLE = ("metadata.name", "metadata.namespace")  # what the API server selects CRDs by


class KueueReadApi:
    """Mixed into :class:`~.kueue.Kueue`; callers hold ``store.lock``."""

    def workload_of(self, pod_uid: str) -> dict | None:
        return next(
            (w for w in self.workloads.values() if w["metadata"]["ownerReferences"][0]["uid"] == pod_uid),
            None,
        )

    def read(self, kind: str, namespace: str, name: str) -> dict:
        obj = self.objects[kind].get((namespace, name))
        if obj is None:
            plural = kueue_schema.KINDS[kind][0]
            raise ApiError(
                404,
                f'{plural}.kueue.x-k8s.io "{name}" not found',
                details={"name": name, "group": "kueue.x-k8s.io", "kind": plural},
            )
        out = copy.deepcopy(obj)
        if kind in ("ClusterQueue", "LocalQueue"):
            out["status"] = self._queue_status(kind, obj)
        return out

    def _queue_status(self, kind: str, obj: dict) -> dict:
        """ClusterQueue/LocalQueue status, computed on read: Active and the workload counts."""
        if kind == "ClusterQueue":
            name = obj["metadata"]["name"]
            mine = [w for w in self.workloads.values() if not is_finished(w)]
            reserving = [w for w in mine if self.cq_of(w) == name and has_quota(w)]
            pending = self.pending_by_cluster_queue(active_only=False).get(name, [])
            inactive = self.inactive_reason(name)
            active = (
                ("True", "Ready", "Can admit new workloads") if inactive is None else ("False", *inactive)
            )
        else:
            ns, lq = obj["metadata"]["namespace"], obj["metadata"]["name"]
            mine = [w for w in self.workloads.values() if not is_finished(w) and key(w).startswith(f"{ns}/")]
            mine = [w for w in mine if w["spec"]["queueName"] == lq]
            reserving = [w for w in mine if has_quota(w)]
            pending = [w for w in mine if not has_quota(w)]
            if obj["spec"].get("stopPolicy", "None") != "None":
                active = ("False", "Stopped", "LocalQueue is stopped")
            elif ("", obj["spec"]["clusterQueue"]) not in self.objects["ClusterQueue"]:
                active = ("False", "ClusterQueueDoesNotExist", "Can't submit new workloads to clusterQueue")
            else:
                active = ("True", "Ready", "Can submit new workloads to localQueue")
        return {
            "conditions": [
                {
                    "type": "Active",
                    "status": active[0],
                    "observedGeneration": obj["metadata"]["generation"],
                    "lastTransitionTime": obj["metadata"]["creationTimestamp"],
                    "reason": active[1],
                    "message": active[2],
                }
            ],
            "pendingWorkloads": len(pending),
            "reservingWorkloads": len(reserving),
            "admittedWorkloads": sum(1 for w in reserving if is_admitted(w)),
        }

    def list(
        self, plural: str, namespace: str | None, query: dict[str, str]
    ) -> tuple[list[dict], str, Callable]:
        kind = kueue_schema.PLURAL_KIND[plural]
        labels = label_selector(query.get("labelSelector", ""))
        selector = query.get("fieldSelector", "")
        for term in filter(None, (t.strip() for t in selector.split(","))):
            field = term.split("!=")[0].split("=")[0].strip()
            if field not in CRD_SELECTABLE:
                raise ApiError(400, f"field label not supported: {field}")
        fields = field_selector(selector, "pods")  # the two CRD fields are pod-selectable too

        def matches(obj: dict) -> bool:
            meta = obj["metadata"]
            return namespace in (None, meta.get("namespace")) and labels(meta.get("labels")) and fields(obj)

        items = [
            self.read(kind, ns, name)
            for (ns, name), obj in sorted(self.objects[kind].items())
            if matches(obj)
        ]
        return items, str(self.store.rv), matches

    def pending_workloads(
        self, cluster_queue: str | None, namespace: str | None, local_queue: str | None, query: dict[str, str]
    ) -> dict:
        """The visibility API's ``PendingWorkloadsSummary`` (``pkg/visibility/storage``)."""
        try:
            limit = min(max(int(query.get("limit", 1000)), 0), 100_000)
            offset = max(int(query.get("offset", 0)), 0)
        except ValueError as exc:
            raise ApiError(400, f"invalid limit or offset: {exc}") from exc
        if local_queue is not None:
            lq = self.objects["LocalQueue"].get((namespace or "", local_queue))
            if lq is None:
                raise ApiError(
                    404,
                    f'localqueue.visibility.kueue.x-k8s.io "{local_queue}" not found',
                    details={"name": local_queue, "group": "visibility.kueue.x-k8s.io", "kind": "localqueue"},
                )
            cluster_queue = lq["spec"]["clusterQueue"]
        elif ("", cluster_queue or "") not in self.objects["ClusterQueue"]:
            raise ApiError(
                404,
                f'clusterqueue.visibility.kueue.x-k8s.io "{cluster_queue}" not found',
                details={"name": cluster_queue, "group": "visibility.kueue.x-k8s.io", "kind": "clusterqueue"},
            )
        pending = self.pending_by_cluster_queue(active_only=False).get(cluster_queue or "", [])
        items, in_lq = [], {}
        for index, wl in enumerate(pending):
            lq_key = (wl["metadata"]["namespace"], wl["spec"]["queueName"])
            position = in_lq.get(lq_key, 0)
            in_lq[lq_key] = position + 1
            if local_queue is not None and lq_key != (namespace, local_queue):
                continue
            items.append((wl, position, index))
        items = items[offset : offset + limit]
        return {
            "kind": "PendingWorkloadsSummary",
            "apiVersion": VISIBILITY_API,
            "metadata": {"creationTimestamp": None},
            "items": [
                {
                    "metadata": {
                        "name": wl["metadata"]["name"],
                        "namespace": wl["metadata"]["namespace"],
                        "creationTimestamp": wl["metadata"]["creationTimestamp"],
                        "ownerReferences": [
                            {k: ref[k] for k in ("apiVersion", "kind", "name", "uid")}
                            for ref in wl["metadata"]["ownerReferences"]
                        ],
                    },
                    "priority": priority(wl),
                    "localQueueName": wl["spec"]["queueName"],
                    "positionInClusterQueue": index,
                    "positionInLocalQueue": position,
                }
                for wl, position, index in items
            ],
        }
