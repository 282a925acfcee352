"""Kueue v0.19.2's names, Workload conditions and resource arithmetic, shared by the controllers.

Everything here mirrors a named upstream function, so a message or a condition reads exactly as a
real cluster shows it: ``apimeta.SetStatusCondition`` (``set_condition``), the ResourceFormatter
(``format_amount``), ``workload.Info``'s totals (``podset_requests``), ``GetWorkloadNameForPod``.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .admission import parse_quantity
from .store import now

# Labels, annotations, finalizers and gates (pkg/constants, pkg/controller/constants, jobs/pod/constants).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
MANAGED_LABEL = "kueue.x-k8s.io/managed"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
PODSET_LABEL = "kueue.x-k8s.io/podset"
LOCAL_QUEUE_LABEL = "kueue.x-k8s.io/local-queue-name"
CLUSTER_QUEUE_LABEL = "kueue.x-k8s.io/cluster-queue-name"
ROLE_HASH_ANNOTATION = "kueue.x-k8s.io/role-hash"
WORKLOAD_ANNOTATION = "kueue.x-k8s.io/workload"  # set on admitted pods while TopologyAwareScheduling is on
POD_FINALIZER = "kueue.x-k8s.io/managed"
RESOURCE_IN_USE_FINALIZER = "kueue.x-k8s.io/resource-in-use"
ADMISSION_GATE = "kueue.x-k8s.io/admission"
TOPOLOGY_GATE = "kueue.x-k8s.io/topology"  # TopologyAwareScheduling is beta and on by default in 0.19
POD_INDEX_LABEL = "kueue.x-k8s.io/pod-group-pod-index"
DEFAULT_PODSET = "main"
DEFAULT_LOCAL_QUEUE = "default"
UNMANAGED_NAMESPACES = ("kube-system", "kueue-system")  # the default managedJobsNamespaceSelector
# Event sources: the scheduler's recorder and the pod integration's job reconciler.
ADMISSION_COMPONENT = "kueue-admission"
JOB_COMPONENT = "pod-kueue-controller"

PREEMPTION_REASONS = {
    "InClusterQueue": "prioritization in the ClusterQueue",
    "InCohortReclamation": "reclamation within the cohort",
    "InCohortReclaimWhileBorrowing": "reclamation within the cohort while borrowing",
}

# ------------------------------------------------------------------------------------------- conditions


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def is_true(obj: dict, type_: str) -> bool:
    found = condition(obj, type_)
    return found is not None and found["status"] == "True"


def set_condition(  # noqa: PLR0917
    obj: dict, type_: str, status: bool, reason: str, message: str, generation: bool = True
) -> bool:
    """``apimeta.SetStatusCondition``: ``lastTransitionTime`` moves only with the status; True if changed."""
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    value = "True" if status else "False"
    new: dict[str, Any] = {"type": type_, "status": value}
    if generation:
        new["observedGeneration"] = obj["metadata"].get("generation", 1)
    new.update(lastTransitionTime=now(), reason=reason, message=message[:32768])
    old = condition(obj, type_)
    if old is None:
        conditions.append(new)
        return True
    changed = False
    if old["status"] != value:
        old.update(status=value, lastTransitionTime=new["lastTransitionTime"])
        changed = True
    for key in ("reason", "message", "observedGeneration"):
        if old.get(key) != new.get(key):
            changed = True
            if key in new:
                old[key] = new[key]
            else:
                old.pop(key, None)
    return changed


def has_quota(wl: dict) -> bool:
    return is_true(wl, "QuotaReserved")


def is_admitted(wl: dict) -> bool:
    return is_true(wl, "Admitted")


def is_finished(wl: dict) -> bool:
    return is_true(wl, "Finished")


def is_evicted(wl: dict) -> bool:
    return is_true(wl, "Evicted")


def sync_admitted(wl: dict) -> bool:
    """``workload.SyncAdmittedCondition`` with no admission checks and no delayed topology requests."""
    reserved, admitted = has_quota(wl), is_admitted(wl)
    if admitted == reserved:
        return False
    if reserved:
        return set_condition(wl, "Admitted", True, "Admitted", "The workload is admitted")
    old = condition(wl, "Admitted")
    if old is not None and admitted:  # accumulate the time it ran admitted
        status = wl["status"]
        status["accumulatedPastExecutionTimeSeconds"] = status.get(
            "accumulatedPastExecutionTimeSeconds", 0
        ) + seconds_since(old["lastTransitionTime"])
    return set_condition(wl, "Admitted", False, "NoReservation", "The workload has no reservation")


def unset_quota_reservation(wl: dict, reason: str, message: str) -> bool:
    """``workload.UnsetQuotaReservationWithCondition``: QuotaReserved False, admission cleared."""
    changed = set_condition(wl, "QuotaReserved", False, reason, message)
    if wl["status"].pop("admission", None) is not None:
        changed = True
    return sync_admitted(wl) or changed


def seconds_since(stamp: str) -> int:
    then = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int((datetime.now(UTC) - then).total_seconds())


def key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


def priority(wl: dict) -> int:
    return int(wl["spec"].get("priority") or 0)


# ---------------------------------------------------------------------------------------- resources


def amount(resource: str, quantity: Any) -> int:
    """``resources.ResourceValue``: CPU in millicores, everything else in units (rounded up)."""
    value = parse_quantity(quantity)
    return math.ceil(value * 1000) if resource == "cpu" else math.ceil(value)


def _decimal_si(value: Decimal) -> str:
    """Go's canonical DecimalSI form: the largest power-of-1000 suffix that keeps an integer mantissa."""
    if value == 0:
        return "0"
    for exponent, suffix in ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k"), (0, "")):
        mantissa = value.scaleb(-exponent)
        if mantissa == mantissa.to_integral_value():
            return f"{int(mantissa)}{suffix}"
    for exponent, suffix in ((-3, "m"), (-6, "u"), (-9, "n")):
        mantissa = value.scaleb(-exponent)
        if mantissa == mantissa.to_integral_value():
            return f"{int(mantissa)}{suffix}"
    return f"{int((value * 10**9).to_integral_value())}n"


def _binary_si(value: int) -> str:
    if abs(value) >= 1024:
        for power, suffix in ((6, "Ei"), (5, "Pi"), (4, "Ti"), (3, "Gi"), (2, "Mi"), (1, "Ki")):
            if value % (1024**power) == 0:
                return f"{value // 1024**power}{suffix}"
    return _decimal_si(Decimal(value))


def format_amount(resource: str, value: int) -> str:
    """Kueue's ``ResourceFormatter``: millicores for CPU, binary units for bytes, plain units otherwise."""
    if resource == "cpu":
        return _decimal_si(Decimal(value) / 1000)
    if resource in ("memory", "ephemeral-storage") or resource.startswith("hugepages-"):
        return _binary_si(value)
    return _decimal_si(Decimal(value))


def canonical_quantity(resource: str, quantity: Any) -> str:
    return format_amount(resource, amount(resource, quantity))


def podset_requests(podset: dict) -> dict[str, int]:
    """A PodSet's total requests (``workload.Info``): containers summed, init containers maxed, overhead."""
    spec = podset["template"]["spec"]

    def requests(container: dict) -> dict[str, int]:
        raw = (container.get("resources") or {}).get("requests") or {}
        return {res: amount(res, quantity) for res, quantity in raw.items()}

    total: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for res, value in requests(container).items():
            total[res] = total.get(res, 0) + value
    for container in spec.get("initContainers") or []:
        for res, value in requests(container).items():
            total[res] = max(total.get(res, 0), value)
    for res, quantity in (spec.get("overhead") or {}).items():
        total[res] = total.get(res, 0) + amount(res, quantity)
    count = int(podset.get("count", 1))
    return {res: value * count for res, value in total.items()}


def gpus(wl: dict) -> int:
    return sum(podset_requests(ps).get("nvidia.com/gpu", 0) for ps in wl["spec"]["podSets"])


# ---------------------------------------------------------------------------------------- naming


def workload_name(pod_name: str, pod_uid: str) -> str:
    """``GetWorkloadNameForPod``: ``pod-<name>`` (cut to 247) + ``-`` + sha1(kind, group, name, uid)[:5]."""
    digest = hashlib.sha1(f"Pod\n\n{pod_name}\n{pod_uid}".encode()).hexdigest()
    return f"{('pod-' + pod_name)[: 253 - 1 - 5]}-{digest[:5]}"


def role_hash(spec: dict) -> str:
    """``GenerateRoleHash``: sha256 of the JSON of the spec's admission-relevant shape, first 8 hex digits.

    Go marshals maps with sorted keys and structs in field order; tolerations and ports keep their
    Go field order here, quantities their canonical form, so ordinary pods hash as Kueue hashes them.
    """

    def ordered(item: dict, fields: tuple[str, ...]) -> dict:
        return {name: item[name] for name in fields if item.get(name) not in (None, "", 0)}

    def containers(items: list[dict] | None) -> list[dict] | None:
        if not items:
            return None
        shaped = []
        for container in items:
            requests = (container.get("resources") or {}).get("requests")
            ports = container.get("ports")
            shaped.append(
                {
                    "ports": [
                        ordered(p, ("name", "hostPort", "containerPort", "protocol", "hostIP")) for p in ports
                    ]
                    if ports
                    else None,
                    "resources": {
                        "requests": {r: canonical_quantity(r, q) for r, q in sorted(requests.items())}
                        if requests
                        else None
                    },
                }
            )
        return shaped

    tolerations = spec.get("tolerations")
    shape = {
        "affinity": spec.get("affinity"),
        "containers": containers(spec.get("containers")),
        "initContainers": containers(spec.get("initContainers")),
        "nodeSelector": dict(sorted(spec["nodeSelector"].items())) if spec.get("nodeSelector") else None,
        "overhead": spec.get("overhead"),
        "priority": spec.get("priority"),
        "resourceClaims": spec.get("resourceClaims"),
        "runtimeClassName": spec.get("runtimeClassName"),
        "tolerations": [
            ordered(t, ("key", "operator", "value", "effect", "tolerationSeconds")) for t in tolerations
        ]
        if tolerations
        else None,
        "topologySpreadConstraints": spec.get("topologySpreadConstraints"),
    }
    data = json.dumps({"spec": shape}, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()[:8]
