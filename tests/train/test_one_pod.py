"""One run, one pod: ``RunPods`` with the real ``kubernetes`` client against the emulator.

The pods run a small Python process (no trainer), so each case takes about a second.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.support.k8s_emulator import KubernetesEmulator
from trainyard.train.budget import BudgetSpent, deadline_for, seconds_left
from trainyard.train.one_pod import LAUNCH_ANNOTATION, PodNotGone, RunPods, adoptable, new_launch_id
from trainyard.train.run_state import STATE_KEY, MemoryStore, OwnedPod, RunState

NAMESPACE = "runs"
RUN = {"trainyard.io/pipeline": "p", "trainyard.io/dag-run": "manual__1"}
SELECTOR = ",".join(f"{k}={v}" for k, v in RUN.items())
# Exits on SIGTERM after a second, as the trainer does once its checkpoint is saved.
SLEEPER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), sys.exit(143)))\n"
    "time.sleep(120)\n"
)
STUBBORN = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with KubernetesEmulator() as k8s:
        k8s.add_namespace(NAMESPACE)
        yield k8s


@pytest.fixture
def api(emulator, tmp_path):
    api_client = config.new_client_from_config(str(emulator.write_kubeconfig(tmp_path / "kubeconfig")))
    yield client.CoreV1Api(api_client)
    for pod in emulator.pods(NAMESPACE):
        emulator.delete_pod(NAMESPACE, pod["metadata"]["name"], 0)


def _pod(name: str, code: str = SLEEPER, labels: dict | None = None, grace: int = 5) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name, labels=labels or RUN, annotations={LAUNCH_ANNOTATION: new_launch_id()}
        ),
        spec=client.V1PodSpec(
            restart_policy="Never",
            termination_grace_period_seconds=grace,
            containers=[
                client.V1Container(name="base", image="python:3.11", command=[sys.executable, "-c", code])
            ],
        ),
    )


def _running(emulator: KubernetesEmulator, name: str) -> dict:
    return emulator.wait_for_pod(
        NAMESPACE, lambda p: p["metadata"]["name"] == name and p["status"].get("phase") == "Running"
    )


def _pods(api) -> RunPods:
    return RunPods(client=api, namespace=NAMESPACE, selector=SELECTOR, grace_seconds=5)


def test_settle_adopts_the_recorded_pod_and_deletes_every_other_active_one(emulator, api):
    pods = _pods(api)
    mine = pods.create(_pod("train-a"))
    pods.create(_pod("train-b"))
    api.create_namespaced_pod(
        NAMESPACE, _pod("other-run", labels={**RUN, "trainyard.io/dag-run": "manual__2"})
    )
    for name in ("train-a", "train-b", "other-run"):
        _running(emulator, name)

    kept = pods.settle(mine.metadata.uid)

    assert kept.metadata.uid == mine.metadata.uid
    names = {p["metadata"]["name"] for p in emulator.pods(NAMESPACE)}
    assert names == {"train-a", "other-run"}, "train-b is gone (waited for), another run's pod untouched"
    runs = {r["name"]: r for r in emulator.container_runs()}
    assert runs["train-b"]["ended"] is not None


def test_a_pod_is_never_adopted_by_name_alone(emulator, api):
    pods = _pods(api)
    first = pods.create(_pod("train-c"))
    _running(emulator, "train-c")
    emulator.delete_pod(NAMESPACE, "train-c", 0)
    deadline = time.monotonic() + 10
    while emulator.pod(NAMESPACE, "train-c") is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first pod lingers a moment in its final phase, then goes
    again = pods.create(_pod("train-c"))  # same name, another pod
    _running(emulator, "train-c")

    assert pods.settle(first.metadata.uid) is None
    assert emulator.pod(NAMESPACE, "train-c") is None
    assert again.metadata.uid != first.metadata.uid


def test_finished_pods_stay_for_their_logs_and_stopping_pods_are_not_adopted(emulator, api):
    pods = _pods(api)
    done = pods.create(_pod("train-done", code="print('done')"))
    emulator.wait_for_pod(
        NAMESPACE, lambda p: p["metadata"]["name"] == "train-done" and p["status"]["phase"] == "Succeeded"
    )
    marked = pods.create(_pod("train-marked"))
    _running(emulator, "train-marked")
    pod = api.read_namespaced_pod("train-marked", NAMESPACE)  # as Kueue marks it before deleting it
    pod.status.conditions = [client.V1PodCondition(type="TerminationTarget", status="True")]

    assert not adoptable(pod, marked.metadata.uid)
    assert adoptable(api.read_namespaced_pod("train-done", NAMESPACE), done.metadata.uid)
    assert pods.settle(None) is None
    assert {p["metadata"]["name"] for p in emulator.pods(NAMESPACE)} == {"train-done"}


def test_a_lost_create_response_adopts_our_pod_and_a_foreign_conflict_is_refused(emulator, api):
    pods = _pods(api)
    emulator.lose_create_responses(1)
    created = pods.create(_pod("train-lost"))
    assert created.metadata.name == "train-lost" and created.metadata.uid
    assert len([p for p in emulator.admitted_pods() if p["metadata"]["name"] == "train-lost"]) == 1

    with pytest.raises(ApiException) as refused:
        pods.create(_pod("train-lost"))  # same name, another launch id: not ours
    assert refused.value.status == 409


def test_a_pod_that_will_not_go_stops_the_launch(emulator, api):
    api.create_namespaced_pod(NAMESPACE, _pod("train-stubborn", code=STUBBORN, grace=60))
    _running(emulator, "train-stubborn")
    deadline = time.monotonic() + 10
    while "ready" not in emulator.logs(NAMESPACE, "train-stubborn") and time.monotonic() < deadline:
        time.sleep(0.05)  # its SIGTERM handler is installed
    api.delete_namespaced_pod("train-stubborn", NAMESPACE, grace_period_seconds=60)
    pods = RunPods(client=api, namespace=NAMESPACE, selector=SELECTOR, grace_seconds=1, margin=1)

    with pytest.raises(PodNotGone, match="train-stubborn"):
        pods.wait_gone(["train-stubborn"])


# ------------------------------------------------------------------------------ what a run remembers


def test_the_run_state_round_trips_and_an_unreadable_one_starts_afresh(caplog):
    store = MemoryStore()
    assert RunState.load(store) == RunState()
    state = RunState(relaunches=2, pod=OwnedPod(namespace="ns", name="train-x", uid="u-1"))
    state.save(store)
    assert RunState.load(store) == state
    store.set(STATE_KEY, {"relaunches": "many"})
    assert RunState.load(store) == RunState()
    assert "Ignoring an unreadable train state" in caplog.text


START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TEN_MINUTES = timedelta(minutes=10)


@pytest.mark.parametrize(
    ("started", "timeout", "now", "left"),
    [
        (START, None, START, None),
        (START, TEN_MINUTES, START, 600),
        (START, TEN_MINUTES, START + timedelta(minutes=7), 180),
        (START, TEN_MINUTES, START + timedelta(seconds=599.5), "spent"),
        (START, TEN_MINUTES, START + timedelta(minutes=11), "spent"),
        (None, TEN_MINUTES, START, 600),  # no start date yet: the try starts now
    ],
)
def test_each_pod_gets_what_is_left_of_the_timeout(started, timeout, now, left):
    deadline = deadline_for(started, timeout, now)
    if left == "spent":
        with pytest.raises(BudgetSpent, match="execution_timeout"):
            seconds_left(deadline, now)
    else:
        assert seconds_left(deadline, now) == left
