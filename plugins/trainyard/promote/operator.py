"""The ``promote`` task: decides, records the decision and, without ``promotion.approval``, moves the
alias (the approval tasks are in :mod:`~trainyard.promote.approval_operator`).

mlflow is imported inside ``execute`` so parsing a DAG stays cheap.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from trainyard.handoff import PipelineOperator


def mlflow_client(pipeline: Any) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=pipeline.environment.mlflow.tracking_uri)


def notify_outcome(operator: PipelineOperator, context: Context, decision: Any) -> None:
    """Promoted or rejected, to whoever the environment tells (never raises)."""
    from trainyard.notify import Event, notify
    from trainyard.promote.report import decision_links, decision_report

    pipeline, data = operator.pipeline, decision.to_dict()
    details, links = decision_report(data), decision_links(data)
    if decision.promoted:
        event = Event.model_promoted(
            pipeline, decision.version, decision.alias, context=context, details=details, links=links
        )
    else:
        event = Event.candidate_rejected(
            pipeline, decision.version, decision.reason, context=context, details=details, links=links
        )
    notify(pipeline, event, context, log=operator.log)


class PromoteOperator(PipelineOperator):
    """Decides on the run's metrics against the champion's, then records the decision on the version."""

    ui_color = "#eafbe9"

    def execute(self, context: Context) -> dict[str, Any]:
        from trainyard.promote.promote import PromotionRefused, promote

        dag_run = context["dag_run"]
        try:
            decision = promote(
                mlflow_client(self.pipeline),
                self.pipeline,
                dag_run_id=dag_run.run_id,
                approved_fingerprint=self.approval(context).fingerprint,
                triggered_by=getattr(dag_run, "triggering_user_name", None),
            )
        except PromotionRefused as exc:
            raise AirflowFailException(f"Promotion refused: {exc}") from None
        if decision.awaiting_approval:
            self.log.info("BETTER, AWAITING APPROVAL: %s", decision.reason)
        else:
            self.log.info("%s: %s", "PROMOTED" if decision.promoted else "NOT PROMOTED", decision.reason)
            notify_outcome(self, context, decision)
        return decision.to_dict()
