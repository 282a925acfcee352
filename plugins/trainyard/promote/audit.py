"""The audit trail a decision leaves on the model version, and the reader of that trail.

Model version tags are the system of record for promotion: the registry UI, ``trainyard summary``
and a retried ``promote`` all read them. So every tag name is defined once, here, and each record
writes and reads itself side by side (:class:`Audit` on the candidate, :class:`Superseded` on the
champion it replaced): a tag written is always a tag read. Pure: the registry adapter does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainer.spec import TAG_DAG_ID, TAG_ENVIRONMENT, TAG_FINGERPRINT, TAG_PIPELINE, TAG_RUN_ID
from trainyard.promote.decision import Decision, describe_rule

if TYPE_CHECKING:
    from trainyard.config.pipeline_schema import Promotion

TAG_DECISION = "trainyard.decision"
TAG_REASON = "trainyard.reason"
TAG_METRIC = "trainyard.metric"
TAG_CANDIDATE_VALUE = "trainyard.candidate_value"
TAG_CHAMPION_VERSION = "trainyard.champion_version"
TAG_CHAMPION_VALUE = "trainyard.champion_value"
TAG_CHAMPION_FINGERPRINT = "trainyard.champion_dataset_fingerprint"
TAG_RULE = "trainyard.rule"
TAG_ALIAS = "trainyard.alias"
TAG_DECIDED_AT = "trainyard.decided_at"
TAG_DECIDED_BY = "trainyard.decided_by"
TAG_SUPERSEDED_BY = "trainyard.superseded_by"
TAG_SUPERSEDED_AT = "trainyard.superseded_at"

NONE = "none"  # tag value for "no champion" / "no value" (MLflow tag values are strings)
PROMOTED = "promoted"
REJECTED = "rejected"

#: The tags :meth:`Audit.to_tags` writes on the candidate version, in the order it writes them.
#: The run's identity tags (pipeline, environment, DAG run, fingerprint) keep the trainer's names.
AUDIT_TAGS = (
    TAG_DECISION,
    TAG_REASON,
    TAG_METRIC,
    TAG_CANDIDATE_VALUE,
    TAG_CHAMPION_VERSION,
    TAG_CHAMPION_VALUE,
    TAG_CHAMPION_FINGERPRINT,
    TAG_RULE,
    TAG_ALIAS,
    TAG_FINGERPRINT,
    TAG_PIPELINE,
    TAG_ENVIRONMENT,
    TAG_DAG_ID,
    TAG_RUN_ID,
    TAG_DECIDED_AT,
    TAG_DECIDED_BY,
)
#: The tags :meth:`Superseded.to_tags` writes on the champion a promotion replaced.
SUPERSEDED_TAGS = (TAG_SUPERSEDED_BY, TAG_SUPERSEDED_AT)


def _written(value: str | None) -> str:
    return value or NONE


def _read(tags: Mapping[str, str], key: str) -> str | None:
    """An optional tag: absent (audits older than the tag) and ``none`` both read as None."""
    value = tags.get(key)
    return None if value in (None, NONE) else value


@dataclass(frozen=True)
class Audit:
    """Who decided what, when and why, as recorded on the candidate's model version."""

    promoted: bool
    reason: str
    metric: str
    candidate_value: float
    champion_version: str | None
    champion_value: float | None
    champion_fingerprint: str | None
    rule: str
    alias: str
    dataset_fingerprint: str | None
    pipeline: str
    environment: str
    dag_id: str
    dag_run_id: str
    decided_at: str
    decided_by: str

    @property
    def verdict(self) -> str:
        return PROMOTED if self.promoted else REJECTED

    @classmethod
    def of(
        cls,
        decision: Decision,
        *,
        rule: Promotion,
        dataset_fingerprint: str | None,
        pipeline: str,
        environment: str,
        dag_run_id: str,
    ) -> Audit:
        """The record of ``decision``, with what it does not carry: the rule and the run's identity."""
        return cls(
            promoted=decision.promoted,
            reason=decision.reason,
            metric=decision.metric,
            candidate_value=decision.candidate_value,
            champion_version=decision.champion_version,
            champion_value=decision.champion_value,
            champion_fingerprint=decision.champion_fingerprint,
            rule=describe_rule(rule),
            alias=decision.alias,
            dataset_fingerprint=dataset_fingerprint,
            pipeline=pipeline,
            environment=environment,
            dag_id=pipeline,  # one DAG per pipeline, named after it
            dag_run_id=dag_run_id,
            decided_at=decision.decided_at,
            decided_by=decision.decided_by,
        )

    def to_tags(self) -> dict[str, str]:
        """The tags to set on the version, keyed as :data:`AUDIT_TAGS` (floats as exact reprs)."""
        return {
            TAG_DECISION: self.verdict,
            TAG_REASON: self.reason,
            TAG_METRIC: self.metric,
            TAG_CANDIDATE_VALUE: repr(self.candidate_value),
            TAG_CHAMPION_VERSION: _written(self.champion_version),
            TAG_CHAMPION_VALUE: NONE if self.champion_value is None else repr(self.champion_value),
            TAG_CHAMPION_FINGERPRINT: _written(self.champion_fingerprint),
            TAG_RULE: self.rule,
            TAG_ALIAS: self.alias,
            TAG_FINGERPRINT: _written(self.dataset_fingerprint),
            TAG_PIPELINE: self.pipeline,
            TAG_ENVIRONMENT: self.environment,
            TAG_DAG_ID: self.dag_id,
            TAG_RUN_ID: self.dag_run_id,
            TAG_DECIDED_AT: self.decided_at,
            TAG_DECIDED_BY: self.decided_by,
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Audit | None:
        """The audit a version's tags hold; None when it was never decided or the record is partial.

        A partial record is one a crashed ``promote`` left mid-write: the alias had not moved yet,
        and the retry decides again and rewrites every tag.
        """
        verdict = tags.get(TAG_DECISION)
        if verdict not in (PROMOTED, REJECTED):
            return None
        try:
            champion_value = _read(tags, TAG_CHAMPION_VALUE)
            return cls(
                promoted=verdict == PROMOTED,
                reason=tags[TAG_REASON],
                metric=tags[TAG_METRIC],
                candidate_value=float(tags[TAG_CANDIDATE_VALUE]),
                champion_version=_read(tags, TAG_CHAMPION_VERSION),
                champion_value=None if champion_value is None else float(champion_value),
                champion_fingerprint=_read(tags, TAG_CHAMPION_FINGERPRINT),
                rule=tags[TAG_RULE],
                alias=tags[TAG_ALIAS],
                dataset_fingerprint=_read(tags, TAG_FINGERPRINT),
                pipeline=tags[TAG_PIPELINE],
                environment=tags[TAG_ENVIRONMENT],
                dag_id=tags[TAG_DAG_ID],
                dag_run_id=tags[TAG_RUN_ID],
                decided_at=tags[TAG_DECIDED_AT],
                decided_by=tags[TAG_DECIDED_BY],
            )
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class Superseded:
    """On a former champion: the version that took its alias, and when."""

    by: str
    at: str

    def to_tags(self) -> dict[str, str]:
        return {TAG_SUPERSEDED_BY: self.by, TAG_SUPERSEDED_AT: self.at}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Superseded | None:
        """None for a version never replaced (or whose replacement crashed before tagging it)."""
        by, at = tags.get(TAG_SUPERSEDED_BY), tags.get(TAG_SUPERSEDED_AT)
        return None if by is None or at is None else cls(by=by, at=at)


def description(decision: Decision) -> str:
    """The version's description: the same decision as the tags, as a sentence for people."""
    verdict = (
        f"Promoted to '{decision.alias}'" if decision.promoted else f"Not promoted to '{decision.alias}'"
    )
    return (
        f"{verdict}: {decision.reason}. Decided {decision.decided_at} by {decision.decided_by} "
        f"(MLflow run {decision.run_id})."
    )
