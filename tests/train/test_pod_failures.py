"""How a training pod ended, and what the `train` task does about it.

The inputs are pod status documents as the API server returns them (the emulator tests feed the
same functions real pods end to end); `after_pod_failure` is one table, a row per branch.
"""

from __future__ import annotations

import json

import pytest

from trainyard.train.pod_failures import Action, after_pod_failure, api_refusal, classify, refused_pod


def _pod(conditions=(), reason=None, waiting=None, terminated=None, phase="Failed"):
    state = {}
    if waiting:
        state["waiting"] = waiting
    if terminated:
        state["terminated"] = terminated
    return {
        "metadata": {"name": "train-x-abc"},
        "status": {
            "phase": phase,
            "reason": reason,
            "conditions": list(conditions),
            "containerStatuses": [{"name": "base", "image": "reg/trainer:1", "state": state}],
        },
    }


def test_preemption_is_a_disruption():
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    failure = classify(_pod([condition], terminated={"exitCode": 143, "reason": "Error"}))
    assert failure.kind == "preempted" and failure.is_disruption
    assert "PreemptionByScheduler" in failure.message


@pytest.mark.parametrize(
    "pod",
    [
        _pod([{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]),
        _pod(reason="Evicted"),
    ],
)
def test_eviction_is_a_disruption(pod):
    failure = classify(pod)
    assert failure.kind == "evicted" and failure.is_disruption


def test_a_false_disruption_condition_is_not_one():
    condition = {"type": "DisruptionTarget", "status": "False", "reason": "PreemptionByScheduler"}
    assert not classify(_pod([condition], terminated={"exitCode": 1})).is_disruption


@pytest.mark.parametrize(
    ("kwargs", "kind", "fragment"),
    [
        ({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, "oom_killed", "raise resources.memory"),
        ({"terminated": {"exitCode": 2, "reason": "Error", "message": "bad spec"}}, "exit_code", "code 2"),
        ({"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}, "image_pull", "reg/trainer:1"),
        (
            {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}},
            "config",
            "s3",
        ),
        ({"reason": "DeadlineExceeded"}, "deadline", "activeDeadlineSeconds"),
    ],
)
def test_genuine_failures_name_their_cause(kwargs, kind, fragment):
    failure = classify(_pod(**kwargs))
    assert failure.kind == kind and not failure.is_disruption
    assert fragment in failure.message


def test_api_refusal_returns_the_servers_message():
    class Refused(Exception):
        status = 403
        body = '{"kind": "Status", "message": "pods \\"x\\" is forbidden: no PriorityClass with name p"}'

    class Flaky(Exception):
        status = 500
        body = "{}"

    class PodGone(Exception):
        status = 404
        body = json.dumps({"kind": "Status", "message": 'pods "x" not found', "details": {"kind": "pods"}})

    class NoNamespace(Exception):
        status = 404
        body = json.dumps({"message": 'namespaces "ty" not found', "details": {"kind": "namespaces"}})

    assert api_refusal(Refused()) == 'pods "x" is forbidden: no PriorityClass with name p'
    assert api_refusal(Flaky()) is None
    assert api_refusal(PodGone()) is None, "a pod deleted mid-run is not a refused pod"
    assert api_refusal(NoNamespace()) == 'namespaces "ty" not found'


def test_the_exit_code_is_kept_to_decide_on_retries():
    from trainer.spec import PERMANENT_EXIT_CODES

    bad_input = classify(_pod(terminated={"exitCode": 3, "reason": "Error"}))
    crash = classify(_pod(terminated={"exitCode": 1, "reason": "Error"}))
    assert bad_input.exit_code in PERMANENT_EXIT_CODES
    assert crash.exit_code == 1 and crash.exit_code not in PERMANENT_EXIT_CODES


def _refusal(status: int, message: str, details: dict | None = None) -> Exception:
    """An ApiException-like error: the status and JSON body the API server sends."""
    exc = Exception(message)
    exc.status = status  # type: ignore[attr-defined]
    exc.body = json.dumps({"message": message, "details": details or {}})  # type: ignore[attr-defined]
    return exc


def _exited(code: int, reason: str = "Error", message: str = ""):
    return classify(_pod(terminated={"exitCode": code, "reason": reason, "message": message}))


def _waiting(reason: str):
    return classify(_pod(waiting={"reason": reason, "message": "detail"}))


def _status(**kwargs):
    return classify(_pod(**kwargs))


def _refused(status: int, message: str, details: dict | None = None):
    return refused_pod(_refusal(status, message, details))


PREEMPTED = classify(
    _pod(
        [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
        terminated={"exitCode": 143, "reason": "Error"},
    )
)
EVICTED = classify(_pod(reason="Evicted"))
KUEUE_PREEMPTED = classify(
    _pod([{"type": "TerminationTarget", "status": "True", "reason": "WorkloadEvictedDueToPreempted"}])
)
KUEUE_STOPPED = classify(
    _pod(
        [{"type": "TerminationTarget", "status": "True", "reason": "WorkloadEvictedDueToClusterQueueStopped"}]
    )
)
NO_PRIORITY_CLASS = 'pods "x" is forbidden: no PriorityClass with name trainyard-missing'
QUOTA = 'pods "x" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1'
INVALID = 'Pod "x" is invalid: spec.containers[0].image: Required value'
NO_NAMESPACE = 'namespaces "ty" not found'
RELAUNCH, PERMANENT, RETRYABLE = Action.RELAUNCH, Action.FAIL_PERMANENTLY, Action.FAIL_RETRYABLE
FAILED, REFUSED = "Training pod failed: ", "Kubernetes refused the training pod: "

# fmt: off
AFTER_POD_FAILURE = {  # id: (failure, relaunches so far, limit, action, part of the message)
    "preempted":         (PREEMPTED, 0, 2, RELAUNCH, "Relaunching (1/2, no Airflow retry used)"),
    "evicted":           (EVICTED, 1, 2, RELAUNCH, "Relaunching (2/2, no Airflow retry used)"),
    "at-the-limit":      (PREEMPTED, 2, 2, RETRYABLE, "; gave up after 2 relaunches (max_preemption"),
    # Kueue preempting for quota is the queue at work: the run queues again, uncounted.
    "kueue-preempted":   (KUEUE_PREEMPTED, 2, 2, RELAUNCH, "queues for quota again"),
    "kueue-stopped":     (KUEUE_STOPPED, 0, 2, RELAUNCH, "stopped by Kueue (WorkloadEvictedDueToClusterQ"),
    "kueue-stopped-max": (KUEUE_STOPPED, 2, 2, RETRYABLE, "gave up after 2 relaunches"),
    "relaunches-off":    (EVICTED, 0, 0, RETRYABLE, "gave up after 0 relaunches"),
    "bad-spec-exit":     (_exited(2, message="bad spec"), 0, 2, PERMANENT, "code 2 (Error): bad spec"),
    "bad-input-exit":    (_exited(3), 0, 2, PERMANENT, f"{FAILED}the trainer exited with code 3"),
    "crash-exit":        (_exited(1), 0, 2, RETRYABLE, f"{FAILED}the trainer exited with code 1"),
    "oom-killed":        (_exited(137, "OOMKilled"), 0, 2, RETRYABLE, f"{FAILED}the trainer was OOMKilled"),
    "image-pull":        (_waiting("ErrImagePull"), 0, 2, RETRYABLE, f"{FAILED}image pull failed for reg/"),
    "container-config":  (_waiting("CreateContainerConfigError"), 0, 2, RETRYABLE, "could not start"),
    "deadline":          (_status(reason="DeadlineExceeded"), 0, 2, RETRYABLE, "activeDeadlineSeconds"),
    "unknown":           (_status(phase="Unknown"), 0, 2, RETRYABLE, "ended in phase Unknown"),
    "no-priority-class": (_refused(403, NO_PRIORITY_CLASS), 0, 2, PERMANENT, f"{REFUSED}{NO_PRIORITY_CLASS}"),
    "invalid-pod":       (_refused(422, INVALID), 0, 2, PERMANENT, f"{REFUSED}{INVALID}"),
    "quota-exceeded":    (_refused(403, QUOTA), 0, 2, RETRYABLE, f"{REFUSED}{QUOTA}"),
    "missing-namespace": (_refused(404, NO_NAMESPACE, {"kind": "namespaces"}), 0, 2, RETRYABLE, NO_NAMESPACE),
}
# fmt: on


@pytest.mark.parametrize(
    ("failure", "relaunches", "limit", "action", "fragment"),
    list(AFTER_POD_FAILURE.values()),
    ids=list(AFTER_POD_FAILURE),
)
def test_after_pod_failure(failure, relaunches, limit, action, fragment):
    step = after_pod_failure(failure, relaunches, limit)
    assert step.action is action
    assert fragment in step.message, step.message
    if action is not RELAUNCH:
        assert step.message.startswith(REFUSED if failure.is_refusal else FAILED), step.message


def test_a_pod_kueue_preempted_before_it_was_seen_marked_is_known_by_its_event():
    from trainyard.train.pod_failures import classify_gone

    event = "Stopped: Preempted to accommodate a workload (UID: 1, JobUID: 2) due to reclamation"
    for ran in (True, False):  # even before its trainer started (a long image pull, say)
        failure = classify_gone(None, ran, "train-x-abc", last_event=event)
        assert failure.kind == "requeued", failure
    assert classify_gone(None, False, "train-x-abc", last_event="Killing: stopping").kind == "unscheduled"


def test_a_kueue_preemption_is_not_counted_against_the_relaunch_limit():
    assert KUEUE_PREEMPTED.kind == "requeued" and KUEUE_PREEMPTED.is_disruption
    assert {after_pod_failure(KUEUE_PREEMPTED, n, 1).counted for n in range(4)} == {False}
    assert after_pod_failure(KUEUE_STOPPED, 0, 1).counted, "other Kueue stops count like any disruption"


def test_only_a_disruption_relaunches_whatever_the_count():
    assert {after_pod_failure(_exited(1), n, 5).action for n in range(7)} == {RETRYABLE}
    message = after_pod_failure(PREEMPTED, 0, 1).message
    assert message == (
        f"{PREEMPTED.message}. Relaunching (1/1, no Airflow retry used); "
        "the trainer resumes from its last checkpoint."
    ), "the task log's relaunch line, word for word"


def test_refused_pod_is_none_for_errors_that_are_not_refusals():
    assert refused_pod(_refusal(500, "etcdserver: request timed out")) is None
    assert refused_pod(_refusal(404, 'pods "x" not found', {"kind": "pods"})) is None
