"""The ``train`` task on this machine: ``python -m trainer`` as a child process, the argv a pod gets."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from trainer.spec import PERMANENT_EXIT_CODES
from trainyard.handoff import PipelineOperator
from trainyard.train.run_spec import run_spec


def training_finished_line(result: dict[str, Any]) -> str:
    """The task log's one-line account of a trainer result (the keys ``trainer.train.run`` returns)."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in (result.get("metrics") or {}).items())
    resumed = result.get("resumed_from_step")
    return (
        f"Training finished: MLflow run {result.get('mlflow_run_id')}, step {result.get('global_step')}"
        + (f" (resumed from step {resumed})" if resumed is not None else "")
        + f", metrics {metrics or 'none'}, model {result.get('model_uri')}"
    )


class LocalTrainOperator(PipelineOperator):
    """Runs the trainer locally; a bad spec or input fails without retries, anything else may retry."""

    ui_color = "#fdf2e8"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._trainer: Any = None

    def execute(self, context: Context) -> dict[str, Any]:
        from trainyard.train.launch import LaunchSpec, LocalTrainer, TrainerFailed

        spec = run_spec(
            self.pipeline,
            self.approval_to_train(context, self.log),
            run_id=context["dag_run"].run_id,
            try_number=context["ti"].try_number,
        )
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
