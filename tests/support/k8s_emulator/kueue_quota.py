"""Kueue's quota tree and flavor checks (``pkg/cache/scheduler/resource_node.go``, ``flavorassigner``).

ClusterQueues and Cohorts (implicit, or Cohort objects with ``parentName`` and their own quota) are
resource nodes: ``nominalQuota``, ``borrowingLimit``, ``lendingLimit``, a subtree quota and a usage
that bubbles up past the local (non-lendable) quota. ``available``, ``potential_available``,
``add_usage`` and ``remove_usage`` are upstream's functions. Amounts are integers as in Kueue:
millicores for CPU, units for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kueue_model import amount

FR = tuple[str, str]  # (flavor, resource)
NOFIT, NO_CANDIDATES, PREEMPT, FIT = range(4)


@dataclass
class Quota:
    nominal: int
    borrowing: int | None  # None: unlimited
    lending: int | None


@dataclass
class Node:
    """A ClusterQueue or Cohort: its own quotas, the quota of its subtree, the usage counted on it."""

    name: str
    is_cq: bool
    quotas: dict[FR, Quota] = field(default_factory=dict)
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    subtree: dict[FR, int] = field(default_factory=dict)
    usage: dict[FR, int] = field(default_factory=dict)

    def path(self) -> list[Node]:
        """The ancestors, parent first."""
        out, node = [], self.parent
        while node is not None and len(out) < 16:
            out.append(node)
            node = node.parent
        return out


def _quotas(groups: list[dict]) -> dict[FR, Quota]:
    out = {}
    for group in groups or []:
        for flavor in group.get("flavors") or []:
            for res in flavor.get("resources") or []:
                name = res["name"]
                limits = [res.get(k) for k in ("borrowingLimit", "lendingLimit")]
                out[(flavor["name"], name)] = Quota(
                    amount(name, res["nominalQuota"]),
                    *(None if v is None else amount(name, v) for v in limits),
                )
    return out


class QuotaTree:
    """The scheduler's snapshot of quota and usage (``resource_node.go``)."""

    def __init__(self, cqs: dict[str, dict], cohorts: dict[str, dict]):
        self.cqs: dict[str, Node] = {}
        self.cohorts: dict[str, Node] = {}
        for name, obj in cohorts.items():
            self.cohorts[name] = Node(name, False, _quotas(obj["spec"].get("resourceGroups")))
        for name, obj in cohorts.items():
            parent = obj["spec"].get("parentName")
            if parent:
                self._link(self.cohorts[name], self._cohort(parent))
        for name, obj in cqs.items():
            node = self.cqs[name] = Node(name, True, _quotas(obj["spec"].get("resourceGroups")))
            if obj["spec"].get("cohortName"):
                self._link(node, self._cohort(obj["spec"]["cohortName"]))
        for root in [n for n in self.cohorts.values() if n.parent is None]:
            self._accumulate(root, 0)
        for node in self.cqs.values():
            if node.parent is None:
                node.subtree = {fr: q.nominal for fr, q in node.quotas.items()}

    def _cohort(self, name: str) -> Node:
        return self.cohorts.setdefault(name, Node(name, False))

    @staticmethod
    def _link(child: Node, parent: Node) -> None:
        child.parent = parent
        parent.children.append(child)

    def _accumulate(self, node: Node, depth: int) -> None:
        node.subtree = {fr: q.nominal for fr, q in node.quotas.items()}
        if depth > 16:  # a cycle of Cohorts: upstream refuses the tree; here it stops growing
            return
        for child in node.children:
            if not child.is_cq:
                self._accumulate(child, depth + 1)
            else:
                child.subtree = {fr: q.nominal for fr, q in child.quotas.items()}
            for fr, value in child.subtree.items():
                node.subtree[fr] = node.subtree.get(fr, 0) + value - local_quota(child, fr)

    # usage of one admitted workload, bubbling up past local quota as upstream
    def add(self, cq: str, usage: dict[FR, int]) -> None:
        for fr, value in usage.items():
            add_usage(self.cqs[cq], fr, value)

    def remove(self, cq: str, usage: dict[FR, int]) -> None:
        for fr, value in usage.items():
            remove_usage(self.cqs[cq], fr, value)


def local_quota(node: Node, fr: FR) -> int:
    lending = node.quotas[fr].lending if fr in node.quotas else None
    return max(0, node.subtree.get(fr, 0) - lending) if lending is not None else 0


def local_available(node: Node, fr: FR) -> int:
    return max(0, local_quota(node, fr) - node.usage.get(fr, 0))


def available(node: Node, fr: FR) -> int:
    """Capacity left for ``node`` without preemption: local quota, plus what the parent can give."""
    if node.parent is None:
        return node.subtree.get(fr, 0) - node.usage.get(fr, 0)
    parent_available = available(node.parent, fr)
    borrowing = node.quotas[fr].borrowing if fr in node.quotas else None
    if borrowing is not None:
        lq = local_quota(node, fr)
        stored_in_parent = node.subtree.get(fr, 0) - lq
        used_in_parent = max(0, node.usage.get(fr, 0) - lq)
        parent_available = min(stored_in_parent - used_in_parent + borrowing, parent_available)
    return local_available(node, fr) + parent_available


def potential_available(node: Node, fr: FR) -> int:
    """The largest request ``node`` could ever admit in ``fr`` (no usage, borrowing limits kept)."""
    if node.parent is None:
        return node.subtree.get(fr, 0)
    avail = local_quota(node, fr) + potential_available(node.parent, fr)
    borrowing = node.quotas[fr].borrowing if fr in node.quotas else None
    if borrowing is not None:
        avail = min(node.subtree.get(fr, 0) + borrowing, avail)
    return avail


def add_usage(node: Node, fr: FR, value: int) -> None:
    local = local_available(node, fr)
    node.usage[fr] = node.usage.get(fr, 0) + value
    if node.parent is not None and value > local:
        add_usage(node.parent, fr, value - local)


def remove_usage(node: Node, fr: FR, value: int) -> None:
    stored = node.usage.get(fr, 0) - local_quota(node, fr)
    node.usage[fr] = node.usage.get(fr, 0) - value
    if stored > 0 and node.parent is not None:
        remove_usage(node.parent, fr, min(value, stored))


def borrowing_with(node: Node, fr: FR, value: int) -> bool:
    return node.subtree.get(fr, 0) < node.usage.get(fr, 0) + value


def within_nominal(node: Node, frs: set[FR]) -> bool:
    return all(node.subtree.get(fr, 0) >= node.usage.get(fr, 0) for fr in frs)


def may_reclaim_in_hierarchy(cq: Node, fr: FR, value: int) -> bool:
    """The second result of ``FindHeightOfLowestSubtreeThatFits``."""
    if not borrowing_with(cq, fr, value) or cq.parent is None:
        return cq.parent is not None
    remaining = value - local_available(cq, fr)
    for node in cq.path():
        if not borrowing_with(node, fr, remaining):
            return node.parent is not None
        remaining -= local_available(node, fr)
    return False


def _matches(requirement: dict, labels: dict[str, str]) -> bool:
    value, op = labels.get(requirement["key"]), requirement["operator"]
    values = requirement.get("values") or []
    if op == "In":
        return value in values
    if op == "NotIn":
        return value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and values:
        return int(value) > int(values[0]) if op == "Gt" else int(value) < int(values[0])
    return False


def flavor_mismatch(flavor_name: str, flavor: dict | None, spec: dict) -> str | None:
    """``checkFlavorForPodSets``: why this flavor cannot host the pod (taints, node labels), or None."""
    if flavor is None:
        return f"flavor {flavor_name} not found"
    fspec = flavor.get("spec") or {}
    tolerations = (spec.get("tolerations") or []) + (fspec.get("tolerations") or [])
    for taint in fspec.get("nodeTaints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(_tolerates(t, taint) for t in tolerations):
            value = f"={taint['value']}" if taint.get("value") else ""
            return f"untolerated taint {taint['key']}{value}:{taint['effect']} in flavor {flavor_name}"
    labels = fspec.get("nodeLabels") or {}
    selector = {k: v for k, v in (spec.get("nodeSelector") or {}).items() if k in labels}
    match = all(labels.get(k) == v for k, v in selector.items())
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if match and affinity:
        terms = []
        for term in affinity.get("nodeSelectorTerms") or []:
            kept = [e for e in term.get("matchExpressions") or [] if e["key"] in labels]
            if not kept:  # a term with no relevant key matches any flavor
                terms = []
                break
            terms.append(kept)
        if terms:
            match = any(all(_matches(e, labels) for e in term) for term in terms)
    return None if match else f"flavor {flavor_name} doesn't match node affinity"


def _tolerates(toleration: dict, taint: dict) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("operator") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint["key"]
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", "")
