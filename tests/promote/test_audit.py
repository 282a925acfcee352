"""The audit trail: every tag Audit writes is read back equal, in memory and through a real MLflow."""

from __future__ import annotations

import dataclasses

import pytest

from tests.support.mlflow_store import FP, NOW, OTHER_FP
from trainyard.promote import registry
from trainyard.promote.audit import (
    AUDIT_TAGS,
    NONE,
    SUPERSEDED_TAGS,
    TAG_CHAMPION_FINGERPRINT,
    TAG_DECISION,
    Audit,
    Superseded,
    description,
)

FULL = Audit(
    promoted=True,
    reason="eval_f1_macro 0.861 beats champion v3 (0.85) by 0.011 >= required 0.002 — 'quoted', \"too\"",
    metric="eval_f1_macro",
    candidate_value=0.1 + 0.2,  # 0.30000000000000004: a float that only an exact repr keeps
    champion_version="3",
    champion_value=1 / 3,
    champion_fingerprint=OTHER_FP,
    rule="eval_f1_macro (higher is better), must_reach=0.7 (at least), min_improvement=0.002",
    alias="champion",
    dataset_fingerprint=FP,
    pipeline="tweet-sentiment",
    environment="local",
    dag_id="tweet-sentiment",
    dag_run_id="manual__2026-01-02T03:04:05+00:00",
    decided_at=NOW.isoformat(),
    decided_by="airflow:tweet-sentiment/manual__1 triggered by alice",
    champion_value_source="rescored",
    champion_recorded_value=0.91,
    compared_on=FP,
    champion_unscorable=None,
    evaluation_uri="runs:/abc/evaluation",
)
#: Tags newer than the first audits: a version decided before them still has a readable audit.
NEWER_TAGS = (
    "trainyard.champion_value_source",
    "trainyard.champion_recorded_value",
    "trainyard.compared_on_fingerprint",
    "trainyard.champion_unscorable",
    "trainyard.evaluation",
)
#: The first model ever, and a rejection: every optional field empty.
EMPTY = dataclasses.replace(
    FULL,
    promoted=False,
    champion_version=None,
    champion_value=None,
    champion_fingerprint=None,
    champion_value_source=None,
    champion_recorded_value=None,
    compared_on=None,
    evaluation_uri=None,
)
#: The rule said "better" and a person is asked; the champion could not be scored on this data.
AWAITING = dataclasses.replace(
    FULL,
    promoted=False,
    awaiting_approval=True,
    champion_value_source="recorded",
    compared_on=None,
    champion_unscorable="champion v3 predicts labels [a, b, c], this run's labels are [neg, pos]",
)


@pytest.mark.parametrize(
    "audit", [FULL, EMPTY, AWAITING], ids=["every field set", "no champion", "awaiting approval"]
)
def test_every_tag_written_is_read_back_equal(audit):
    tags = audit.to_tags()

    assert tuple(tags) == AUDIT_TAGS
    assert all(isinstance(value, str) for value in tags.values()), "MLflow tag values are strings"
    assert Audit.from_tags(tags) == audit


def test_an_empty_field_is_written_as_none():
    tags = EMPTY.to_tags()
    assert tags[TAG_DECISION] == "rejected"
    assert tags["trainyard.champion_version"] == tags["trainyard.champion_value"] == NONE
    assert tags[TAG_CHAMPION_FINGERPRINT] == NONE


def test_a_version_never_decided_has_no_audit():
    assert Audit.from_tags({}) is None
    assert Audit.from_tags({"trainyard.pipeline": "p", "mlflow.user": "bob"}) is None
    assert Audit.from_tags({**FULL.to_tags(), TAG_DECISION: "maybe"}) is None


@pytest.mark.parametrize(
    "missing",
    [t for t in AUDIT_TAGS if t not in ("trainyard.champion_version", "trainyard.champion_value")],
)
def test_a_partial_audit_reads_as_none_except_for_optional_tags(missing):
    tags = {k: v for k, v in FULL.to_tags().items() if k != missing}
    optional = missing in (TAG_CHAMPION_FINGERPRINT, "trainyard.dataset_fingerprint", *NEWER_TAGS)
    assert (Audit.from_tags(tags) is not None) is optional


def test_an_audit_older_than_the_champion_fingerprint_tag_is_still_read():
    tags = {k: v for k, v in FULL.to_tags().items() if k != TAG_CHAMPION_FINGERPRINT}
    assert Audit.from_tags(tags) == dataclasses.replace(FULL, champion_fingerprint=None)


def test_an_unreadable_number_is_no_audit():
    assert Audit.from_tags({**FULL.to_tags(), "trainyard.candidate_value": "high"}) is None


def test_superseded_round_trips():
    superseded = Superseded(by="4", at=NOW.isoformat())
    assert tuple(superseded.to_tags()) == SUPERSEDED_TAGS
    assert Superseded.from_tags(superseded.to_tags()) == superseded
    assert Superseded.from_tags(FULL.to_tags()) is None


def test_the_audit_round_trips_through_a_real_registry(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.9})
    version = env.promote("r1").version

    for audit in (FULL, EMPTY):
        registry.tag_version(env.client, env.model_name, version, audit.to_tags(), description="d")
        assert Audit.from_tags(registry.version_tags(env.client, env.model_name, version)) == audit
    superseded = Superseded(by="7", at=NOW.isoformat())
    registry.tag_version(env.client, env.model_name, version, superseded.to_tags())
    tags = registry.version_tags(env.client, env.model_name, version)
    assert Superseded.from_tags(tags) == superseded
    assert env.client.get_model_version(env.model_name, version).description == "d"


def test_what_promote_records_is_what_the_reader_reads(make_env):
    env = make_env(must_reach=0.7, min_improvement=0.002)
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.85})

    d = env.promote("r2", triggered_by="alice")

    audit = Audit.from_tags(env.tags(d.version))
    assert audit == Audit.of(
        d,
        rule=env.pipeline.config.promotion,
        dataset_fingerprint=FP,
        pipeline=env.pipeline.name,
        environment="local",
        dag_run_id="r2",
    )
    assert (audit.promoted, audit.reason, audit.candidate_value) == (True, d.reason, d.candidate_value)
    assert (audit.champion_version, audit.champion_value) == ("1", d.champion_value) == ("1", 0.8)
    assert audit.rule == "eval_f1_macro (higher is better), must_reach=0.7 (at least), min_improvement=0.002"
    assert Superseded.from_tags(env.tags("1")) == Superseded(by="2", at=d.decided_at)
    assert Superseded.from_tags(env.tags("2")) is None
    assert env.client.get_model_version(env.model_name, d.version).description == description(d)


def test_summary_reads_the_decision_through_the_audit(make_env):
    from trainyard.cli.summary import latest_summary

    env = make_env(must_reach=0.7)
    env.log_run("r1", {"eval_f1_macro": 0.65})
    d = env.promote("r1")

    summary = latest_summary(env.pipeline)

    assert f"Model version: {env.model_name} v1: REJECTED: {d.reason}\n" in summary
    for tag in AUDIT_TAGS:
        env.client.delete_model_version_tag(env.model_name, "1", tag)
    assert f"Model version: {env.model_name} v1: UNDECIDED: \n" in latest_summary(env.pipeline)
