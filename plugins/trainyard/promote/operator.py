"""The ``promote`` task: moves the champion alias to this run's model only if it wins.

mlflow is imported inside ``execute`` so parsing a DAG stays cheap.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from trainyard.handoff import PipelineOperator


class PromoteOperator(PipelineOperator):
    """Decides on the run's metrics against the champion's, then records the decision on the version."""

    ui_color = "#eafbe9"

    def execute(self, context: Context) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        from trainyard.promote.promote import PromotionRefused, promote

        dag_run = context["dag_run"]
        client = MlflowClient(tracking_uri=self.pipeline.environment.mlflow.tracking_uri)
        try:
            decision = promote(
                client,
                self.pipeline,
                dag_run_id=dag_run.run_id,
                approved_fingerprint=self.approval(context).fingerprint,
                triggered_by=getattr(dag_run, "triggering_user_name", None),
            )
        except PromotionRefused as exc:
            raise AirflowFailException(f"Promotion refused: {exc}") from None
        verdict = "PROMOTED" if decision.promoted else "NOT PROMOTED"
        self.log.info("%s: %s", verdict, decision.reason)
        return decision.to_dict()
