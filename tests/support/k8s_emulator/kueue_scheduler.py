"""Kueue's scheduler, classic mode: quota tree, flavor assignment, preemption, one cycle at a time.

Ported from v0.19.2 with its structure and wording kept, so a Workload's conditions and the
preemption victims are the ones a real cluster would show:

* ``QuotaTree`` is ``pkg/cache/scheduler/resource_node.go``: ClusterQueues and Cohorts (implicit or
  Cohort objects with ``parentName`` and their own quota), ``nominalQuota``, ``borrowingLimit`` and
  ``lendingLimit``; ``available``/``potential_available``/``add_usage``/``remove_usage`` as upstream.
* ``assign`` is ``flavorassigner``: per resource group the flavors in order, skipping ones whose
  ``nodeLabels`` do not match the pod's nodeSelector / required node affinity or whose taints are
  not tolerated, with ``flavorFungibility`` (defaults ``whenCanBorrow: MayStopSearch``,
  ``whenCanPreempt: TryNextFlavor``) and the upstream reasons ("insufficient unused quota for ...").
  A requested resource no resource group covers blocks admission ("resource X unavailable in
  ClusterQueue"), as the default ``BlockUndeclared`` quota check does.
* ``find_targets`` is ``preemption.classicalPreemptions`` with the hierarchical candidate generator:
  same-queue candidates (``withinClusterQueue``), cohort candidates from borrowing ClusterQueues
  (``reclaimWithinCohort``, ``borrowWithinCohort`` with ``maxPriorityThreshold``), the candidate
  ordering, the with/without-borrowing attempts, and the fill-back of targets not needed.
* ``Scheduler.cycle`` pops one head per ClusterQueue (priority, then creation: BestEffortFIFO skips
  an inadmissible head until quota is freed, StrictFIFO waits behind it), orders the heads like the
  classical iterator (non-borrowing first, then priority, then FIFO) and admits, preempts or records
  why each waits (legacy reason ``Pending``: UnadmittedWorkloadsObservability is off by default).

Simplified: fair sharing, admission checks, TAS, partial admission and pod groups are absent; the
preemption oracle used to rank flavors is the same target search; "Flavors considered" is left out
of the QuotaReserved event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .kueue_model import (
    ADMISSION_COMPONENT,
    PREEMPTION_REASONS,
    condition,
    format_amount,
    is_evicted,
    key,
    priority,
    seconds_since,
    set_condition,
    sync_admitted,
    unset_quota_reservation,
)
from .kueue_quota import (
    FIT,
    FR,
    NO_CANDIDATES,
    NOFIT,
    PREEMPT,
    Node,
    QuotaTree,
    available,
    borrowing_with,
    flavor_mismatch,
    local_available,
    may_reclaim_in_hierarchy,
    potential_available,
    within_nominal,
)

if TYPE_CHECKING:
    from .kueue import Kueue


@dataclass
class Assignment:
    mode: int = FIT
    borrows: bool = False
    flavors: list[dict[str, str]] = field(default_factory=list)  # per PodSet: resource -> flavor
    usage: dict[FR, int] = field(default_factory=dict)
    need_preemption: set[FR] = field(default_factory=set)
    message: str = ""


class Scheduler:
    """One scheduling cycle over every active ClusterQueue, under the store lock (see module doc)."""

    def __init__(self, kueue: Kueue):
        self.kueue = kueue
        self.inadmissible: set[str] = set()  # BestEffortFIFO heads parked until quota is freed

    # ---------------------------------------------------------------------------------- assignment

    def assign(self, wl: dict, cq_name: str, tree: QuotaTree) -> Assignment:
        cq_obj, cq = self.kueue.cluster_queue(cq_name), tree.cqs[cq_name]
        groups = cq_obj["spec"].get("resourceGroups") or []
        result = Assignment()
        messages = []
        for podset in wl["spec"]["podSets"]:
            requests = {r: v for r, v in self.kueue.requests(podset).items() if v}
            covered = {r for g in groups for r in g.get("coveredResources") or []}
            reasons: list[str] = []
            mode, flavors = FIT, {}
            if self.kueue.config["quotaCheckStrategy"] == "IgnoreUndeclared":
                requests = {r: v for r, v in requests.items() if r in covered}
            uncovered = sorted(r for r in requests if r not in covered)
            if uncovered:
                mode, reasons = NOFIT, [f"resource {uncovered[0]} unavailable in ClusterQueue"]
            for group in groups if not uncovered else []:
                wanted = {r: v for r, v in requests.items() if r in (group.get("coveredResources") or [])}
                if not wanted:
                    continue
                chosen, group_mode, group_reasons = self._group(
                    wl, tree, cq, group, wanted, result.usage, podset
                )
                reasons += group_reasons
                mode = min(mode, group_mode[0])
                result.borrows = result.borrows or group_mode[1]
                if chosen is None:
                    mode = NOFIT
                    break
                flavors.update(chosen)
                for res, flavor in chosen.items():
                    fr = (flavor, res)
                    result.usage[fr] = result.usage.get(fr, 0) + wanted[res]
                    if group_mode[0] == PREEMPT and group_mode[2].get(res):
                        result.need_preemption.add(fr)
            result.flavors.append(flavors)
            result.mode = min(result.mode, mode)
            if mode != FIT:
                messages.append(
                    f"couldn't assign flavors to pod set {podset['name']}: {', '.join(sorted(reasons))}"
                )
        result.message = "; ".join(messages)
        return result

    def _group(self, wl, tree: QuotaTree, cq: Node, group, wanted, assumed, podset):  # noqa: PLR0917
        """``findFlavorForPodSets`` for one resource group: the chosen flavors, mode, reasons."""
        spec = self.kueue.cluster_queue(cq.name)["spec"]
        fungibility = spec.get("flavorFungibility") or {}
        best: tuple[int, bool] | None = None
        best_flavors: dict[str, str] | None = None
        best_preempting: dict[str, bool] = {}
        reasons: list[str] = []
        preemption = spec.get("preemption") or {}
        can_preempt_while_borrowing = (preemption.get("borrowWithinCohort") or {}).get(
            "policy", "Never"
        ) != "Never"
        for flavor_ref in group.get("flavors") or []:
            fname = flavor_ref["name"]
            mismatch = flavor_mismatch(fname, self.kueue.flavor(fname), podset["template"]["spec"])
            if mismatch:
                reasons.append(mismatch)
                continue
            mode, borrows, preempting = FIT, False, {}
            for res in sorted(wanted):
                fr = (fname, res)
                value = assumed.get(fr, 0) + wanted[res]
                capacity = potential_available(cq, fr)
                if value > capacity:
                    before, now_, most = (
                        format_amount(res, v) for v in (assumed.get(fr, 0), wanted[res], capacity)
                    )
                    reasons.append(
                        f"insufficient quota for {res} in flavor {fname}, previously considered podsets "
                        f"requests ({before}) + current podset request ({now_}) > maximum capacity ({most})"
                    )
                    mode = NOFIT
                    break
                borrows = borrows or (cq.parent is not None and borrowing_with(cq, fr, value))
                free = max(0, available(cq, fr))
                if value <= free:
                    continue
                missing = format_amount(res, value - free)
                reasons.append(
                    f"insufficient unused quota for {res} in flavor {fname}, {missing} more needed"
                )
                nominal = cq.quotas[fr].nominal if fr in cq.quotas else 0
                if nominal >= value or may_reclaim_in_hierarchy(cq, fr, value) or can_preempt_while_borrowing:
                    possible = bool(self.find_targets(wl, cq.name, {fr: value}, {fr}, tree))
                    mode = min(mode, PREEMPT if possible else NO_CANDIDATES)
                    preempting[res] = True
                else:
                    mode = NOFIT
                    break
            candidate = (mode, borrows)
            if best is None or mode > best[0] or (mode == best[0] and best[1] and not borrows):
                best, best_flavors, best_preempting = candidate, {r: fname for r in wanted}, preempting
            try_next = (
                mode in (NOFIT, NO_CANDIDATES)
                or (mode == PREEMPT and fungibility.get("whenCanPreempt", "TryNextFlavor") == "TryNextFlavor")
                or (
                    borrows
                    and mode == FIT
                    and fungibility.get("whenCanBorrow", "MayStopSearch") == "TryNextFlavor"
                )
            )
            if not try_next:
                break
        if best is None or best[0] == NOFIT:
            return None, (NOFIT, False, {}), reasons
        return best_flavors, (best[0], best[1], best_preempting), ([] if best[0] == FIT else reasons)

    # ---------------------------------------------------------------------------------- preemption

    def find_targets(
        self, wl: dict, cq_name: str, requests: dict[FR, int], need: set[FR], tree: QuotaTree
    ) -> list[tuple[dict, str]]:
        """``classicalPreemptions``: the fewest admitted workloads to evict, each with its reason."""
        cq = tree.cqs[cq_name]
        preemption = self.kueue.cluster_queue(cq_name)["spec"].get("preemption") or {}
        within = preemption.get("withinClusterQueue", "Never")
        reclaim = preemption.get("reclaimWithinCohort", "Never")
        borrow_policy = preemption.get("borrowWithinCohort") or {}
        forbidden = borrow_policy.get("policy", "Never") == "Never"
        threshold = borrow_policy.get("maxPriorityThreshold")
        incoming = priority(wl)
        admitted = self.kueue.reserving()

        def satisfies(candidate: dict, policy: str) -> bool:
            if policy == "LowerPriority":
                return priority(candidate) < incoming
            if policy == "LowerOrNewerEqualPriority":
                return priority(candidate) < incoming or (
                    priority(candidate) == incoming and self.kueue.order(wl) < self.kueue.order(candidate)
                )
            return policy == "Any"

        def uses(candidate: dict) -> bool:
            return any(fr in need for fr in self.kueue.usage(candidate))

        def variant(candidate: dict, other_cq: str, advantage: bool) -> str | None:
            if not uses(candidate):
                return None
            if other_cq == cq_name:
                return "WithinCQ" if satisfies(candidate, within) else None
            if not satisfies(candidate, reclaim):
                return None
            if advantage:
                return "HierarchicalReclaim"
            if forbidden:
                return "ReclaimWithoutBorrowing"
            p = priority(candidate)
            above = p >= incoming or (threshold is not None and p > threshold)
            return "ReclaimWithoutBorrowing" if above else "ReclaimWhileBorrowing"

        same: list[tuple[dict, str, Node | None]] = []
        if within != "Never":
            same = [(w, v, None) for w, c in admitted if c == cq_name if (v := variant(w, c, False))]
        hierarchy: list[tuple[dict, str, Node | None]] = []
        prio: list[tuple[dict, str, Node | None]] = []
        if cq.parent is not None and reclaim != "Never":
            advantage = all(cq.subtree.get(fr, 0) >= cq.usage.get(fr, 0) + v for fr, v in requests.items())
            remaining = {fr: max(0, v - local_available(cq, fr)) for fr, v in requests.items()}
            previous = None
            for root in cq.path():
                target = hierarchy if advantage else prio
                for other, lca in self._subtree_cqs(root, previous, need, cq):
                    target += [
                        (w, v, lca) for w, c in admitted if c == other.name if (v := variant(w, c, advantage))
                    ]
                fits = all(
                    root.subtree.get(fr, 0) >= root.usage.get(fr, 0) + v for fr, v in remaining.items()
                )
                remaining = {fr: max(0, v - local_available(root, fr)) for fr, v in remaining.items()}
                advantage = advantage or fits
                previous = root
        order = self.kueue.candidate_order(cq_name)
        lists = [sorted(group, key=lambda item: order(item[0])) for group in (hierarchy, prio, same)]
        candidates = [c for group in lists for c in group if is_evicted(c[0])]
        candidates += [c for group in lists for c in group if not is_evicted(c[0])]

        def fits(allow_borrowing: bool) -> bool:
            return all(
                (allow_borrowing or not borrowing_with(cq, fr, v)) and v <= available(cq, fr)
                for fr, v in requests.items()
            )

        def valid(item, allow_borrowing: bool) -> bool:
            candidate, kind, lca = item
            other = tree.cqs[self.kueue.cq_of(candidate)]
            if other is cq:
                return True
            if allow_borrowing and kind == "ReclaimWithoutBorrowing":
                return False
            if within_nominal(other, need):
                return False
            for node in other.path():
                if node is lca:
                    break
                if within_nominal(node, need):
                    return False
            return True

        under_nominal = all(
            cq.quotas[fr].nominal > cq.usage.get(fr, 0) if fr in cq.quotas else False for fr in need
        )
        if (not hierarchy and not prio) or (forbidden and not under_nominal):
            attempts = [True]
        elif forbidden and not hierarchy:
            attempts = [False, True]
        else:
            attempts = [True, False]
        for allow in attempts:
            targets = []
            for item in candidates:
                if not valid(item, allow):
                    continue
                tree.remove(self.kueue.cq_of(item[0]), self.kueue.usage(item[0]))
                targets.append(item)
                if fits(allow):
                    for index in range(len(targets) - 2, -1, -1):  # fill back what is not needed
                        back = targets[index]
                        tree.add(self.kueue.cq_of(back[0]), self.kueue.usage(back[0]))
                        if fits(allow):
                            targets.pop(index)
                        else:
                            tree.remove(self.kueue.cq_of(back[0]), self.kueue.usage(back[0]))
                    for done in targets:
                        tree.add(self.kueue.cq_of(done[0]), self.kueue.usage(done[0]))
                    return [(t[0], _REASONS[t[1]]) for t in targets]
            for done in targets:
                tree.add(self.kueue.cq_of(done[0]), self.kueue.usage(done[0]))
        return []

    @staticmethod
    def _subtree_cqs(root: Node, skip: Node | None, need: set[FR], cq: Node):
        """``collectCandidatesInSubtree``: over-quota ClusterQueues under ``root``, with ``root`` as lca."""
        for child in root.children:
            if child is skip or child is cq:
                continue
            if not child.is_cq:
                if not within_nominal(child, need):
                    yield from ((other, root) for other, _ in Scheduler._subtree_cqs(child, skip, need, cq))
            elif not within_nominal(child, need):
                yield child, root

    # --------------------------------------------------------------------------------------- cycle

    def cycle(self) -> None:
        """Admit, preempt or explain, until no ClusterQueue head can make progress."""
        k = self.kueue
        tree = QuotaTree(k.cluster_queues(), k.cohorts())
        for wl, cq in k.reserving():
            if cq in tree.cqs:
                tree.add(cq, k.usage(wl))
        queues = k.pending_by_cluster_queue()
        blocked: set[str] = set()
        while True:
            heads = []
            for cq_name, pending in queues.items():
                if cq_name in blocked:
                    continue
                # StrictFIFO parks only namespace mismatches; every other failure blocks its queue.
                head = next((w for w in pending if key(w) not in self.inadmissible), None)
                if head is not None:
                    heads.append((cq_name, head, self.assign(head, cq_name, tree)))
            if not heads:
                return
            heads.sort(key=lambda e: (e[2].borrows, -priority(e[1]), k.order(e[1])))
            for cq_name, wl, _ in heads:
                strict = k.cluster_queue(cq_name)["spec"].get("queueingStrategy") == "StrictFIFO"
                if not k.namespace_selected(wl, cq_name):  # ValidateAdmissibility
                    self.inadmissible.add(key(wl))
                    self.pending(wl, "workload namespace doesn't match ClusterQueue selector")
                    continue
                assignment = self.assign(wl, cq_name, tree)
                if assignment.mode == FIT:
                    self.admit(wl, cq_name, assignment)
                    tree.add(cq_name, assignment.usage)
                    queues[cq_name].remove(wl)
                    continue
                message = assignment.message
                targets = []
                if assignment.mode == PREEMPT:
                    totals = dict(assignment.usage)
                    targets = self.find_targets(wl, cq_name, totals, assignment.need_preemption, tree)
                if targets:
                    for target, reason in targets:
                        if not is_evicted(target):
                            self.preempt(target, wl, reason, cq_name)
                    message += f". Pending the preemption of {len(targets)} workload(s)"
                    blocked.add(cq_name)
                elif strict:
                    blocked.add(cq_name)
                else:
                    self.inadmissible.add(key(wl))
                self.pending(wl, message)

    # ----------------------------------------------------------------------------------- outcomes

    def pending(self, wl: dict, message: str) -> None:
        """``requeueAndUpdate``: QuotaReserved False ``Pending`` (the legacy reason) and a Warning event."""
        changed = unset_quota_reservation(wl, "Pending", message)
        requests = [
            {
                "name": ps["name"],
                "resources": {r: format_amount(r, v) for r, v in sorted(self.kueue.requests(ps).items())},
            }
            for ps in wl["spec"]["podSets"]
        ]
        if wl["status"].get("resourceRequests") != requests:
            wl["status"]["resourceRequests"] = requests
            changed = True
        if changed:
            self.kueue.touch(wl)
            self.kueue.event(wl, "Pending", message, "Warning", ADMISSION_COMPONENT)

    def admit(self, wl: dict, cq_name: str, assignment: Assignment) -> None:
        """``SetQuotaReservation`` + ``SyncAdmittedCondition`` and the QuotaReserved/Admitted events."""
        k = self.kueue
        assignments = []
        for podset, flavors in zip(wl["spec"]["podSets"], assignment.flavors, strict=True):
            requests = k.requests(podset)
            assignments.append(
                {
                    "name": podset["name"],
                    "flavors": dict(sorted(flavors.items())),
                    "resourceUsage": {r: format_amount(r, requests[r]) for r in sorted(flavors)},
                    "count": int(podset.get("count", 1)),
                }
            )
        wl["status"]["admission"] = {"clusterQueue": cq_name, "podSetAssignments": assignments}
        set_condition(wl, "QuotaReserved", True, "QuotaReserved", f"Quota reserved in ClusterQueue {cq_name}")
        for type_ in ("Evicted", "Preempted"):
            previous = condition(wl, type_)
            if previous is not None and previous["status"] == "True":
                set_condition(wl, type_, False, "QuotaReserved", f"Previously: {previous['message']}")
        sync_admitted(wl)
        k.touch(wl)
        k.admitted(wl, cq_name)
        waited = seconds_since(wl["metadata"]["creationTimestamp"])  # whole seconds, as "%.0fs"
        k.event(
            wl,
            "QuotaReserved",
            f"Quota reserved in ClusterQueue {cq_name}, wait time since queued was {waited}s",
        )
        k.event(wl, "Admitted", f"Admitted by ClusterQueue {cq_name}, wait time since reservation was 0s")

    def preempt(self, target: dict, preemptor: dict, reason: str, cq_name: str) -> None:
        """``IssuePreemptions`` for one target: Preempted + Evicted, and the events upstream records."""
        k = self.kueue
        target_cq = k.cq_of(target)
        message = (
            f"Preempted to accommodate a workload (UID: {preemptor['metadata']['uid']}, JobUID: "
            f"{preemptor['metadata'].get('labels', {}).get('kueue.x-k8s.io/job-uid', 'UNKNOWN')}) due to "
            f"{PREEMPTION_REASONS[reason]}; preemptor path: {k.cq_path(cq_name)}; preemptee path: "
            f"{k.cq_path(target_cq)}"
        )
        set_condition(target, "Preempted", True, reason, message, generation=False)
        set_condition(target, "Evicted", True, "Preempted", message)
        stats = target["status"].setdefault("schedulingStats", {}).setdefault("evictions", [])
        entry = next((e for e in stats if e["reason"] == "Preempted" and e["underlyingCause"] == ""), None)
        if entry is None:
            stats.append({"reason": "Preempted", "underlyingCause": "", "count": 1})
        else:
            entry["count"] += 1
        k.touch(target)
        k.preempted(target, preemptor)
        k.event(target, "EvictedDueToPreempted", message)
        p, q = priority(preemptor), priority(target)
        priorities = (
            f"preemptor effective priority: {p} (base: {p}, boost: 0); "
            f"preemptee effective priority: {q} (base: {q}, boost: 0)"
        )
        k.event(target, "Preempted", f"{message}; {priorities}")
        victim = f"{key(target)} (UID: {target['metadata']['uid']}) in ClusterQueue {target_cq}"
        k.event(preemptor, "PreemptedWorkload", f"Preempted workload {victim}; {priorities}")


_REASONS = {
    "WithinCQ": "InClusterQueue",
    "HierarchicalReclaim": "InCohortReclamation",
    "ReclaimWithoutBorrowing": "InCohortReclamation",
    "ReclaimWhileBorrowing": "InCohortReclaimWhileBorrowing",
}
