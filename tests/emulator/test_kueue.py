"""Kueue v0.19.2 in the emulator, seen through the real ``kubernetes`` clients and the pod operator.

Each test builds its own cluster (an emulator is cheap) with Kueue objects shaped like upstream's,
and checks what a real cluster shows: the webhook's marks on the pod, the Workload Kueue makes,
its conditions with upstream's reasons and messages, the visibility API, and preemption as a pod
experiences it (``TerminationTarget``, then a graceful DELETE).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.dag_bundle import dag_bundle_folder
from tests.support.k8s_emulator import ApiError, KubernetesEmulator
from tests.support.paths import ROOT

NS = "ml"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
CRDS = ROOT / ".." / "shared" / "upstream-crds" / "kueue"
SLEEP = "import time; time.sleep(60)"
# Exits 0.6 s after SIGTERM, like a trainer writing a last checkpoint: long enough to see overlap.
GRACEFUL = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.6), sys.exit(0)))\n"
    "print('up', flush=True)\n"
    "time.sleep(60)\n"
)


def kueue(kind: str, name: str, namespace: str | None = None, **body) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": meta, **body}


def flavor(name: str, **spec) -> dict:
    return kueue("ResourceFlavor", name, spec=spec)


def cluster_queue(name: str, gpus: int, cohort: str | None = None, flavors=("a100",), **spec) -> dict:
    resources = []
    for flavor_name in flavors:
        quota = [
            {"name": "cpu", "nominalQuota": "64"},
            {"name": "memory", "nominalQuota": "256Gi"},
            {"name": "nvidia.com/gpu", "nominalQuota": gpus},
        ]
        for key in ("borrowingLimit", "lendingLimit"):
            if key in spec:
                quota[2][key] = spec[key]
        resources.append({"name": flavor_name, "resources": quota})
    spec = {k: v for k, v in spec.items() if k not in ("borrowingLimit", "lendingLimit")}
    body = {
        "namespaceSelector": {},
        "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": resources}],
        **({"cohortName": cohort} if cohort else {}),
        **spec,
    }
    return kueue("ClusterQueue", name, spec=body)


def local_queue(name: str, cq: str, namespace: str = NS) -> dict:
    return kueue("LocalQueue", name, namespace, spec={"clusterQueue": cq})


def priority_class(name: str, value: int) -> dict:
    return kueue("WorkloadPriorityClass", name, value=value, description=f"{name} priority")


def pod(name: str, queue: str | None, gpus: int = 1, code: str = SLEEP, priority: str | None = None, **spec):
    labels = {"app": "kueue-test"}
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = queue
    if priority:
        labels["kueue.x-k8s.io/priority-class"] = priority
    requests = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)}
    container = {
        "name": "base",
        "image": "ghcr.io/trainyard/trainer:test",
        "command": ["python", "-c", code],
        "resources": {"requests": requests, "limits": {"nvidia.com/gpu": str(gpus)}},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            **spec,
        },
    }


@pytest.fixture
def k8s():
    with KubernetesEmulator() as emulator:
        emulator.add_namespace(NS)
        yield emulator


@pytest.fixture
def clients(k8s, tmp_path):
    from kubernetes import client, config

    api_client = config.new_client_from_config(str(k8s.write_kubeconfig(tmp_path / "kubeconfig")))
    return client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)


def conditions(workload: dict) -> dict[str, dict]:
    return {c["type"]: c for c in workload["status"].get("conditions") or []}


def workload_of(custom, pod_uid: str, namespace: str = NS) -> dict | None:
    """How the training operator finds its pod's Workload: by the job-uid label."""
    found = custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={pod_uid}"
    )["items"]
    assert len(found) <= 1
    return found[0] if found else None


def wait(predicate, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def running(k8s, name: str) -> dict:
    return k8s.wait_for_pod(NS, lambda p: p["metadata"]["name"] == name and p["status"]["phase"] == "Running")


def pending_message(k8s, pod_name: str) -> str:
    workload = wait(lambda: k8s.workload_for_pod(NS, pod_name), what=f"the Workload of {pod_name}")
    reserved = wait(lambda: conditions(k8s.workload_for_pod(NS, pod_name)).get("QuotaReserved"))
    return (
        reserved["message"] if reserved["status"] == "False" else f"admitted: {workload['metadata']['name']}"
    )


def visibility(api, path: str) -> dict:
    return api.api_client.call_api(
        f"/apis/visibility.kueue.x-k8s.io/{VERSION}/{path}",
        "GET",
        auth_settings=["BearerToken"],
        response_types_map={200: "object"},
        _return_http_data_only=True,
    )


def strict_schema(kind_plural: str) -> dict:
    """The CRD's v1beta2 schema with undeclared fields refused, built here independently of the emulator."""

    def tighten(node):
        if isinstance(node, list):
            return [tighten(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {
            k: ({p: tighten(s) for p, s in v.items()} if k == "properties" else tighten(v))
            for k, v in node.items()
        }
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out.setdefault("additionalProperties", bool(out.get("x-kubernetes-preserve-unknown-fields")))
        return out

    crd = yaml.load((CRDS / f"{GROUP}_{kind_plural}.yaml").read_text(), Loader=yaml.CSafeLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    schema = tighten(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


needs_crds = pytest.mark.skipif(
    not CRDS.is_dir(), reason="../shared/upstream-crds/kueue is not on this machine"
)


# ---------------------------------------------------------------------------------------------- tests


def test_webhook_gates_the_pod_and_the_pod_controller_makes_its_workload(k8s, clients):
    api, custom = clients
    k8s.add_priority_class("research", 500)
    k8s.apply_kueue_objects(
        [
            flavor("a100", nodeLabels={"gpu": "a100"}),
            cluster_queue("cq", 2),
            local_queue("team", "cq"),
            priority_class("prod", 10_000),
        ]
    )
    created = api.create_namespaced_pod(NS, pod("big", "team", gpus=4, priority="prod"))
    # The create response already carries the webhook's marks and the API server's gated condition.
    assert created.metadata.labels["kueue.x-k8s.io/managed"] == "true"
    assert created.metadata.finalizers == ["kueue.x-k8s.io/managed"]
    assert [g.name for g in created.spec.scheduling_gates] == [
        "kueue.x-k8s.io/admission",
        "kueue.x-k8s.io/topology",
    ]
    assert len(created.metadata.annotations["kueue.x-k8s.io/role-hash"]) == 8
    (scheduled,) = created.status.conditions
    assert (scheduled.type, scheduled.status, scheduled.reason, scheduled.message) == (
        "PodScheduled",
        "False",
        "SchedulingGated",
        "Scheduling is blocked due to non-empty scheduling gates",
    )
    uid = created.metadata.uid
    workload = wait(lambda: workload_of(custom, uid), what="the Workload")
    digest = hashlib.sha1(f"Pod\n\nbig\n{uid}".encode()).hexdigest()[:5]
    assert workload["metadata"]["name"] == f"pod-big-{digest}"  # GetWorkloadNameForPod
    assert workload["metadata"]["labels"] == {"kueue.x-k8s.io/job-uid": uid}
    assert workload["metadata"]["finalizers"] == ["kueue.x-k8s.io/resource-in-use"]
    (owner,) = workload["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "big",
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    spec = workload["spec"]
    assert (spec["queueName"], spec["priority"], spec["active"]) == ("team", 10_000, True)
    assert spec["priorityClassRef"] == {"group": GROUP, "kind": "WorkloadPriorityClass", "name": "prod"}
    (podset,) = spec["podSets"]
    assert (podset["name"], podset["count"]) == ("main", 1)
    assert podset["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "4"
    reserved = wait(lambda: conditions(workload_of(custom, uid)).get("QuotaReserved"))
    assert (reserved["status"], reserved["reason"]) == ("False", "Pending")
    assert reserved["message"] == (
        "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor a100, "
        "previously considered podsets requests (0) + current podset request (4) > maximum capacity (2)"
    )
    assert "Admitted" not in conditions(workload_of(custom, uid))  # never reserved: no Admitted yet
    events = {e["reason"]: e["message"] for e in k8s.events(NS, "big")}
    assert events["CreatedWorkload"] == f"Created Workload: {NS}/{workload['metadata']['name']}"
    time.sleep(0.2)
    assert k8s.pod(NS, "big")["status"]["phase"] == "Pending"
    assert not [r for r in k8s.container_runs() if r["name"] == "big"]  # gated: nothing ran

    # No WorkloadPriorityClass label: the pod's PriorityClass. A missing class: no Workload until it exists.
    plain = api.create_namespaced_pod(NS, pod("plain", "team", priorityClassName="research"))
    workload = wait(lambda: workload_of(custom, plain.metadata.uid))
    assert workload["spec"]["priority"] == 500
    assert workload["spec"]["priorityClassRef"] == {
        "group": "scheduling.k8s.io",
        "kind": "PriorityClass",
        "name": "research",
    }
    orphan = api.create_namespaced_pod(NS, pod("orphan", "team", gpus=0, priority="urgent"))
    time.sleep(0.3)
    assert workload_of(custom, orphan.metadata.uid) is None
    k8s.apply_kueue(priority_class("urgent", 20_000))
    late = k8s.wait_for_workload(
        NS, lambda w: w["metadata"]["labels"]["kueue.x-k8s.io/job-uid"] == orphan.metadata.uid
    )
    assert late["spec"]["priority"] == 20_000

    # Why a Workload is not even queued: the workload controller's (legacy) Inadmissible reasons.
    api.create_namespaced_pod(NS, pod("lost", "no-such-queue"))
    assert pending_message(k8s, "lost") == "LocalQueue no-such-queue doesn't exist"
    k8s.apply_kueue(local_queue("dangling", "no-such-cq"))
    api.create_namespaced_pod(NS, pod("dangling", "dangling"))
    assert pending_message(k8s, "dangling") == "ClusterQueue no-such-cq doesn't exist"
    assert conditions(k8s.workload_for_pod(NS, "dangling"))["QuotaReserved"]["reason"] == "Inadmissible"
    # No namespaceSelector selects no namespace (null is "nothing"; {} is "everything").
    unselected = cluster_queue("closed", 8)
    del unselected["spec"]["namespaceSelector"]
    k8s.apply_kueue_objects([unselected, local_queue("closed", "closed")])
    api.create_namespaced_pod(NS, pod("closed", "closed"))
    assert pending_message(k8s, "closed") == "workload namespace doesn't match ClusterQueue selector"
    k8s.apply_kueue(cluster_queue("held", 8, stopPolicy="Hold"))
    k8s.apply_kueue(local_queue("held", "held"))
    api.create_namespaced_pod(NS, pod("held", "held"))
    assert pending_message(k8s, "held") == "ClusterQueue held is inactive"
    assert (
        custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", "held")["status"]["conditions"][0][
            "message"
        ]
        == "Can't admit new workloads: is stopped."
    )

    # Deleting a gated pod: Kueue finalizes it, the pod goes, its Workload is finished then collected.
    name = k8s.workload_for_pod(NS, "lost")["metadata"]["name"]
    api.delete_namespaced_pod("lost", NS)
    wait(lambda: k8s.pod(NS, "lost") is None, what="the deleted pod to go")
    (gone,) = [w for w in k8s.workloads(NS, include_deleted=True) if w["metadata"]["name"] == name]
    finished = conditions(gone)["Finished"]
    assert (finished["reason"], finished["message"]) == (
        "OwnerNotFound",
        "The workload's owner no longer exists",
    )
    assert name not in [w["metadata"]["name"] for w in k8s.workloads(NS)]


def test_admission_runs_by_priority_then_fifo_and_visibility_shows_the_queue(k8s, clients):
    api, custom = clients
    k8s.apply_kueue_objects(
        [
            flavor("a100"),
            cluster_queue("cq", 1),
            local_queue("team-x", "cq"),
            local_queue("team-y", "cq"),
            priority_class("low", 10),
            priority_class("high", 1000),
        ]
    )
    api.create_namespaced_pod(
        NS, pod("blocker", "team-x", code="import time; time.sleep(1.0)", priority="low")
    )
    running(k8s, "blocker")
    quick = "import time; time.sleep(0.2)"
    for name, queue, klass in (
        ("low-1", "team-x", "low"),
        ("high-1", "team-y", "high"),
        ("low-2", "team-y", "low"),
        ("high-2", "team-x", "high"),
    ):
        api.create_namespaced_pod(NS, pod(name, queue, code=quick, priority=klass))
    wait(lambda: len(visibility(api, "clusterqueues/cq/pendingworkloads")["items"]) == 4, what="4 pending")
    summary = visibility(api, "clusterqueues/cq/pendingworkloads")
    assert summary["kind"] == "PendingWorkloadsSummary"
    assert summary["apiVersion"] == "visibility.kueue.x-k8s.io/v1beta2"
    rows = [
        (
            i["metadata"]["ownerReferences"][0]["name"],
            i["priority"],
            i["localQueueName"],
            i["positionInClusterQueue"],
            i["positionInLocalQueue"],
        )
        for i in summary["items"]
    ]
    assert rows == [
        ("high-1", 1000, "team-y", 0, 0),
        ("high-2", 1000, "team-x", 1, 0),
        ("low-1", 10, "team-x", 2, 1),
        ("low-2", 10, "team-y", 3, 1),
    ]
    in_lq = visibility(api, f"namespaces/{NS}/localqueues/team-x/pendingworkloads?limit=1&offset=1")["items"]
    assert [
        (i["metadata"]["ownerReferences"][0]["name"], i["positionInClusterQueue"], i["positionInLocalQueue"])
        for i in in_lq
    ] == [("low-1", 2, 1)]
    from kubernetes import client

    with pytest.raises(client.ApiException) as missing:
        visibility(api, "clusterqueues/nope/pendingworkloads")
    assert missing.value.status == 404
    assert (
        json.loads(missing.value.body)["message"] == 'clusterqueue.visibility.kueue.x-k8s.io "nope" not found'
    )
    lq = custom.get_namespaced_custom_object(GROUP, VERSION, NS, "localqueues", "team-x")
    assert (lq["status"]["pendingWorkloads"], lq["status"]["reservingWorkloads"]) == (2, 1)

    wait(
        lambda: all(
            k8s.pod(NS, n) and k8s.pod(NS, n)["status"]["phase"] == "Succeeded"
            for n in ("high-1", "high-2", "low-1", "low-2")
        ),
        timeout=20,
    )
    admitted = [entry[1].split("/")[1] for entry in k8s.admission_log() if entry[3] == "admitted"]
    names = {
        k8s.workload_for_pod(NS, n)["metadata"]["name"]: n
        for n in ("blocker", "high-1", "high-2", "low-1", "low-2")
    }
    assert [names[a] for a in admitted] == ["blocker", "high-1", "high-2", "low-1", "low-2"]
    runs = sorted((r["started"], r["ended"], r["name"]) for r in k8s.container_runs())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(runs)), "one GPU: never two pods at once"
    done = conditions(k8s.workload_for_pod(NS, "low-2"))["Finished"]
    assert (done["status"], done["reason"]) == ("True", "Succeeded")
    assert "kueue.x-k8s.io/managed" not in (k8s.pod(NS, "low-2")["metadata"].get("finalizers") or [])


def test_quota_borrowing_in_a_cohort_up_to_the_borrowing_limit(k8s, clients):
    api, _ = clients
    spot = flavor(
        "spot",
        nodeLabels={"pool": "spot"},
        tolerations=[{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
    )
    k8s.apply_kueue_objects(
        [
            flavor("a100", nodeLabels={"pool": "on-demand"}),
            spot,
            cluster_queue("cq-a", 2, "research", flavors=("a100", "spot"), borrowingLimit=1),
            cluster_queue("cq-b", 2, "research", flavors=("a100", "spot")),
            local_queue("team-a", "cq-a"),
        ]
    )
    for index in range(3):
        api.create_namespaced_pod(NS, pod(f"a-{index}", "team-a"))
        running(k8s, f"a-{index}")
    admission = k8s.workload_for_pod(NS, "a-2")["status"]["admission"]
    assert admission == {
        "clusterQueue": "cq-a",
        "podSetAssignments": [
            {
                "name": "main",
                "flavors": {"cpu": "a100", "memory": "a100", "nvidia.com/gpu": "a100"},
                "resourceUsage": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"},
                "count": 1,
            }
        ],
    }
    started = k8s.pod(NS, "a-2")
    assert started["spec"]["nodeSelector"] == {"pool": "on-demand"}
    assert "schedulingGates" not in started["spec"]
    labels = started["metadata"]["labels"]
    assert (labels["kueue.x-k8s.io/podset"], labels["kueue.x-k8s.io/local-queue-name"]) == ("main", "team-a")
    assert labels["kueue.x-k8s.io/cluster-queue-name"] == "cq-a"
    assert (
        started["metadata"]["annotations"]["kueue.x-k8s.io/workload"]
        == k8s.workload_for_pod(NS, "a-2")["metadata"]["name"]
    )
    # a100 is used up to the borrowing limit (2 nominal + 1 borrowed): the next pod lands on spot.
    api.create_namespaced_pod(NS, pod("a-3", "team-a"))
    spotted = running(k8s, "a-3")
    assert spotted["spec"]["nodeSelector"] == {"pool": "spot"}
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in spotted["spec"]["tolerations"]
    # A nodeSelector only one flavor matches restricts the choice: a100 is full within the limit.
    api.create_namespaced_pod(NS, pod("pinned", "team-a", nodeSelector={"pool": "on-demand"}))
    assert pending_message(k8s, "pinned") == (
        "couldn't assign flavors to pod set main: flavor spot doesn't match node affinity, "
        "insufficient unused quota for nvidia.com/gpu in flavor a100, 1 more needed"
    )
    api.create_namespaced_pod(NS, pod("huge", "team-a", gpus=4))
    assert pending_message(k8s, "huge") == (
        "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor a100, "
        "previously considered podsets requests (0) + current podset request (4) > maximum capacity (3), "
        "insufficient quota for nvidia.com/gpu in flavor spot, previously considered podsets requests (0) "
        "+ current podset request (4) > maximum capacity (3)"
    )
    # Undeclared resources block admission (the default BlockUndeclared quota check).
    disk = pod("disk", "team-a")
    disk["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] = "1Gi"
    api.create_namespaced_pod(NS, disk)
    assert pending_message(k8s, "disk") == (
        "couldn't assign flavors to pod set main: resource ephemeral-storage unavailable in ClusterQueue"
    )
    # The manager's Configuration can exclude it (resources.excludeResourcePrefixes): then it fits.
    k8s.configure_kueue(exclude_resource_prefixes=["ephemeral-storage"])
    assert running(k8s, "disk")["spec"]["nodeSelector"] == {"pool": "spot"}
    usage = k8s.workload_for_pod(NS, "disk")["status"]["admission"]["podSetAssignments"][0]["resourceUsage"]
    assert usage == {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}
    # Freeing borrowed quota admits the pinned pod; the cluster queue's status counts it all.
    api.delete_namespaced_pod("a-0", NS, grace_period_seconds=0)
    assert running(k8s, "pinned")["spec"]["nodeSelector"] == {"pool": "on-demand"}
    log = [(entry[2], entry[3]) for entry in k8s.admission_log()]
    assert log.count(("cq-a", "admitted")) == 6 and ("cq-a", "finished") in log


def test_owner_reclaims_lent_quota_the_borrower_is_stopped_then_deleted(k8s, clients):
    api, custom = clients
    k8s.apply_kueue_objects(
        [
            flavor("a100"),
            cluster_queue("cq-a", 1, "research"),
            cluster_queue("cq-b", 1, "research", preemption={"reclaimWithinCohort": "Any"}),
            local_queue("team-a", "cq-a"),
            local_queue("team-b", "cq-b"),
        ]
    )
    api.create_namespaced_pod(NS, pod("mine", "team-a", code=GRACEFUL))
    api.create_namespaced_pod(NS, pod("borrowed", "team-a", code=GRACEFUL))
    running(k8s, "mine")
    borrower = running(k8s, "borrowed")
    k8s.wait_for_pod(NS, lambda p: "up" in k8s.logs(NS, "borrowed"))
    victim_name = k8s.workload_for_pod(NS, "borrowed")["metadata"]["name"]
    owner = api.create_namespaced_pod(NS, pod("owner", "team-b", code="print('owner ran')"))
    preemptor = wait(lambda: workload_of(custom, owner.metadata.uid))

    marked = k8s.wait_for_pod(
        NS, lambda p: p["metadata"]["name"] == "borrowed" and p["metadata"].get("deletionTimestamp")
    )
    (target,) = [c for c in marked["status"]["conditions"] if c["type"] == "TerminationTarget"]
    message = (
        f"Preempted to accommodate a workload (UID: {preemptor['metadata']['uid']}, "
        f"JobUID: {owner.metadata.uid}) "
        "due to reclamation within the cohort; preemptor path: /research/cq-b; preemptee path: /research/cq-a"
    )
    assert (target["status"], target["reason"], target["message"]) == (
        "True",
        "WorkloadEvictedDueToPreempted",
        message,
    )
    assert (
        marked["metadata"]["deletionGracePeriodSeconds"] == 5
    )  # the pod's own terminationGracePeriodSeconds
    assert {"reason": "Stopped", "message": message}.items() <= next(
        e for e in k8s.events(NS, "borrowed") if e["reason"] == "Stopped"
    ).items()
    victim = next(w for w in k8s.workloads(NS, include_deleted=True) if w["metadata"]["name"] == victim_name)
    state = conditions(victim)
    assert (state["Evicted"]["reason"], state["Evicted"]["message"]) == ("Preempted", message)
    assert (state["Preempted"]["reason"], state["Preempted"]["message"]) == ("InCohortReclamation", message)
    assert victim["status"]["schedulingStats"]["evictions"] == [
        {"reason": "Preempted", "underlyingCause": "", "count": 1}
    ]
    waiting = [
        e["message"] for e in k8s.events(NS, preemptor["metadata"]["name"]) if e["reason"] == "Pending"
    ]
    assert waiting[0] == (
        "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
        "a100, 1 more needed. Pending the preemption of 1 workload(s)"
    )
    # Kueue admits the Workload as soon as the borrower's reservation is gone; the node only takes
    # the owner's pod once the borrower's process has ended and the pod is gone.
    k8s.wait_for_pod(
        NS, lambda p: p["metadata"]["name"] == "owner" and p["status"]["phase"] == "Succeeded", timeout=15
    )
    assert k8s.pod(NS, "borrowed") is None
    runs = {r["name"]: r for r in k8s.container_runs()}
    assert runs["borrowed"]["ended"] <= runs["owner"]["started"]
    assert k8s.pod(NS, "mine")["status"]["phase"] == "Running"  # within its nominal quota: untouched
    assert borrower["metadata"]["uid"] not in [r["uid"] for r in k8s.container_runs() if r["ended"] is None]
    finished = conditions(
        next(w for w in k8s.workloads(NS, include_deleted=True) if w["metadata"]["name"] == victim_name)
    )
    assert finished["Finished"]["reason"] == "OwnerNotFound"
    assert finished["QuotaReserved"]["status"] == "False"


def test_higher_priority_preempts_within_the_cluster_queue(k8s, clients):
    api, _ = clients
    k8s.apply_kueue_objects(
        [
            flavor("a100"),
            cluster_queue("cq", 2, preemption={"withinClusterQueue": "LowerPriority"}),
            local_queue("team", "cq"),
            priority_class("low", 10),
            priority_class("mid", 100),
            priority_class("high", 1000),
        ]
    )
    api.create_namespaced_pod(NS, pod("low", "team", priority="low"))
    api.create_namespaced_pod(NS, pod("mid", "team", priority="mid"))
    running(k8s, "low")
    running(k8s, "mid")
    api.create_namespaced_pod(NS, pod("peer", "team", priority="low"))  # nothing lower: no preemption
    assert pending_message(k8s, "peer") == (
        "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
        "a100, 1 more needed"
    )
    low_workload = k8s.workload_for_pod(NS, "low")["metadata"]["name"]
    api.create_namespaced_pod(NS, pod("high", "team", priority="high"))
    running(k8s, "high")
    assert k8s.pod(NS, "low") is None and k8s.pod(NS, "mid")["status"]["phase"] == "Running"
    victim = next(w for w in k8s.workloads(NS, include_deleted=True) if w["metadata"]["name"] == low_workload)
    preempted = conditions(victim)["Preempted"]
    assert preempted["reason"] == "InClusterQueue"
    assert (
        "due to prioritization in the ClusterQueue; preemptor path: /cq; preemptee path: /cq"
        in preempted["message"]
    )
    assert [e[3] for e in k8s.admission_log() if e[1].endswith(low_workload)] == [
        "admitted",
        "preempted",
        "finished",
    ]
    assert conditions(k8s.workload_for_pod(NS, "peer"))["QuotaReserved"]["status"] == "False"


@needs_crds
def test_objects_are_validated_strictly_against_the_upstream_crds(k8s):
    k8s.apply_kueue(flavor("a100"))
    typo = cluster_queue("cq", 1)
    typo["spec"]["cohort"] = "research"  # v1beta1's name for cohortName
    with pytest.raises(ApiError) as unknown:
        k8s.apply_kueue(typo)
    assert unknown.value.code == 400
    assert unknown.value.message == (
        'ClusterQueue in version "v1beta2" cannot be handled as a ClusterQueue: strict decoding error: '
        'unknown field "spec.cohort"'
    )
    bad = cluster_queue("cq", 1, queueingStrategy="Fastest")
    with pytest.raises(ApiError) as invalid:
        k8s.apply_kueue(bad)
    assert invalid.value.code == 422 and "spec.queueingStrategy" in invalid.value.message
    with pytest.raises(ApiError) as cel:
        k8s.apply_kueue(cluster_queue("cq", 1, borrowingLimit=1))
    assert "borrowingLimit must be nil when cohort is empty" in cel.value.message
    assert k8s.kueue_object("ClusterQueue", "cq") is None
    stored = k8s.apply_kueue(cluster_queue("cq", 1))
    assert stored["spec"]["queueingStrategy"] == "BestEffortFIFO"  # the CRD's defaults are applied
    assert stored["spec"]["preemption"] == {
        "borrowWithinCohort": {"policy": "Never"},
        "reclaimWithinCohort": "Never",
        "withinClusterQueue": "Never",
    }


@needs_crds
def test_workloads_validate_against_the_workload_crd(k8s, clients):
    import jsonschema

    api, _ = clients
    k8s.apply_kueue_objects(
        [
            flavor("a100"),
            cluster_queue("cq", 1, preemption={"withinClusterQueue": "LowerPriority"}),
            local_queue("team", "cq"),
            priority_class("low", 1),
            priority_class("high", 2),
        ]
    )
    api.create_namespaced_pod(NS, pod("first", "team", priority="low", code=GRACEFUL))
    running(k8s, "first")
    api.create_namespaced_pod(NS, pod("second", "team", priority="high", code="print(1)"))
    api.create_namespaced_pod(NS, pod("third", "team", priority="low", gpus=3))
    k8s.wait_for_pod(NS, lambda p: p["metadata"]["name"] == "second" and p["status"]["phase"] == "Succeeded")
    wait(lambda: conditions(k8s.workload_for_pod(NS, "second")).get("Finished"))
    workloads = k8s.workloads(NS, include_deleted=True)
    states = {
        tuple(sorted(c["type"] for c in w["status"].get("conditions", []) if c["status"] == "True"))
        for w in workloads
    }
    assert ("Evicted", "Finished", "Preempted") in states and (
        "Admitted",
        "Finished",
        "QuotaReserved",
    ) in states
    assert () in states  # the third one: pending
    validator = jsonschema.Draft7Validator(strict_schema("workloads"))
    for workload in workloads:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(workload)]
        assert not errors, (workload["metadata"]["name"], errors)


def test_clients_sync_and_async_read_workloads_and_watch_a_gated_pod(k8s, clients, tmp_path):
    """A pod watch sees the gate come off in order; kubernetes_asyncio reads Workloads and positions."""
    from kubernetes import watch

    api, _ = clients
    k8s.apply_kueue_objects([flavor("a100"), cluster_queue("cq", 1), local_queue("team", "cq")])
    api.create_namespaced_pod(NS, pod("holder", "team"))
    running(k8s, "holder")
    listed = api.list_namespaced_pod(NS)
    api.create_namespaced_pod(NS, pod("waiter", "team", code="print('done')"))
    kubeconfig = json.loads(Path(tmp_path / "kubeconfig").read_text())

    async def read() -> tuple[dict, dict]:
        from kubernetes_asyncio import client as aclient
        from kubernetes_asyncio import config as aconfig

        async with await aconfig.new_client_from_config_dict(kubeconfig) as api_client:
            custom = aclient.CustomObjectsApi(api_client)
            uid = k8s.pod(NS, "waiter")["metadata"]["uid"]
            for _ in range(100):
                found = await custom.list_namespaced_custom_object(
                    GROUP, VERSION, NS, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={uid}"
                )
                if found["items"] and conditions(found["items"][0]).get("QuotaReserved"):
                    break
                await asyncio.sleep(0.02)
            summary = await api_client.call_api(
                f"/apis/visibility.kueue.x-k8s.io/{VERSION}/namespaces/{NS}/localqueues/team/pendingworkloads",
                "GET",
                auth_settings=["BearerToken"],
                response_types_map={200: "object"},
                _return_http_data_only=True,
            )
            every = await custom.list_cluster_custom_object(GROUP, VERSION, "workloads")
            assert len(every["items"]) == 2
            return found["items"][0], summary

    workload, summary = asyncio.run(read())
    assert conditions(workload)["QuotaReserved"]["status"] == "False"
    assert [(i["metadata"]["name"], i["positionInLocalQueue"]) for i in summary["items"]] == [
        (workload["metadata"]["name"], 0)
    ]
    api.delete_namespaced_pod("holder", NS, grace_period_seconds=0)
    seen = []
    for event in watch.Watch().stream(
        api.list_namespaced_pod,
        NS,
        field_selector="metadata.name=waiter",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=10,
    ):
        obj = event["object"]
        seen.append(
            (
                event["type"],
                int(obj.metadata.resource_version),
                bool(obj.spec.scheduling_gates),
                obj.status.phase,
            )
        )
        if obj.status.phase == "Succeeded":
            break
    versions = [rv for _, rv, _, _ in seen]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert seen[0][0] == "ADDED" and seen[0][2] is True
    ungated = next(i for i, s in enumerate(seen) if not s[2])
    assert all(not s[2] for s in seen[ungated:]) and seen[-1][3] == "Succeeded"


def test_role_hash_matches_upstream_test_vectors():
    """pod_controller_test.go's pod with a 1-CPU request hashes to ``dc85db45`` (GenerateRoleHash).

    (pod_webhook_test.go's ``a9f06f3a`` hashes an in-memory empty requests map, which a pod served
    by the API server never has: ``omitempty`` drops it, so the webhook sees ``null``.)
    """
    from tests.support.k8s_emulator.kueue_model import role_hash

    spec = {"containers": [{"name": "c", "image": "i", "resources": {"requests": {"cpu": "1"}}}]}
    assert role_hash(spec) == "dc85db45"
    spec["containers"][0]["resources"]["requests"]["cpu"] = "1000m"  # the same quantity, canonical form
    assert role_hash(spec) == "dc85db45"
    spec["tolerations"] = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert role_hash(spec) != "dc85db45"  # tolerations are part of the shape


def test_kueue_is_inert_until_installed(k8s, clients):
    """On a cluster without Kueue, the labels mean nothing: existing tests keep their pods."""
    api, _ = clients
    created = api.create_namespaced_pod(NS, pod("plain", "team", code="print(1)"))
    assert created.spec.scheduling_gates is None and created.metadata.finalizers is None
    k8s.wait_for_pod(NS, lambda p: p["metadata"]["name"] == "plain" and p["status"]["phase"] == "Succeeded")
    assert k8s.workloads() == [] and copy.deepcopy(k8s.admission_log()) == []


# ------------------------------------------------------------------------------------ the pod operator


@pytest.fixture(scope="module")
def dag_folder(tmp_path_factory, airflow_db) -> Iterator[Path]:
    yield from dag_bundle_folder(tmp_path_factory, "kueue-emulator-tests")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_pod_operator_waits_for_admission_then_runs(k8s, tmp_path, dag_folder, deferrable, capfd):
    """The real KubernetesPodOperator with a queue label: gated while the quota is taken, then it runs."""
    k8s.apply_kueue_objects([flavor("a100"), cluster_queue("cq", 1), local_queue("team", "cq")])
    k8s.create_pod(NS, pod("holder", "team", code="import time; time.sleep(1.5)"))
    running(k8s, "holder")
    kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
    dag_id = f"kueue_{'deferrable' if deferrable else 'sync'}"
    source = f"""
import datetime
from airflow.sdk import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

with DAG({dag_id!r}, schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
    KubernetesPodOperator(
        task_id="train", name="train", config_file={str(kubeconfig)!r}, in_cluster=False, namespace={NS!r},
        image="ghcr.io/trainyard/trainer:test", cmds=["python", "-c"],
        arguments=["print('trained on a gpu')"],
        labels={{"kueue.x-k8s.io/queue-name": "team"}}, random_name_suffix=False,
        container_resources=k8s.V1ResourceRequirements(
            requests={{"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}}, limits={{"nvidia.com/gpu": "1"}}
        ),
        get_logs=True, do_xcom_push=False, on_finish_action="delete_pod", deferrable={deferrable!r},
        startup_timeout_seconds=60, startup_check_interval_seconds=1, poll_interval=1, retries=0,
    )
"""
    path = dag_folder / f"{dag_id}.py"
    path.write_text(source)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(path))
    assert not bag.import_errors, bag.import_errors
    dag_run = bag.get_dag(dag_id).test()
    (ti,) = dag_run.get_task_instances()
    assert ti.state == "success", capfd.readouterr().out[-3000:]
    assert "trained on a gpu" in capfd.readouterr().out
    owned = [
        (w["metadata"]["ownerReferences"][0]["name"], w) for w in k8s.workloads(NS, include_deleted=True)
    ]
    (workload,) = [w for owner, w in owned if owner == "train"]
    state = conditions(workload)
    assert state["Finished"]["reason"] == "Succeeded" and state["Admitted"]["status"] == "True"
    assert workload not in k8s.workloads(NS)  # its pod was deleted: garbage-collected
    (admitted,) = [p for p in k8s.admitted_pods() if p["metadata"]["name"] == "train"]
    assert [g["name"] for g in admitted["spec"]["schedulingGates"]] == [
        "kueue.x-k8s.io/admission",
        "kueue.x-k8s.io/topology",
    ]
    runs = {r["name"]: r for r in k8s.container_runs()}
    assert runs["holder"]["ended"] <= runs["train"]["started"]  # it waited for the quota
    assert "Started" in [e["reason"] for e in k8s.events(NS, "train")]
    assert k8s.unknown_routes == []


def test_borrow_within_cohort_preempts_only_below_the_threshold(k8s, clients):
    """``borrowWithinCohort``: a borrowing preemptor may evict lower priorities up to the threshold."""
    api, _ = clients
    k8s.apply_kueue_objects(
        [
            flavor("a100"),
            cluster_queue(
                "cq-a",
                1,
                "research",
                preemption={
                    "reclaimWithinCohort": "LowerPriority",
                    "borrowWithinCohort": {"policy": "LowerPriority", "maxPriorityThreshold": 100},
                },
            ),
            cluster_queue("cq-b", 1, "research"),
            cluster_queue("cq-c", 1, "research"),
            local_queue("team-a", "cq-a"),
            local_queue("team-b", "cq-b"),
            priority_class("low", 50),
            priority_class("mid", 500),
            priority_class("high", 1000),
        ]
    )
    for name, klass in (("b-low-1", "low"), ("b-low-2", "low"), ("b-mid", "mid")):
        api.create_namespaced_pod(NS, pod(name, "team-b", priority=klass))
        running(k8s, name)
    names = {n: k8s.workload_for_pod(NS, n)["metadata"]["name"] for n in ("b-low-1", "b-low-2", "b-mid")}
    api.create_namespaced_pod(NS, pod("a-high", "team-a", gpus=2, priority="high"))
    assert (
        running(
            k8s,
            "a-high",
        )["metadata"]["labels"]["kueue.x-k8s.io/cluster-queue-name"]
        == "cq-a"
    )
    everything = {w["metadata"]["name"]: w for w in k8s.workloads(NS, include_deleted=True)}
    for name in ("b-low-1", "b-low-2"):
        preempted = conditions(everything[names[name]])["Preempted"]
        assert preempted["reason"] == "InCohortReclaimWhileBorrowing"
        assert "due to reclamation within the cohort while borrowing;" in preempted["message"]
    assert "Preempted" not in conditions(everything[names["b-mid"]])  # above the threshold: kept
    assert k8s.pod(NS, "b-mid")["status"]["phase"] == "Running"
