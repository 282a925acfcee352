"""A person's sign-off between "the candidate is better" and "the alias moves".

``promote`` records an ``awaiting_approval`` decision on the candidate's version; the ``approve``
task (Airflow's human-in-the-loop) collects the answer; :func:`apply_sign_off` records it on the
version and moves the alias only on an approval by a listed approver, while the champion is still
the one the decision compared with. Reject and timeout leave the alias alone. Pure apart from the
registry calls, which go through the injected client.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from trainyard.promote import registry
from trainyard.promote.audit import (
    APPROVAL_REJECTED,
    APPROVAL_TIMED_OUT,
    APPROVED,
    Audit,
    SignOff,
    Superseded,
    description,
)
from trainyard.promote.decision import Decision

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from trainyard.config.loading import ResolvedPipeline

log = logging.getLogger(__name__)

APPROVE, REJECT = "Approve", "Reject"
#: The approval form's free-text field, recorded on the version.
COMMENT_PARAM = "comment"
#: What the ``approve`` task returns when nobody answered within the timeout.
TIMED_OUT = "timed_out"


def sign_off_from_answer(answer: dict[str, Any] | None, approvers: tuple[str, ...]) -> SignOff:
    """The sign-off an ``approve`` task's result stands for. An approval by someone outside
    ``approvers`` (when listed) counts as a rejection, and says so."""
    now = datetime.now(UTC).isoformat()
    if not answer or answer.get("timed_out"):
        return SignOff(state=APPROVAL_TIMED_OUT, by=None, at=str((answer or {}).get("at") or now))
    user = answer.get("responded_by_user") or {}
    by = user.get("name") or user.get("id")
    at = str(answer.get("responded_at") or now)  # ISO 8601: the approve task's result is JSON
    comment = ((answer.get("params_input") or {}).get(COMMENT_PARAM) or "").strip() or None
    chosen = answer.get("chosen_options") or []
    if chosen == [APPROVE]:
        if approvers and not {user.get("id"), user.get("name")} & set(approvers):
            note = f"{by} approved, but is not one of the approvers ({', '.join(approvers)})"
            return SignOff(state=APPROVAL_REJECTED, by=by, at=at, comment=note)
        return SignOff(state=APPROVED, by=by, at=at, comment=comment)
    return SignOff(state=APPROVAL_REJECTED, by=by, at=at, comment=comment)


def apply_sign_off(
    client: MlflowClient, pipeline: ResolvedPipeline, decision: Decision, sign_off: SignOff
) -> Decision:
    """Record ``sign_off`` on the candidate's version and move the alias if it approves. A retry
    converges: a version already holding the alias is only re-tagged."""
    name, alias, version = decision.model_name, decision.alias, decision.version
    assert version is not None
    champion = registry.champion(client, name, alias)
    holder = None if champion is None else str(champion.version)
    promoted = sign_off.state == APPROVED
    reason = f"{decision.reason}; {sign_off.sentence()}"
    if promoted and holder not in (decision.champion_version, version):
        promoted = False
        reason = (
            f"{reason}; but the alias moved to v{holder} while the approval was pending, so this "
            "comparison is stale: run the pipeline again to compare with the new champion"
        )
    settled = replace(decision, promoted=promoted, reason=reason, awaiting_approval=False)
    recorded = Audit.from_tags(registry.version_tags(client, name, version))
    audit = replace(recorded, promoted=promoted, reason=reason, awaiting_approval=False) if recorded else None
    tags = {**sign_off.to_tags(), **(audit.to_tags() if audit else {})}
    registry.tag_version(client, name, version, tags, description=description(settled))
    if promoted:
        if holder != version:
            registry.move_alias(client, name, alias, version)
        if decision.champion_version is not None and decision.champion_version != version:
            registry.tag_version(
                client,
                name,
                decision.champion_version,
                Superseded(by=version, at=sign_off.at).to_tags(),
            )
    log.info("v%s: %s", version, reason)
    return settled
