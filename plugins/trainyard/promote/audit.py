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
TAG_CHAMPION_VALUE_SOURCE = "trainyard.champion_value_source"
TAG_CHAMPION_RECORDED_VALUE = "trainyard.champion_recorded_value"
TAG_COMPARED_ON = "trainyard.compared_on_fingerprint"
TAG_CHAMPION_UNSCORABLE = "trainyard.champion_unscorable"
TAG_EVALUATION = "trainyard.evaluation"
TAG_APPROVAL_STATE = "trainyard.approval.state"
TAG_APPROVAL_BY = "trainyard.approval.by"
TAG_APPROVAL_AT = "trainyard.approval.at"
TAG_APPROVAL_COMMENT = "trainyard.approval.comment"

NONE = "none"  # tag value for "no champion" / "no value" (MLflow tag values are strings)
PROMOTED = "promoted"
REJECTED = "rejected"
AWAITING_APPROVAL = "awaiting_approval"
#: Outcomes of a sign-off, as TAG_APPROVAL_STATE records them.
APPROVED, APPROVAL_REJECTED, APPROVAL_TIMED_OUT = "approved", "rejected", "timed_out"

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
    TAG_CHAMPION_VALUE_SOURCE,
    TAG_CHAMPION_RECORDED_VALUE,
    TAG_COMPARED_ON,
    TAG_CHAMPION_UNSCORABLE,
    TAG_EVALUATION,
)
#: The tags :meth:`Superseded.to_tags` writes on the champion a promotion replaced.
SUPERSEDED_TAGS = (TAG_SUPERSEDED_BY, TAG_SUPERSEDED_AT)


def _written(value: str | None) -> str:
    return value or NONE


def _number(value: float | None) -> str:
    return NONE if value is None else repr(value)


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
    champion_value_source: str | None = None
    champion_recorded_value: float | None = None
    compared_on: str | None = None
    champion_unscorable: str | None = None
    evaluation_uri: str | None = None
    awaiting_approval: bool = False

    @property
    def verdict(self) -> str:
        if self.awaiting_approval:
            return AWAITING_APPROVAL
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
            champion_value_source=decision.champion_value_source,
            champion_recorded_value=decision.champion_recorded_value,
            compared_on=decision.compared_on,
            champion_unscorable=decision.champion_unscorable,
            evaluation_uri=decision.evaluation_uri,
            awaiting_approval=decision.awaiting_approval,
        )

    def to_tags(self) -> dict[str, str]:
        """The tags to set on the version, keyed as :data:`AUDIT_TAGS` (floats as exact reprs)."""
        return {
            TAG_DECISION: self.verdict,
            TAG_REASON: self.reason,
            TAG_METRIC: self.metric,
            TAG_CANDIDATE_VALUE: repr(self.candidate_value),
            TAG_CHAMPION_VERSION: _written(self.champion_version),
            TAG_CHAMPION_VALUE: _number(self.champion_value),
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
            TAG_CHAMPION_VALUE_SOURCE: _written(self.champion_value_source),
            TAG_CHAMPION_RECORDED_VALUE: _number(self.champion_recorded_value),
            TAG_COMPARED_ON: _written(self.compared_on),
            TAG_CHAMPION_UNSCORABLE: _written(self.champion_unscorable),
            TAG_EVALUATION: _written(self.evaluation_uri),
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Audit | None:
        """The audit a version's tags hold; None when it was never decided or the record is partial.

        A partial record is one a crashed ``promote`` left mid-write: the alias had not moved yet,
        and the retry decides again and rewrites every tag.
        """
        verdict = tags.get(TAG_DECISION)
        if verdict not in (PROMOTED, REJECTED, AWAITING_APPROVAL):
            return None
        try:
            champion_value = _read(tags, TAG_CHAMPION_VALUE)
            recorded = _read(tags, TAG_CHAMPION_RECORDED_VALUE)
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
                champion_value_source=_read(tags, TAG_CHAMPION_VALUE_SOURCE),
                champion_recorded_value=None if recorded is None else float(recorded),
                compared_on=_read(tags, TAG_COMPARED_ON),
                champion_unscorable=_read(tags, TAG_CHAMPION_UNSCORABLE),
                evaluation_uri=_read(tags, TAG_EVALUATION),
                awaiting_approval=verdict == AWAITING_APPROVAL,
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


@dataclass(frozen=True)
class SignOff:
    """On a candidate that needed approval: what the person (or the clock) answered, and when."""

    state: str  # APPROVED, APPROVAL_REJECTED or APPROVAL_TIMED_OUT
    by: str | None
    at: str
    comment: str | None = None

    def to_tags(self) -> dict[str, str]:
        return {
            TAG_APPROVAL_STATE: self.state,
            TAG_APPROVAL_BY: _written(self.by),
            TAG_APPROVAL_AT: self.at,
            TAG_APPROVAL_COMMENT: _written(self.comment)[:5000],
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> SignOff | None:
        state, at = tags.get(TAG_APPROVAL_STATE), tags.get(TAG_APPROVAL_AT)
        if state is None or at is None:
            return None
        return cls(
            state=state, by=_read(tags, TAG_APPROVAL_BY), at=at, comment=_read(tags, TAG_APPROVAL_COMMENT)
        )

    def sentence(self) -> str:
        if self.state == APPROVAL_TIMED_OUT:
            return f"no one approved it before the approval timed out at {self.at}"
        verb = "approved" if self.state == APPROVED else "rejected"
        said = f': "{self.comment}"' if self.comment else ""
        return f"{verb} by {self.by or 'an unknown user'} at {self.at}{said}"


def description(decision: Decision) -> str:
    """The version's description: the same decision as the tags, as sentences for people, with
    links to what the decision was made on (the MLflow UI renders it as Markdown)."""
    if decision.awaiting_approval:
        verdict = f"Awaiting approval for '{decision.alias}'"
    elif decision.promoted:
        verdict = f"Promoted to '{decision.alias}'"
    else:
        verdict = f"Not promoted to '{decision.alias}'"
    text = (
        f"{verdict}: {decision.reason}. Decided {decision.decided_at} by {decision.decided_by} "
        f"(MLflow run {decision.run_id})."
    )
    links = [f"[the run in MLflow]({decision.run_url})"] if decision.run_url else []
    if decision.evaluation_uri:
        links.append(
            f"per-class metrics and confusion matrices of both models: `{decision.evaluation_uri}` "
            "(the run's evaluation/ artifacts)"
        )
    return text + (" See " + "; ".join(links) + "." if links else "")
