"""Sign-off between "better" and "the alias moves", against a real MLflow store: what promote leaves
pending, and what an approval, a rejection, a timeout, an unlisted approver and a champion that moved
meanwhile each do to the alias and the audit."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from trainyard.promote import registry
from trainyard.promote.approval import APPROVE, REJECT, apply_sign_off, sign_off_from_answer
from trainyard.promote.audit import Audit, SignOff

APPROVAL = {"approval": {"required": True, "approvers": ["alice", "7"], "timeout_hours": 48}}


def _answer(option: str, user: str = "alice", comment: str | None = "per-class F1 looks right") -> dict:
    return {
        "chosen_options": [option],
        "params_input": {"comment": comment},
        "responded_at": datetime(2026, 1, 3, tzinfo=UTC).isoformat(),
        "responded_by_user": {"id": user, "name": user},
    }


@pytest.fixture
def pending(make_env):
    """v1 is champion; v2 is better and awaits approval."""
    env = make_env(min_improvement=0.0, **APPROVAL)
    env.log_run("r1", {"eval_f1_macro": 0.80})
    first = env.promote("r1")
    env.client.set_registered_model_alias(env.model_name, "champion", first.version)  # (first also awaited)
    env.log_run("r2", {"eval_f1_macro": 0.90})
    return env, env.promote("r2")


def test_a_better_candidate_waits_for_approval_and_the_alias_stays(pending):
    env, decision = pending

    assert decision.awaiting_approval and not decision.promoted
    assert env.champion() == "1"
    tags = env.tags("2")
    assert tags["trainyard.decision"] == "awaiting_approval"
    assert Audit.from_tags(tags).awaiting_approval
    assert env.client.get_model_version(env.model_name, "2").description.startswith(
        "Awaiting approval for 'champion'"
    )


def test_an_approval_moves_the_alias_and_records_who_when_and_why(pending):
    env, decision = pending

    settled = apply_sign_off(
        env.client, env.pipeline, decision, sign_off_from_answer(_answer(APPROVE), ("alice",))
    )

    assert settled.promoted and env.champion() == "2"
    tags = env.tags("2")
    assert tags["trainyard.decision"] == "promoted"
    assert tags["trainyard.approval.state"] == "approved" and tags["trainyard.approval.by"] == "alice"
    assert tags["trainyard.approval.at"] == "2026-01-03T00:00:00+00:00"
    assert tags["trainyard.approval.comment"] == "per-class F1 looks right"
    assert (
        'approved by alice at 2026-01-03T00:00:00+00:00: "per-class F1 looks right"'
        in tags["trainyard.reason"]
    )
    assert env.tags("1")["trainyard.superseded_by"] == "2"
    again = apply_sign_off(env.client, env.pipeline, decision, sign_off_from_answer(_answer(APPROVE), ()))
    assert again.promoted and env.champion() == "2", "a retried move_alias converges"


@pytest.mark.parametrize(
    ("answer", "state", "words"),
    [
        (_answer(REJECT, comment="class 'neutral' regressed"), "rejected", "rejected by alice"),
        ({"timed_out": True, "at": "2026-01-05T00:00:00+00:00"}, "timed_out", "approval timed out"),
        (_answer(APPROVE, user="mallory"), "rejected", "mallory approved, but is not one of the approvers"),
    ],
    ids=["rejected", "timed out", "approver not listed"],
)
def test_no_approval_leaves_the_alias_and_records_why(pending, answer, state, words):
    env, decision = pending

    settled = apply_sign_off(env.client, env.pipeline, decision, sign_off_from_answer(answer, ("alice", "7")))

    assert not settled.promoted and env.champion() == "1"
    tags = env.tags("2")
    assert tags["trainyard.decision"] == "rejected" and tags["trainyard.approval.state"] == state
    assert words in tags["trainyard.reason"] or words in tags["trainyard.approval.comment"]
    assert "trainyard.superseded_by" not in env.tags("1")


def test_an_approver_may_be_named_by_user_id():
    sign_off = sign_off_from_answer(
        {"chosen_options": [APPROVE], "responded_by_user": {"id": "7", "name": "Alice Smith"}}, ("7",)
    )
    assert sign_off.state == "approved" and sign_off.by == "Alice Smith"


def test_an_approval_after_the_champion_moved_is_stale(pending):
    env, decision = pending
    run = env.client.get_run(env.log_run("r3", {"eval_f1_macro": 0.95}))
    other = registry.register_candidate(env.client, env.model_name, run)
    env.client.set_registered_model_alias(env.model_name, "champion", other.version)  # a hand rollout

    settled = apply_sign_off(env.client, env.pipeline, decision, sign_off_from_answer(_answer(APPROVE), ()))

    assert not settled.promoted and env.champion() == str(other.version)
    assert "comparison is stale" in settled.reason


def test_sign_off_sentences():
    assert (
        SignOff("timed_out", None, "T").sentence() == "no one approved it before the approval timed out at T"
    )
    assert SignOff("approved", "bob", "T").sentence() == "approved by bob at T"
