"""The three tasks of every Trainyard DAG. Each is thin: the logic lives in modules tests import.

Heavy libraries (pyarrow, mlflow) are imported inside ``execute`` so parsing a DAG stays cheap.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from trainer.spec import PERMANENT_EXIT_CODES, RunSpec
from trainyard.config import ResolvedPipeline
from trainyard.handoff import Approval, HandoffMissing
from trainyard.overrides import ConfRejected, validate_conf

log = logging.getLogger(__name__)


def approval(context: Context) -> Approval:
    """This run's approval; a missing or forged one fails the task without retries, with the fix."""
    try:
        return Approval.pull(context)
    except HandoffMissing as exc:
        raise AirflowFailException(str(exc)) from None


def run_spec_for(pipeline: ResolvedPipeline, context: Context, approved: Approval) -> RunSpec:
    """The trainer's input for this DAG run and try, from what validate_data approved."""
    return pipeline.run_spec(
        run_id=context["dag_run"].run_id,
        try_number=context["ti"].try_number,
        hyperparameters=approved.hyperparameters,
        dataset_fingerprint=approved.fingerprint,
        validation_report=approved.report,
    )


def training_finished_line(result: dict[str, Any]) -> str:
    """The task log's one-line account of a trainer result (the keys ``trainer.train.run`` returns)."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in (result.get("metrics") or {}).items())
    resumed = result.get("resumed_from_step")
    return (
        f"Training finished: MLflow run {result.get('mlflow_run_id')}, step {result.get('global_step')}"
        + (f" (resumed from step {resumed})" if resumed is not None else "")
        + f", metrics {metrics or 'none'}, model {result.get('model_uri')}"
    )


class ValidateDataOperator(BaseOperator):
    """Rejects a bad trigger conf, then checks the dataset; returns the approved fingerprint."""

    ui_color = "#e8f4fd"

    def __init__(self, *, pipeline: ResolvedPipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline

    def execute(self, context: Context) -> dict[str, Any]:
        from trainyard.data_checks import DataValidationError, require_valid, validate_dataset

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


class LocalTrainOperator(BaseOperator):
    """Runs ``python -m trainer`` as a local process with the same argv a pod would get."""

    ui_color = "#fdf2e8"

    def __init__(self, *, pipeline: ResolvedPipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self._trainer: Any = None

    def execute(self, context: Context) -> dict[str, Any]:
        from trainyard.launch import LaunchSpec, LocalTrainer, TrainerFailed

        spec = run_spec_for(self.pipeline, context, approval(context))
        self._trainer = LocalTrainer(LaunchSpec.for_run(spec), self.log)
        try:
            result = self._trainer.run()
        except TrainerFailed as exc:
            # A bad spec or bad input fails the same way on every retry: do not spend them.
            error = AirflowFailException if exc.exit_code in PERMANENT_EXIT_CODES else RuntimeError
            raise error(str(exc)) from None
        except BaseException:
            # Timeout or kill: the trainer checkpoints on SIGTERM and must not outlive its task.
            self._trainer.terminate()
            raise
        self.log.info("%s", training_finished_line(result))
        return result

    def on_kill(self) -> None:
        if self._trainer is not None:
            self._trainer.terminate()


class PromoteOperator(BaseOperator):
    """Moves the champion alias to this run's model only if it wins (see trainyard.promotion)."""

    ui_color = "#eafbe9"

    def __init__(self, *, pipeline: ResolvedPipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline

    def execute(self, context: Context) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        from trainyard.promotion import PromotionRefused, promote

        dag_run = context["dag_run"]
        client = MlflowClient(tracking_uri=self.pipeline.environment.mlflow.tracking_uri)
        try:
            decision = promote(
                client,
                self.pipeline,
                dag_run_id=dag_run.run_id,
                approved_fingerprint=approval(context).fingerprint,
                triggered_by=getattr(dag_run, "triggering_user_name", None),
            )
        except PromotionRefused as exc:
            raise AirflowFailException(f"Promotion refused: {exc}") from None
        verdict = "PROMOTED" if decision.promoted else "NOT PROMOTED"
        self.log.info("%s: %s", verdict, decision.reason)
        return decision.to_dict()
