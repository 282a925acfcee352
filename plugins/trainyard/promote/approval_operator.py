"""The approval tasks of a pipeline with ``promotion.approval``: ``approve`` asks a person (Airflow's
human-in-the-loop; on Airflow 3.3 the task waits in ``awaiting_input`` without a worker slot) and
``move_alias`` acts on the answer.

A module of its own so that only loader files with such a pipeline import the HITL operator.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Context, Param
from airflow.sdk.exceptions import AirflowSkipException

from trainyard.handoff import PROMOTE_TASK, PipelineOperator
from trainyard.promote.approval import APPROVE, COMMENT_PARAM, REJECT
from trainyard.promote.operator import mlflow_client, notify_outcome

APPROVE_TASK = "approve"
MOVE_ALIAS_TASK = "move_alias"


class ApproveOperator(HITLOperator):
    """Shows the decision report and waits for Approve or Reject; skipped unless the rule said
    "better". No answer by ``timeout_hours`` is a result too (``timed_out``), not a failure."""

    ui_color = "#fff6d5"

    def __init__(self, *, pipeline: Any, **kwargs: Any) -> None:
        policy = pipeline.config.promotion.approval
        users = [{"id": user, "name": user} for user in policy.approvers]
        super().__init__(
            subject=f"Promote {pipeline.registered_model_name} to '{pipeline.config.promotion.alias}'?",
            options=[APPROVE, REJECT],
            multiple=False,
            params={
                COMMENT_PARAM: Param(
                    "", type=["string", "null"], description="Why; recorded on the model version."
                )
            },
            assigned_users=users or None,
            response_timeout=timedelta(hours=policy.timeout_hours),
            **kwargs,
        )
        self.pipeline = pipeline

    def execute(self, context: Context) -> Any:
        from trainyard.handoff import Approval
        from trainyard.notify import Event, notify
        from trainyard.promote import registry
        from trainyard.promote.report import decision_links, decision_report

        decision = context["ti"].xcom_pull(task_ids=PROMOTE_TASK)
        if not decision or not decision.get("awaiting_approval"):
            raise AirflowSkipException("promote did not find the candidate better: nothing to approve")
        per_class = registry.per_class(mlflow_client(self.pipeline), decision["run_id"])
        report = Approval.pull(context).report
        self.subject = f"Promote {decision['model_name']} v{decision['version']} to '{decision['alias']}'?"
        self.body = decision_report(decision, validation_report=report, per_class=per_class)
        event = Event.approval_waiting(
            self.pipeline,
            decision["version"],
            decision["alias"],
            context=context,
            details=self.body,
            links=decision_links(decision),
        )
        notify(self.pipeline, event, context, log=self.log)
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        if event.get("error_type") == "timeout":
            self.log.info("No answer within %s: the candidate is not promoted", self.response_timeout)
            return {"timed_out": True, "at": datetime.now(UTC).isoformat()}
        answer = dict(super().execute_complete(context, event))
        at = answer.get("responded_at")
        answer["responded_at"] = at.isoformat() if hasattr(at, "isoformat") else at
        self.log.info("Answer: %s by %s", answer.get("chosen_options"), answer.get("responded_by_user"))
        return answer


class MoveAliasOperator(PipelineOperator):
    """Records the sign-off on the version; moves the alias only on an approval."""

    ui_color = "#eafbe9"

    def execute(self, context: Context) -> dict[str, Any]:
        from trainyard.promote.approval import apply_sign_off, sign_off_from_answer
        from trainyard.promote.decision import Decision

        ti = context["ti"]
        decision = Decision(**ti.xcom_pull(task_ids=PROMOTE_TASK))
        approvers = self.pipeline.config.promotion.approval.approvers
        sign_off = sign_off_from_answer(ti.xcom_pull(task_ids=APPROVE_TASK), approvers)
        settled = apply_sign_off(mlflow_client(self.pipeline), self.pipeline, decision, sign_off)
        self.log.info("%s: %s", "PROMOTED" if settled.promoted else "NOT PROMOTED", settled.reason)
        notify_outcome(self, context, settled)
        return settled.to_dict()
