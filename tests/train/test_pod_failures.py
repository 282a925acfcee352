"""Classifying how a training pod ended: the cluster's disruptions versus the job's own failures.

The inputs are pod status documents as the API server returns them (the emulator tests feed the
same function real pods end to end).
"""

from __future__ import annotations

import json

import pytest

from trainyard.train.pod_failures import api_refusal, classify


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
