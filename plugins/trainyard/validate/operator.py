"""The ``validate_data`` task: refuses other teams' storage and a bad trigger conf, checks the data,
and finds out whether training would repeat an earlier run.

pyarrow and mlflow are imported inside ``execute`` so parsing a DAG stays cheap.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from trainyard.handoff import Approval, PipelineOperator, Unchanged
from trainyard.validate.team_storage import OutsideTeamStorage, require_team_storage
from trainyard.validate.trigger_conf import FORCE_RETRAIN, ConfRejected, force_retrain, validate_conf


class ValidateDataOperator(PipelineOperator):
    """Returns the approval (fingerprint, hyperparameters, overrides, report, content key, the
    champion to re-score, and the earlier run it repeats, if any) the later stages read."""

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
            forced = force_retrain(self.pipeline, conf)
        except ConfRejected as exc:
            raise AirflowFailException(str(exc)) from None
        defaults = self.pipeline.config.training
        # The UI form sends every Param; only values that differ from the pipeline's are overrides.
        overrides = {
            k: v
            for k, v in conf.items()
            if k != FORCE_RETRAIN and getattr(hyperparameters, k) != getattr(defaults, k)
        }
        if overrides:
            self.log.info("Trigger overrides accepted: %s", overrides)

        env = self.pipeline.environment
        report = validate_dataset(
            self.pipeline.data_spec,
            self.pipeline.config.dataset.checks,
            env.storage.s3_endpoint_url,
            class_weights=hyperparameters.class_weights,
        )
        self.log.info("Data validation report:\n%s", report.summary())
        for warning in report.warnings:
            self.log.warning("%s", warning)
        try:
            require_valid(report)
        except DataValidationError as exc:
            # Bad data does not get better by retrying: fail now, before any GPU is requested.
            raise AirflowFailException(f"Pipeline '{self.pipeline.name}': {exc}") from None
        approval = Approval(
            fingerprint=report.fingerprint,
            hyperparameters=hyperparameters,
            overrides=overrides,
            report=report.to_dict(),
        )
        return self._against_registry(context, approval, forced=forced).to_xcom()

    def _against_registry(self, context: Context, approval: Approval, *, forced: bool) -> Approval:
        """The approval with its content key, the champion the trainer re-scores, and, unless
        forced, the earlier run with the same key (train and promote then skip)."""
        from mlflow.tracking import MlflowClient

        from trainyard.validate.content_key import content_key, key_inputs
        from trainyard.validate.unchanged import champion_ref, find_unchanged, record_skipped

        inputs = key_inputs(self.pipeline, approval.fingerprint, approval.hyperparameters)
        key = content_key(inputs)
        self.log.info("Content key %s of %s", key, inputs)
        client = MlflowClient(tracking_uri=self.pipeline.environment.mlflow.tracking_uri)
        champion, champion_version = champion_ref(client, self.pipeline)
        unchanged: Unchanged | None = None
        if forced:
            self.log.info("force_retrain is set: training whatever earlier runs had")
        else:
            unchanged = find_unchanged(client, self.pipeline, key, champion_version)
        if unchanged is not None:
            dag_run = context["dag_run"]
            skipped_run = record_skipped(
                client,
                self.pipeline,
                dag_run_id=dag_run.run_id,
                try_number=context["ti"].try_number,
                fingerprint=approval.fingerprint,
                key=key,
                unchanged=unchanged,
            )
            self.log.info(
                "Unchanged: %s; train and promote will be skipped (recorded as MLflow run %s)",
                unchanged.reason,
                skipped_run,
            )
            self.skipped_as_unchanged(context, unchanged)
        return approval.model_copy(update={"content_key": key, "champion": champion, "unchanged": unchanged})

    def skipped_as_unchanged(self, context: Context, unchanged: Unchanged) -> None:
        """Tell people: the DAG run's note and, where the environment has notifications, a message."""
        from trainyard.notify import Event, notify
        from trainyard.run_note import set_run_note

        note = f"Skipped: {unchanged.reason}. Trigger with {FORCE_RETRAIN}=true to train."
        set_run_note(context, note)
        notify(
            self.pipeline,
            Event.run_skipped(self.pipeline, unchanged.reason, context=context, details=note),
            context,
            log=self.log,
        )
