"""The wait for Kueue's admission: what it reads from a Workload, what it says, when it gives up.

The loop reads the pod and Kueue through injected callables; here they replay a scripted
sequence of pods (gated, gated, admitted) and Workloads shaped like Kueue v0.19.2's, and the
clock is a counter, so the reporting interval and the limit are exact. The same loop against the
emulated Kueue and the real operator is in tests/e2e/test_kueue_queueing.py.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from trainyard.config.loading import load_environment
from trainyard.train.queue_wait import (
    ADMISSION_GATE,
    NotQueued,
    QueueFacts,
    QueueSettings,
    QueueWaitTimeout,
    await_admission,
    facts_from,
    queue_summary,
    queue_tags,
    quota_text,
    timeout_message,
    waiting_line,
)

SETTINGS = QueueSettings(
    namespace="trainyard-dev",
    local_queue="nlp",
    cluster_queue="trainyard-dev-nlp",
    max_wait_seconds=600,
    status_interval_seconds=60,
    quota="2 a100 GPUs guaranteed",
    environment_file="dags/environments/dev.yaml",
    team="nlp",
)
PENDING_MESSAGE = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
    "trainyard-a100, 1 more needed"
)


def _workload(name: str = "pod-train-abc-1f2e3", **conditions: tuple[str, str, str]) -> dict:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {"name": name, "namespace": "trainyard-dev", "creationTimestamp": "2026-12-01T10:00:00Z"},
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": reason, "message": message}
                for kind, (status, reason, message) in conditions.items()
            ]
        },
    }


def _pending(*names: str) -> dict:
    return {
        "kind": "PendingWorkloadsSummary",
        "apiVersion": "visibility.kueue.x-k8s.io/v1beta2",
        "items": [
            {
                "metadata": {"name": name, "namespace": "trainyard-dev"},
                "priority": 1000,
                "localQueueName": "nlp",
                "positionInClusterQueue": index + 2,
                "positionInLocalQueue": index,
            }
            for index, name in enumerate(names)
        ],
    }


def _pod(
    gated: bool, name: str = "train-abc", managed: bool = True, created: datetime | None = None
) -> SimpleNamespace:
    """A pod as the client returns it: Kueue's webhook gated and labelled it (``managed``)."""
    gates = [SimpleNamespace(name=ADMISSION_GATE)] if gated else None
    labels = {"kueue.x-k8s.io/managed": "true"} if managed else {}
    metadata = SimpleNamespace(name=name, uid="u-1", labels=labels, creation_timestamp=created)
    return SimpleNamespace(metadata=metadata, spec=SimpleNamespace(scheduling_gates=gates))


def test_facts_come_from_the_workloads_conditions_and_the_visibility_api():
    workload = _workload(
        QuotaReserved=("False", "Pending", PENDING_MESSAGE), Admitted=("False", "NoReservation", "no quota")
    )
    facts = facts_from(workload, _pending("someone-else", "pod-train-abc-1f2e3"), None)
    assert facts == QueueFacts(
        workload="pod-train-abc-1f2e3",
        reason="Pending",
        message=PENDING_MESSAGE,
        position_in_local_queue=2,  # Kueue counts from 0
        position_in_cluster_queue=4,
    )
    evicted = _workload(
        Evicted=("True", "Preempted", "Preempted to accommodate a workload"),
        QuotaReserved=("False", "Pending", PENDING_MESSAGE),
    )
    assert facts_from(evicted, None, "visibility API: HTTP 403 Forbidden").reason == "Preempted"
    assert facts_from(None, None, None).reason == "NoWorkload"


def test_the_waiting_line_says_queue_positions_and_kueues_reason():
    facts = facts_from(
        _workload(QuotaReserved=("False", "Pending", PENDING_MESSAGE)), _pending("pod-train-abc-1f2e3"), None
    )
    assert waiting_line(SETTINGS, 125, facts) == (
        "waiting for GPU quota in nlp (ClusterQueue trainyard-dev-nlp) for 2m05s: position 1 in the team "
        f"queue, 3 in the cluster queue, reason Pending: {PENDING_MESSAGE}"
    )
    blind = facts_from(_workload(), None, "visibility API: HTTP 503 Service Unavailable")
    assert "position unknown (visibility API: HTTP 503 Service Unavailable), reason unknown" in waiting_line(
        SETTINGS, 5, blind
    )


def test_the_timeout_message_names_the_queue_the_quota_and_what_holds_it():
    facts = facts_from(
        _workload(QuotaReserved=("False", "Pending", PENDING_MESSAGE)), _pending("pod-train-abc-1f2e3"), None
    )
    message = timeout_message(SETTINGS, 3725, facts)
    for fragment in (
        "train waited 1h02m for GPU quota in LocalQueue nlp (ClusterQueue trainyard-dev-nlp)",
        "longer than kubernetes.max_queue_wait_minutes (10)",
        "position 1 in the team queue, 3 in the cluster queue",
        f"reason Pending: {PENDING_MESSAGE}",
        "Team nlp's quota: 2 a100 GPUs guaranteed",
        "teams.nlp in dags/environments/dev.yaml",
    ):
        assert fragment in message


def test_the_quota_text_follows_the_environment_yaml(config_dirs):
    _, environments = config_dirs
    dev = load_environment("dev", environments)
    assert quota_text(dev, "nlp") == (
        "2 a100, 0 h100 GPUs guaranteed, up to 4 more a100, 2 more h100 borrowed; cpu 32, memory 128Gi"
    )


class Script:
    """Pods and Workloads in order, a clock that advances by each sleep, and what was read when."""

    def __init__(self, pods: list[SimpleNamespace], facts: QueueFacts) -> None:
        self.pods, self.facts = list(pods), facts
        self.now = 0.0
        self.fact_reads: list[float] = []

    async def read_pod(self) -> SimpleNamespace:
        return self.pods.pop(0) if len(self.pods) > 1 else self.pods[0]

    async def read_facts(self, pod: SimpleNamespace) -> QueueFacts:
        self.fact_reads.append(self.now)
        return self.facts

    def clock(self) -> float:
        return self.now


def _run(script: Script, settings: QueueSettings, caplog) -> object:
    async def advancing_sleep(seconds: float) -> None:
        script.now += seconds

    with caplog.at_level(logging.INFO, logger="test.queue"):
        return asyncio.run(
            await_admission(
                settings,
                read_pod=script.read_pod,
                read_facts=script.read_facts,
                log=logging.getLogger("test.queue"),
                clock=script.clock,
                sleep=advancing_sleep,
                check_seconds=10,
            )
        )


def test_a_gated_pod_waits_reporting_every_interval_until_admitted(caplog):
    facts = facts_from(
        _workload(QuotaReserved=("False", "Pending", PENDING_MESSAGE)), _pending("pod-train-abc-1f2e3"), None
    )
    script = Script([_pod(True)] * 14 + [_pod(False)], facts)
    record = _run(script, SETTINGS, caplog)
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for GPU quota")]
    assert script.fact_reads == [0, 60, 120, 140], "Kueue is asked only for a report, and at admission"
    assert len(waiting) == 3 and "position 1 in the team queue" in waiting[0]
    assert "admitted by Kueue into ClusterQueue trainyard-dev-nlp after 2m20s" in caplog.text
    assert record.admitted and record.seconds == 140
    assert record.first_position_in_local_queue == 1 and record.first_position_in_cluster_queue == 3
    assert record.last_reason == "Pending"


def test_a_pod_that_was_never_gated_does_not_wait(caplog):
    script = Script([_pod(False)], QueueFacts())
    assert _run(script, SETTINGS, caplog) is None
    assert script.fact_reads == [] and "waiting" not in caplog.text


def test_the_wait_gives_up_at_max_queue_wait_with_the_full_message(caplog):
    facts = facts_from(
        _workload(QuotaReserved=("False", "Pending", PENDING_MESSAGE)), _pending("pod-train-abc-1f2e3"), None
    )
    script = Script([_pod(True)], facts)
    short = SETTINGS.model_copy(update={"max_wait_seconds": 95})
    with pytest.raises(QueueWaitTimeout) as info:
        _run(script, short, caplog)
    assert "longer than kubernetes.max_queue_wait_minutes (1.58333)" in str(info.value)
    assert f"reason Pending: {PENDING_MESSAGE}" in str(info.value)
    assert info.value.record.admitted is False and info.value.record.seconds == 95
    assert script.now == pytest.approx(95, abs=0.01), "it stops at the limit, not at the next check"


def test_the_wait_is_summarised_for_the_xcom_and_mlflow(caplog):
    facts = facts_from(
        _workload(QuotaReserved=("False", "Pending", PENDING_MESSAGE)), _pending("pod-train-abc-1f2e3"), None
    )
    first = _run(Script([_pod(True)] * 3 + [_pod(False)], facts), SETTINGS, caplog)
    second = _run(Script([_pod(True, "train-def"), _pod(False, "train-def")], facts), SETTINGS, caplog)
    summary = queue_summary([first, second])
    assert summary["seconds"] == 40 and summary["count"] == 2
    tags = queue_tags(summary)
    assert tags["trainyard.queue.wait_seconds"] == "40.0"
    assert tags["trainyard.queue.waits"] == "2"
    assert tags["trainyard.queue.first_position_in_local_queue"] == "1"
    assert '"pod": "train-def"' in tags["trainyard.queue.detail"]


def test_a_pod_kueue_never_took_fails_instead_of_running_outside_every_quota(caplog):
    with pytest.raises(NotQueued) as info:
        _run(Script([_pod(False, managed=False)], QueueFacts()), SETTINGS, caplog)
    message = str(info.value)
    assert "was not taken by Kueue" in message and "managedJobsNamespaceSelector" in message
    assert "namespace trainyard-dev" in message and "dags/environments/dev.yaml" in message


def test_the_wait_counts_from_the_pods_creation_so_a_resumed_wait_keeps_its_bound(caplog):
    """A trigger re-created by the triggerer, or a retry adopting the pod, does not restart the clock."""
    facts = facts_from(
        _workload(QuotaReserved=("False", "Pending", PENDING_MESSAGE)), _pending("pod-train-abc-1f2e3"), None
    )
    created = datetime.now(UTC) - timedelta(seconds=570)
    script = Script([_pod(True, created=created)], facts)
    with pytest.raises(QueueWaitTimeout) as info:
        _run(script, SETTINGS, caplog)
    assert script.now == pytest.approx(30, abs=1), "570 s of the 600 s bound were already spent"
    assert info.value.record.seconds == pytest.approx(600, abs=1)
    assert info.value.record.started_at == created


def test_a_pod_admitted_at_the_last_moment_is_kept(caplog):
    facts = facts_from(_workload(QuotaReserved=("False", "Pending", PENDING_MESSAGE)), None, None)
    short = SETTINGS.model_copy(update={"max_wait_seconds": 20})
    # Gated on every read until the limit; the re-read at the limit finds it admitted.
    script = Script([_pod(True), _pod(True), _pod(True), _pod(False)], facts)
    record = _run(script, short, caplog)
    assert record is not None and record.admitted and record.seconds == 20


def test_the_recorded_wait_ends_when_kueue_admitted_the_pod_not_when_it_was_next_read(caplog):
    created = datetime.now(UTC) - timedelta(seconds=30)
    admitted = _workload(Admitted=("True", "Admitted", "The workload is admitted"))
    admitted["status"]["conditions"][0]["lastTransitionTime"] = (created + timedelta(seconds=3)).isoformat()
    script = Script(
        [_pod(True, created=created), _pod(False, created=created)], facts_from(admitted, None, None)
    )
    record = _run(script, SETTINGS, caplog)
    assert record.seconds == pytest.approx(3, abs=0.01)
