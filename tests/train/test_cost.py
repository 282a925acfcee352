"""The GPU cost of a run (``trainyard.cost``): queued, running, lost to preemption, and its price."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from trainyard.cost import (
    PodTime,
    StepPoint,
    cost_tags,
    metrics_of,
    observed_times,
    passed_step,
    run_cost,
    tags_of,
)
from trainyard.train.run_state import MemoryStore, RunState

T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=5)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def pod(name: str, created: float, started: float | None, ended: float | None, end=None, **kw) -> PodTime:
    return PodTime(
        pod=name,
        uid=f"uid-{name}",
        created_at=at(created),
        started_at=None if started is None else at(started),
        ended_at=None if ended is None else at(ended),
        end=end,
        **kw,
    )


def steps(start_s: float, first: int, last: int, every: int, seconds_per_step: float) -> list[StepPoint]:
    """A pod logging every ``every`` steps from step ``first``, training from ``start_s`` on."""
    return [
        StepPoint(s, T0.timestamp() + start_s + (s - first + every) * seconds_per_step)
        for s in range(first, last + 1, every)
    ]


# Each pod trains at 1 s/step after 20 s of setup and logs every 10 steps.
# One pod: created at 0, started at 30, trains steps 1..100 (logged at 60..150), ends at 160.
ONE = [pod("a", 0, 30, 160, "succeeded")]
# Preempted at step 55 (ended 105; step 50 logged at 100); SIGTERM saved step 55 (tagged).
GRACEFUL = [
    pod("a", 0, 30, 107, "disrupted", checkpoint_step=55),
    pod("b", 110, 150, 235, "succeeded"),
]
GRACEFUL_STEPS = steps(50, 10, 50, 10, 1.0) + steps(170, 60, 100, 10, 1.0)
# Killed hard at step 55 (ended 105): the newest periodic checkpoint was step 40, logged at 90.
HARD = [pod("a", 0, 30, 105, "disrupted"), pod("b", 110, 150, 250, "succeeded")]
HARD_STEPS = steps(50, 10, 50, 10, 1.0) + steps(170, 50, 100, 10, 1.0)


@pytest.mark.parametrize(
    ("pods", "history", "resumed", "expected"),
    [
        pytest.param(ONE, steps(50, 10, 100, 10, 1.0), 0, (30, 130, 0), id="no-relaunch"),
        # Lost: the 2 s from step 55 (105: 100 + 5 s at the pod's pace) to its end at 107.
        pytest.param(GRACEFUL, GRACEFUL_STEPS, 55, (30 + 40, 77 + 85, 2), id="graceful-preemption"),
        # Lost: from step 40 (90) to the kill (105); the resume step is the MLflow tag's.
        pytest.param(HARD, HARD_STEPS, 40, (70, 75 + 100, 15), id="hard-kill"),
        # Same, the resume step unknown: the newest step below the next pod's first (50) is 40.
        pytest.param(HARD, HARD_STEPS, None, (70, 175, 15), id="hard-kill-resume-from-history"),
        # A pod that logged no step loses all it ran (its setup is done again).
        pytest.param(
            [pod("a", 0, 30, 45, "disrupted"), pod("b", 50, 60, 200, "succeeded")],
            steps(80, 10, 100, 10, 1.0),
            0,
            (40, 155, 15),
            id="killed-during-setup",
        ),
        # The last pod preempted with no pod after it (yet): nothing was done again.
        pytest.param(
            [pod("a", 0, 30, 105, "disrupted")],
            steps(50, 10, 50, 10, 1.0),
            None,
            (30, 75, 0),
            id="no-successor",
        ),
        # Never started (deleted while Pending): its time is queued only.
        pytest.param(
            [pod("a", 0, None, 600, "stopped"), *ONE],
            steps(50, 10, 100, 10, 1.0),
            0,
            (630, 130, 0),
            id="never-ran",
        ),
        pytest.param(HARD, None, None, (70, 175, None), id="progress-unreadable"),
    ],
)
def test_seconds_queued_running_and_lost(pods, history, resumed, expected):
    """``expected``: seconds (queued, running, lost)."""
    queued, running, lost = expected
    cost = run_cost(
        pods,
        gpus=4,
        gpu_type="a100",
        price_per_gpu_hour=3.6,
        currency="EUR",
        now=NOW,
        history=history,
        last_resumed_from=resumed,
    )
    assert (cost.queued_seconds, cost.running_seconds) == (queued, running)
    assert cost.lost_seconds == (lost if lost is None else pytest.approx(lost, abs=1e-3))
    assert cost.gpu_seconds_running == running * 4 and cost.gpu_seconds_queued == queued * 4
    # Priced: running (lost included), never queued; 3.6 per GPU-hour = 0.001 per GPU-second.
    assert cost.cost == pytest.approx(running * 4 * 0.001)
    assert cost.pods == len(pods)


def test_a_retry_adds_to_the_earlier_tries_seconds():
    store = MemoryStore()
    first = RunState().with_pod_time(uid="u1", name="p1", times={"created_at": at(0), "started_at": at(10)})
    first = first.with_pod_time(uid="u1", name="p1", ended_at=at(70), end="failed")
    first.save(store)
    # The next try (a fresh operator) loads the state and adds its own pod.
    second = RunState.load(store).with_pod_time(
        uid="u2", name="p2", times={"created_at": at(100), "started_at": at(105), "ended_at": at(205)}
    )
    cost = run_cost(
        second.pods, gpus=1, gpu_type=None, price_per_gpu_hour=None, currency="USD", now=NOW, history=[]
    )
    assert (cost.queued_seconds, cost.running_seconds, cost.lost_seconds) == (15, 160, 0)
    assert cost.cost is None, "no price: no cost"
    assert "trainyard.cost" not in metrics_of(cost)
    # A re-read of the same pod merges into its record; its start never moves.
    again = second.with_pod_time(uid="u2", name="p2", times={"started_at": at(999)})
    assert len(again.pods) == 2 and again.pods[1].started_at == at(105)


def test_a_pod_without_an_end_ends_now_and_kueue_waits_count_for_pods_that_never_started():
    pods = [pod("a", 0, None, None), pod("b", 0, 10, None)]
    cost = run_cost(
        pods,
        gpus=2,
        gpu_type=None,
        price_per_gpu_hour=1.0,
        currency="USD",
        now=at(100),
        queue_waits={"a": 42.5},
    )
    assert (cost.queued_seconds, cost.running_seconds) == (52.5, 90)


def test_a_local_process_has_no_gpu_and_costs_nothing_when_priced():
    cost = run_cost(
        [pod("local", 0, 0, 60, "succeeded")],
        gpus=0,
        gpu_type=None,
        price_per_gpu_hour=2.0,
        currency="USD",
        now=NOW,
        history=[],
    )
    assert (cost.running_seconds, cost.gpu_seconds_running, cost.cost) == (60, 0, 0)
    assert tags_of(cost)["trainyard.gpu_type"] == "default"


def test_passed_step_stays_inside_the_pods_run():
    points = [StepPoint(10, 100.0), StepPoint(20, 110.0)]
    assert passed_step(points, 15, 50, 200) == 105
    assert passed_step(points, 500, 50, 200) == 200  # extrapolated past its end: its end
    assert passed_step(points, 0, 95, 200) == 95  # before its start: its start
    assert passed_step([], 7, 50, 200) == 50


def test_observed_times_from_a_v1pod_and_from_a_triggers_dict():
    from kubernetes.client import (
        V1ContainerState,
        V1ContainerStateTerminated,
        V1ContainerStatus,
        V1ObjectMeta,
        V1Pod,
        V1PodStatus,
    )

    terminated = V1ContainerStateTerminated(exit_code=0, started_at=at(30), finished_at=at(160))
    v1 = V1Pod(
        metadata=V1ObjectMeta(name="p", creation_timestamp=at(0)),
        status=V1PodStatus(
            container_statuses=[
                V1ContainerStatus(
                    name="base",
                    image="i",
                    image_id="",
                    ready=False,
                    restart_count=0,
                    state=V1ContainerState(terminated=terminated),
                )
            ]
        ),
    )
    assert observed_times(v1) == {"created_at": at(0), "started_at": at(30), "ended_at": at(160)}
    facts = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [
                {"name": "base", "state": {"terminated": {"startedAt": str(at(30)), "exitCode": 137}}}
            ]
        },
    }
    assert observed_times(facts) == {"started_at": at(30)}


def test_cost_tags_for_the_model_version():
    cost = run_cost(
        HARD,
        gpus=4,
        gpu_type="a100",
        price_per_gpu_hour=3.6,
        currency="EUR",
        now=NOW,
        history=HARD_STEPS,
        last_resumed_from=40,
    )
    run = SimpleNamespace(data=SimpleNamespace(metrics=metrics_of(cost), tags=tags_of(cost)))
    assert cost_tags(run) == {
        "trainyard.gpu_hours.queued": "0.0778",
        "trainyard.gpu_hours.running": "0.1944",
        "trainyard.gpu_hours.lost": "0.0167",
        "trainyard.cost": "0.70",
        "trainyard.currency": "EUR",
        "trainyard.gpu_type": "a100",
        "trainyard.gpus": "4",
    }
    assert cost_tags(SimpleNamespace(data=SimpleNamespace(metrics={}, tags={}))) == {}
