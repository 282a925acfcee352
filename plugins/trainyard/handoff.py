"""What ``validate_data`` promises ``train`` and ``promote``: one typed hand-off through XCom.

The approval is the only thing that crosses stages. ``train`` builds the run spec from it (the
validated hyperparameters, the fingerprint the trainer must find again) and ``promote`` refuses a
model trained on any other fingerprint, so it is written and read in one place, validated both
ways: a hand-edited or stale XCom fails with a fix, never with a KeyError deep in a stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException
from pydantic import Field, ValidationError

from trainer.spec import FINGERPRINT_PATTERN, ChampionRef, Hyperparameters, StrictModel

if TYPE_CHECKING:
    from trainyard.config.loading import ResolvedPipeline

VALIDATE_TASK = "validate_data"
TRAIN_TASK = "train"
PROMOTE_TASK = "promote"


class HandoffMissing(RuntimeError):
    """The approval is absent or unreadable; the message says how to get a valid one."""


class Unchanged(StrictModel):
    """The earlier run whose inputs were identical: this DAG run skips train and promote."""

    mlflow_run_id: str
    dag_run_id: str | None = None
    version: str | None = Field(None, description="Its model version, when it was registered.")
    champion: bool = Field(False, description="It is the current champion.")

    @property
    def reason(self) -> str:
        version = f" (version {self.version})" if self.version else ""
        return f"identical inputs to run {self.dag_run_id or self.mlflow_run_id}{version}"


class Approval(StrictModel):
    """The data and settings ``validate_data`` approved for one DAG run."""

    fingerprint: str = Field(pattern=FINGERPRINT_PATTERN, description="SHA-256 of the validated bytes.")
    hyperparameters: Hyperparameters = Field(description="The pipeline's training section with overrides.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Conf values that changed a default.")
    report: dict[str, Any] | None = Field(None, description="The data validation report, for MLflow.")
    content_key: str | None = Field(None, description="Data, training section, base model and trainer.")
    champion: ChampionRef | None = Field(None, description="The champion when validated: train scores it.")
    unchanged: Unchanged | None = Field(
        None, description="Set when an earlier run had these exact inputs: train and promote skip."
    )

    def to_xcom(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_xcom(cls, value: Any, run_id: str) -> Approval:
        fix = f"clear {VALIDATE_TASK} and its downstream tasks of run {run_id} to validate the data again"
        if not value:
            raise HandoffMissing(
                f"{VALIDATE_TASK} left no result for run {run_id} (was it marked success by hand?); {fix}"
            )
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            fields = ", ".join(".".join(map(str, e["loc"])) or "(top)" for e in exc.errors())
            raise HandoffMissing(
                f"{VALIDATE_TASK}'s result for run {run_id} is not a valid approval ({fields}); {fix}"
            ) from None

    @classmethod
    def pull(cls, context: Any) -> Approval:
        """The approval of this DAG run, read from ``validate_data``'s XCom."""
        value = context["ti"].xcom_pull(task_ids=VALIDATE_TASK)
        return cls.from_xcom(value, context["dag_run"].run_id)


class PipelineOperator(BaseOperator):
    """The base of the three stage operators: each runs one stage of one resolved pipeline."""

    ui_color = "#f0f0f0"

    def __init__(self, *, pipeline: ResolvedPipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline

    @staticmethod
    def approval(context: Context) -> Approval:
        """This run's approval; a missing or forged one fails the task without retries, with the fix."""
        try:
            return Approval.pull(context)
        except HandoffMissing as exc:
            raise AirflowFailException(str(exc)) from None

    @staticmethod
    def approval_to_train(context: Context, log: Any) -> Approval:
        """This run's approval, or AirflowSkipException when its inputs are those of an earlier run:
        nothing would change, so no GPU is requested (``promote``, downstream, is skipped with it)."""
        approved = PipelineOperator.approval(context)
        if approved.unchanged is not None:
            from airflow.sdk.exceptions import AirflowSkipException

            reason = approved.unchanged.reason
            log.info('Skipping training: %s; trigger with conf {"force_retrain": true} to train', reason)
            raise AirflowSkipException(reason)
        return approved
