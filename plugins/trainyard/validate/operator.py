"""The ``validate_data`` task: refuses other teams' storage and a bad trigger conf, then checks the data.

pyarrow is imported inside ``execute`` so parsing a DAG stays cheap.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from trainyard.handoff import Approval, PipelineOperator
from trainyard.validate.team_storage import OutsideTeamStorage, require_team_storage
from trainyard.validate.trigger_conf import ConfRejected, validate_conf


class ValidateDataOperator(PipelineOperator):
    """Returns the approval (fingerprint, hyperparameters, overrides, report) the later stages read."""

    ui_color = "#e8f4fd"

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            # Before anything is read; retrying cannot move the data into the team's storage.
            require_team_storage(self.pipeline)
        except OutsideTeamStorage as exc:
            raise AirflowFailException(str(exc)) from None
        from trainyard.validate.dataset import validate_dataset
        from trainyard.validate.report import DataValidationError, require_valid

        conf = context["dag_run"].conf or {}
        try:
            hyperparameters = validate_conf(self.pipeline, conf)
        except ConfRejected as exc:
            raise AirflowFailException(str(exc)) from None
        defaults = self.pipeline.config.training
        # The UI form sends every Param; only values that differ from the pipeline's are overrides.
        overrides = {k: v for k, v in conf.items() if getattr(hyperparameters, k) != getattr(defaults, k)}
        if overrides:
            self.log.info("Trigger overrides accepted: %s", overrides)

        env = self.pipeline.environment
        report = validate_dataset(
            self.pipeline.data_spec, self.pipeline.config.dataset.checks, env.storage.s3_endpoint_url
        )
        self.log.info("Data validation report:\n%s", report.summary())
        try:
            require_valid(report)
        except DataValidationError as exc:
            # Bad data does not get better by retrying: fail now, before any GPU is requested.
            raise AirflowFailException(f"Pipeline '{self.pipeline.name}': {exc}") from None
        return Approval(
            fingerprint=report.fingerprint,
            hyperparameters=hyperparameters,
            overrides=overrides,
            report=report.to_dict(),
        ).to_xcom()
