"""The typed hand-off from validate_data to train and promote, written and read in one place."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.spec import Hyperparameters
from trainyard.handoff import VALIDATE_TASK, Approval, HandoffMissing

FINGERPRINT = "sha256:" + "ab" * 32


def _approval() -> Approval:
    return Approval(
        fingerprint=FINGERPRINT,
        hyperparameters=Hyperparameters(epochs=2, learning_rate=3e-5),
        overrides={"epochs": 2},
        report={"passed": True, "fingerprint": FINGERPRINT},
    )


class _TaskInstance:
    """What Approval.pull needs of Airflow's task instance: the XCom of validate_data."""

    def __init__(self, value: object) -> None:
        self.value = value
        self.asked: list[str] = []

    def xcom_pull(self, task_ids: str) -> object:
        self.asked.append(task_ids)
        return self.value


def test_the_approval_survives_the_xcom_round_trip_as_json():
    import json

    value = json.loads(json.dumps(_approval().to_xcom()))  # XCom stores JSON
    assert Approval.from_xcom(value, "run-1") == _approval()


def test_pull_reads_validate_data_of_this_run():
    ti = _TaskInstance(_approval().to_xcom())
    context = {"ti": ti, "dag_run": SimpleNamespace(run_id="manual__1")}
    assert Approval.pull(context).hyperparameters.epochs == 2
    assert ti.asked == [VALIDATE_TASK]


@pytest.mark.parametrize("value", [None, {}])
def test_a_missing_approval_says_how_to_get_one(value):
    with pytest.raises(HandoffMissing, match="validate_data left no result for run r1") as info:
        Approval.from_xcom(value, "r1")
    assert "clear validate_data and its downstream tasks of run r1" in str(info.value)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"fingerprint": "sha256:not-hex"}, "fingerprint"),
        ({"hyperparameters": {"epochs": -1}}, "hyperparameters.epochs"),
        ({"image": "evil:latest"}, "image"),
    ],
    ids=["bad-fingerprint", "out-of-range", "unknown-key"],
)
def test_a_forged_or_stale_approval_is_refused_naming_the_field(edit, field):
    value = {**_approval().to_xcom(), **edit}
    with pytest.raises(HandoffMissing, match="is not a valid approval") as info:
        Approval.from_xcom(value, "r1")
    assert field in str(info.value)
