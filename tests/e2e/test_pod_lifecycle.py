"""One run, one pod: the ``train`` task's pod lifecycle under what real clusters do to pods.

Each scenario is a real ``airflow dags test`` of the real DAG against the Kubernetes emulator
(``tests/support/k8s_cluster.py``), in sync mode (dev) and deferrable mode (prod) where the
provider's two code paths differ. The emulator deletes preempted, drained and Kueue-stopped pods
after their grace period, keeps a deleted pod readable while it terminates, can hold scheduling
(no free GPU) and lose a create response; every test also checks that no two trainer processes
of one run ever ran at the same time.

Not here: a worker killed with SIGKILL in sync mode, whose orphan the next Airflow try must adopt
(by UID). ``airflow dags test`` runs the task in its own process and gives every call a new DAG run
id, so that one is a system test with the real scheduler (``tests/system``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.k8s_cluster import (
    Cluster,
    open_cluster,
    running_pod,
    step_logged,
    trainer_processes,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.pod_lifecycle]

SYNC, DEFERRABLE = "sync", "deferrable"
DEFAULT_LINGER = 0.1
BASE = {"on_finish_action": "delete_succeeded_pod", "max_preemption_relaunches": 2}


def _scenario(name: str, **extra: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """The scenario in both modes: environments ``<name>-sync`` and ``<name>-deferrable``."""
    return {
        f"{name}-{mode}": (f"lc-{name}-{mode[0]}", {**BASE, "deferrable": mode == DEFERRABLE, **extra})
        for mode in (SYNC, DEFERRABLE)
    }


SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    **_scenario("disrupt"),
    **_scenario("pending", startup_timeout_seconds=10, retries=1),
    **_scenario("sigterm"),
    **_scenario("budget", execution_timeout_minutes=1),
    **_scenario("perrun", max_preemption_relaunches=1, retries=1),
    **_scenario("lost"),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, airflow_db):
    yield from open_cluster(tmp_path_factory, SCENARIOS)


def _namespace(environment: str) -> str:
    return SCENARIOS[environment][0]


def _assert_one_trainer_at_a_time(cluster: Cluster, namespace: str) -> list[dict]:
    """Every container process of this namespace's run started after the previous one ended."""
    runs = sorted(_namespace_runs(cluster, namespace), key=lambda r: r["started"])
    for before, after in itertools.pairwise(runs):
        assert before["ended"] is not None and before["ended"] <= after["started"], (
            f"trainers of one run overlapped: {before['name']} and {after['name']}"
        )
    return runs


def _admitted_names(cluster: Cluster, namespace: str) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in cluster.emulator.admitted_pods()
        if p["metadata"]["namespace"] == namespace
    ]


@contextlib.contextmanager
def _deleted_pods_linger(cluster: Cluster, seconds: float) -> Iterator[None]:
    """A real API server removes a deleted pod soon after its kubelet reports it ended; how soon
    varies, and each end of that range hides a different bug of the provider's operator."""
    cluster.emulator.set_deleted_pod_linger(seconds)
    try:
        yield
    finally:
        cluster.emulator.set_deleted_pod_linger(DEFAULT_LINGER)


def _wait_for_training(cluster: Cluster, namespace: str, run) -> str:
    name = running_pod(cluster, namespace, run)["metadata"]["name"]
    wait_until(lambda: step_logged(cluster, namespace, name), 120, "a training step", run)
    return name


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("mode", "disruption", "reported"),
    [
        # Sync mode follows the log, so it last read the pod before the scheduler marked it; the
        # pod's events outlive it and name the cause. The trigger polls the pod and sees the mark.
        (SYNC, "preempt", ("disappeared while its trainer was running", "its last event: Preempted")),
        (DEFERRABLE, "preempt", ("was preempted by the cluster (PreemptionByScheduler)",)),
        (SYNC, "kueue_stop", ("disappeared while its trainer was running", "Stopped by Kueue")),
        (DEFERRABLE, "vanish", ("disappeared while its trainer was running",)),
    ],
    ids=["sync-preempt", "deferrable-preempt", "sync-kueue", "deferrable-vanish"],
)
def test_a_disruption_that_deletes_the_pod_relaunches_it(cluster, mode, disruption, reported):
    """Schedulers, drains and Kueue delete the pods they stop; a node lost takes its pod with it."""
    environment = f"disrupt-{mode}"
    namespace = _namespace(environment)
    before = len(_admitted_names(cluster, namespace))
    run = cluster.start(environment)
    name = _wait_for_training(cluster, namespace, run)
    with _deleted_pods_linger(cluster, 0):  # gone the moment its trainer exits: the provider sees a 404
        getattr(cluster.emulator, disruption)(namespace, name)
        code, output, _ = run.finish()

    assert code == 0, output[-6000:]
    for fragment in reported:
        assert fragment in output
    assert "Relaunching (1/2, no Airflow retry used)" in output
    assert len(_admitted_names(cluster, namespace)) - before == 2
    assert cluster.emulator.pod(namespace, name) is None, "the disrupted pod was deleted"
    _assert_one_trainer_at_a_time(cluster, namespace)


def test_a_pod_deleted_before_it_ever_ran_is_a_scheduling_problem(cluster):
    namespace = _namespace(f"disrupt-{SYNC}")
    before = len(_admitted_names(cluster, namespace))
    cluster.emulator.hold_scheduling()
    try:
        run = cluster.start(f"disrupt-{SYNC}")
        pending = wait_until(
            lambda: [p for p in cluster.emulator.pods(namespace) if p["status"].get("phase") == "Pending"],
            120,
            "a Pending pod",
            run,
        )
        time.sleep(2)  # the task is waiting for it to start
        cluster.emulator.vanish(namespace, pending[0]["metadata"]["name"])
        code, output, _ = run.finish()
    finally:
        cluster.emulator.release_scheduling()
    assert code != 0
    assert "was deleted before its trainer ever started; it never got a node" in output, output[-6000:]
    assert "Relaunching" not in output
    assert len(_admitted_names(cluster, namespace)) - before == 1


@pytest.mark.parametrize("mode", [SYNC, DEFERRABLE])
def test_a_pending_pod_past_its_startup_timeout_is_gone_before_the_retry(cluster, mode):
    """With ``delete_succeeded_pod`` the provider keeps a timed-out Pending pod, which would train
    beside the retry's pod once a GPU frees up."""
    environment = f"pending-{mode}"
    namespace = _namespace(environment)
    cluster.emulator.hold_scheduling()
    try:
        run = cluster.start(environment)
        wait_until(
            lambda: "was never scheduled within the startup timeout" in run.output(), 180, "the timeout", run
        )
        first = _admitted_names(cluster, namespace)[0]
        wait_until(lambda: cluster.emulator.pod(namespace, first) is None, 30, "the timed-out pod to go", run)
        wait_until(lambda: len(_admitted_names(cluster, namespace)) == 2, 120, "the retry's pod", run)
    finally:
        cluster.emulator.release_scheduling()
    code, output, _ = run.finish()

    assert code == 0, output[-6000:]
    assert "Insufficient nvidia.com/gpu" in output
    runs = _assert_one_trainer_at_a_time(cluster, namespace)
    assert [r["name"] for r in runs] == [_admitted_names(cluster, namespace)[1]], "only the retry's pod ran"


def test_sigterm_while_training_never_marks_train_successful(cluster):
    """The provider deletes the pod in ``on_kill``; a kubelet keeps it readable while the trainer
    saves its checkpoint, so the provider's wait ends as if training had finished."""
    environment = f"sigterm-{SYNC}"
    namespace = _namespace(environment)
    run = cluster.start(environment)
    name = _wait_for_training(cluster, namespace, run)
    with _deleted_pods_linger(cluster, 2):  # readable after its trainer exits, as a kubelet keeps it
        os.kill(run.proc.pid, signal.SIGTERM)
        code, output, _ = run.finish()

    assert code != 0, output[-6000:]
    assert "train was stopped (SIGTERM, or marked failed) while its pod was training" in output
    assert "SIGTERM received" in cluster.emulator.logs(namespace, name)
    wait_until(lambda: cluster.emulator.pod(namespace, name) is None, 30, "the pod to be gone")
    assert not [r for r in _namespace_runs(cluster, namespace) if r["ended"] is None]


def _namespace_runs(cluster: Cluster, namespace: str) -> list[dict]:
    names = set(_admitted_names(cluster, namespace))
    return [r for r in cluster.emulator.container_runs() if r["name"] in names]


@pytest.mark.parametrize("mode", [SYNC, DEFERRABLE])
def test_a_relaunched_pod_gets_only_what_is_left_of_the_timeout(cluster, mode):
    environment = f"budget-{mode}"
    namespace = _namespace(environment)
    run = cluster.start(environment, conf={"max_steps": 1_000_000})
    name = _wait_for_training(cluster, namespace, run)
    time.sleep(10)
    cluster.emulator.preempt(namespace, name)
    code, output, elapsed = run.finish()

    assert code != 0
    assert "Relaunching (1/2" in output, output[-6000:]
    first, second = [p for p in cluster.emulator.admitted_pods() if p["metadata"]["namespace"] == namespace]
    assert first["spec"]["activeDeadlineSeconds"] <= 60
    assert second["spec"]["activeDeadlineSeconds"] <= first["spec"]["activeDeadlineSeconds"] - 10
    assert "AirflowTaskTimeout" in output
    if mode == DEFERRABLE:  # in sync mode Airflow's own alarm raises it
        assert "train ran past its execution_timeout" in output
    assert "ran past activeDeadlineSeconds" not in output
    assert elapsed < 60 + 45, f"the task ended {elapsed:.0f}s after it started, past its 60s budget"
    wait_until(lambda: not trainer_processes(cluster.home), 30, "no trainer process left")
    _assert_one_trainer_at_a_time(cluster, namespace)


def test_relaunches_are_counted_per_dag_run_not_per_try(cluster):
    environment = f"perrun-{SYNC}"
    namespace = _namespace(environment)
    run = cluster.start(environment)
    for pods in (1, 2, 3):
        wait_until(
            lambda pods=pods: len(_admitted_names(cluster, namespace)) == pods, 120, f"pod {pods}", run
        )
        cluster.emulator.preempt(namespace, _wait_for_training(cluster, namespace, run))
    code, output, _ = run.finish()

    assert code != 0
    assert output.count("Relaunching (1/1, no Airflow retry used)") == 1, output[-6000:]
    assert output.count("gave up after 1 relaunches (max_preemption_relaunches)") == 2
    assert len(_admitted_names(cluster, namespace)) == 3
    _assert_one_trainer_at_a_time(cluster, namespace)


@pytest.mark.parametrize("mode", [SYNC, DEFERRABLE])
def test_a_lost_create_response_adopts_the_pod_it_created(cluster, mode):
    environment = f"lost-{mode}"
    namespace = _namespace(environment)
    cluster.emulator.lose_create_responses(1)
    code, output, _ = cluster.start(environment).finish()

    assert code == 0, output[-6000:]
    assert "(its reply was lost); adopting it" in output
    assert cluster.posts(namespace) == 2
    assert len(_admitted_names(cluster, namespace)) == 1
    _assert_one_trainer_at_a_time(cluster, namespace)
