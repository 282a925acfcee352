"""A queued run is a waiting run: the ``train`` task under Kueue, end to end.

Real ``airflow dags test`` runs of the real DAG, its real KubernetesPodOperator and trainer,
against the Kubernetes emulator speaking Kueue (its pod webhook's admission gate, Workloads with
Kueue's conditions, admission against ClusterQueue quotas with borrowing in a cohort, preemption,
the visibility API). Kueue's controller cannot run here; what the emulator does and simplifies is
in its package docstring. The ClusterQueues, LocalQueues, ResourceFlavors and
WorkloadPriorityClasses are not written by hand: the trainyard-cluster chart renders them from
these tests' environment files (``tests/support/kueue_cluster.py``).

The cohort has one GPU: prod's team ``qa`` owns it (nominal 1), dev's team ``qa`` has none
guaranteed and borrows it while prod leaves it idle.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.support.k8s_cluster import (
    KUEUE_GPU_TYPES,
    Cluster,
    kueue_team,
    open_cluster,
    running_pod,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.pod_lifecycle]

DEV, DEV_DEFERRABLE, PROD, LIMITED = "kq-dev", "kq-dev-deferrable", "kq-prod", "kq-limited"
NAMESPACES = {DEV: "kq-dev", DEV_DEFERRABLE: "kq-dev-d", PROD: "kq-prod", LIMITED: "kq-limited"}
#: Each environment's PriorityClass, and WorkloadPriorityClass of the same name.
PRIORITY = {env: f"trainyard-{namespace}" for env, namespace in NAMESPACES.items()}
STARTUP_TIMEOUT = 10
HELD = STARTUP_TIMEOUT + 6  # a queued run waits longer than its startup timeout, and is fine


def _kueue(priority_class: str, team: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "scheduling": "kueue",
        "gpu_types": KUEUE_GPU_TYPES,
        "kueue": {"status_interval_seconds": 1},
        "priority_class": priority_class,
        "startup_timeout_seconds": STARTUP_TIMEOUT,
        "on_finish_action": "delete_succeeded_pod",
        "teams": team,
        **extra,
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, airflow_db):
    dev_team = kueue_team(gpus=0)  # borrow_gpus null: any idle GPU of the cohort
    scenarios = {
        DEV: (NAMESPACES[DEV], _kueue(PRIORITY[DEV], dev_team)),
        DEV_DEFERRABLE: (
            NAMESPACES[DEV_DEFERRABLE],
            _kueue(PRIORITY[DEV_DEFERRABLE], dev_team, deferrable=True),
        ),
        LIMITED: (NAMESPACES[LIMITED], _kueue(PRIORITY[LIMITED], dev_team, max_queue_wait_minutes=0.15)),
        PROD: (NAMESPACES[PROD], _kueue(PRIORITY[PROD], kueue_team(gpus=1))),
    }
    kueue = {DEV: "dev", DEV_DEFERRABLE: "dev", LIMITED: "dev", PROD: "prod"}
    yield from open_cluster(tmp_path_factory, scenarios, kueue=kueue)


def _blocker(cluster: Cluster, environment: str, name: str) -> dict:
    """Another run of team qa holding the cohort's GPU: a plain pod in the team's LocalQueue."""
    namespace = NAMESPACES[environment]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "kueue.x-k8s.io/queue-name": "qa",
                "kueue.x-k8s.io/priority-class": PRIORITY[environment],
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "base",
                    "image": "ghcr.io/trainyard/blocker:1",
                    "command": ["python", "-c", "import time; time.sleep(600)"],
                    "resources": {
                        "requests": {"nvidia.com/gpu": "1", "cpu": "100m", "memory": "64Mi"},
                        "limits": {"nvidia.com/gpu": "1", "cpu": "100m", "memory": "64Mi"},
                    },
                }
            ],
        },
    }
    cluster.emulator.create_pod(namespace, body)
    try:
        return cluster.emulator.wait_for_pod(
            namespace, lambda p: p["metadata"]["name"] == name and _running(p), 60
        )
    except TimeoutError:
        conditions = [
            (w["metadata"]["namespace"], w["metadata"]["name"], w.get("status", {}).get("conditions"))
            for w in cluster.emulator.workloads()
        ]
        pods = [(p["metadata"]["name"], p["status"]) for p in cluster.emulator.pods(namespace)]
        raise AssertionError(f"blocker {name} did not run; workloads: {conditions}; pods: {pods}") from None


def _running(pod: dict) -> bool:
    return pod["status"].get("phase") == "Running"


def _gated(pod: dict) -> bool:
    return any(g["name"] == "kueue.x-k8s.io/admission" for g in pod["spec"].get("schedulingGates") or [])


def _train_pods(cluster: Cluster, namespace: str) -> list[dict]:
    return [p for p in cluster.emulator.pods(namespace) if p["metadata"]["name"].startswith("train-")]


def _queue_tags(cluster: Cluster, environment: str) -> dict[str, str]:
    (run,) = cluster.runs(environment)
    return {k: v for k, v in run.data.tags.items() if k.startswith("trainyard.queue.")}


@pytest.mark.parametrize("environment", [DEV, DEV_DEFERRABLE])
def test_a_run_at_quota_waits_saying_where_it_stands_then_trains(cluster, environment):
    namespace = NAMESPACES[environment]
    _blocker(cluster, environment, f"blocker-{namespace}")
    run = cluster.start(environment)
    queued = wait_until(
        lambda: [p for p in _train_pods(cluster, namespace) if _gated(p)], 120, "a gated training pod", run
    )
    wait_until(lambda: run.output().count("waiting for GPU quota in qa") >= 3, 90, "queue reports", run)
    time.sleep(HELD)  # longer than startup_timeout_seconds: the provider alone would fail it
    assert run.proc.poll() is None, "a queued run waits, it does not fail"
    cluster.emulator.delete_pod(namespace, f"blocker-{namespace}", grace=0)
    code, output, _ = run.finish()
    assert code == 0, output[-4000:]

    line = next(line for line in output.splitlines() if "waiting for GPU quota in qa" in line)
    assert f"(ClusterQueue trainyard-{environment}-qa)" in line
    assert "position 1 in the team queue, 1 in the cluster queue" in line
    assert "reason Pending: couldn't assign flavors to pod set main: insufficient unused quota" in line
    assert "admitted by Kueue into ClusterQueue" in output
    assert len(queued) == 1 and cluster.posts(namespace) == 1, "one pod, which waited and then ran"
    tags = _queue_tags(cluster, environment)
    assert float(tags["trainyard.queue.wait_seconds"]) >= HELD
    assert tags["trainyard.queue.waits"] == "1"
    assert tags["trainyard.queue.first_position_in_local_queue"] == "1"
    detail = json.loads(tags["trainyard.queue.detail"])
    assert detail[0]["cluster_queue"] == f"trainyard-{environment}-qa" and detail[0]["admitted"] is True


def test_a_run_past_max_queue_wait_fails_naming_the_queue_and_the_quota(cluster):
    namespace = NAMESPACES[LIMITED]
    _blocker(cluster, LIMITED, "blocker-limited")
    try:
        run = cluster.start(LIMITED)
        code, output, _ = run.finish()
    finally:
        cluster.emulator.delete_pod(namespace, "blocker-limited", grace=0)
    assert code != 0
    assert "longer than kubernetes.max_queue_wait_minutes (0.15)" in output
    assert "GPU quota in LocalQueue qa (ClusterQueue trainyard-kq-limited-qa)" in output
    assert "Team qa's quota: 0 tiny GPUs guaranteed, any idle GPU of the cohort borrowed" in output
    assert "reason Pending" in output
    assert cluster.posts(namespace) == 1, "no relaunch, no retry"
    assert not [
        p for p in _train_pods(cluster, namespace) if p["status"].get("phase") in ("Pending", "Running")
    ]


def test_prod_reclaims_its_gpu_and_the_dev_run_queues_again_and_resumes(cluster):
    namespace = NAMESPACES[DEV]
    before = len(cluster.runs(DEV))
    run = cluster.start(DEV)
    first = running_pod(cluster, namespace, run)
    wait_until(cluster.checkpoints, 120, "a first checkpoint", run, interval=0.05)
    # Prod's team submits: its GPU is lent to dev, so Kueue preempts dev's run to give it back.
    _blocker(cluster, PROD, "prod-run")
    second = wait_until(
        lambda: [
            p for p in _train_pods(cluster, namespace) if p["metadata"]["name"] != first["metadata"]["name"]
        ],
        120,
        "the relaunched pod",
        run,
    )[0]
    assert _gated(second) or second["status"].get("phase") == "Pending", "the new pod queues again"
    time.sleep(3)
    cluster.emulator.delete_pod(NAMESPACES[PROD], "prod-run", grace=0)  # prod's run is done
    code, output, _ = run.finish()
    assert code == 0, output[-4000:]
    assert "was preempted by Kueue (WorkloadEvictedDueToPreempted)" in output
    assert "not counted against max_preemption_relaunches" in output
    assert cluster.posts(namespace) >= 2
    runs = cluster.runs(DEV)
    assert len(runs) == before + 1, "one MLflow run for the DAG run, resumed"
    newest = max(runs, key=lambda r: r.info.start_time)
    assert int(newest.data.tags["trainyard.resumed_from_step"]) > 0
    detail = json.loads(newest.data.tags["trainyard.queue.detail"])
    assert detail and detail[-1]["seconds"] >= 2, "the second wait is recorded like the first"
