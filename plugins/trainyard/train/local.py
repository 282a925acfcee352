"""The ``train`` task on this machine: ``python -m trainer`` as a child process, the argv a pod gets.

Its cost (``trainyard.cost``) counts the process's running time on 0 GPUs: the Airflow side has
no torch to count this machine's devices, and a workstation's GPUs are not billed per hour.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from trainer.spec import PERMANENT_EXIT_CODES
from trainyard.handoff import PipelineOperator
from trainyard.train.run_spec import run_spec

if TYPE_CHECKING:
    from trainyard.cost import PodEnd


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
        started = _now()
        result: dict[str, Any] | None = None
        end: PodEnd = "failed"
        try:
            result = self._trainer.run()
            end = "succeeded"
        except TrainerFailed as exc:
            # A bad spec or bad input fails the same way on every retry: do not spend them.
            error = AirflowFailException if exc.exit_code in PERMANENT_EXIT_CODES else RuntimeError
            raise error(str(exc)) from None
        except BaseException:
            # Timeout or kill: the trainer checkpoints on SIGTERM and must not outlive its task.
            end = "stopped"
            self._trainer.terminate()
            raise
        finally:
            self._record_cost(context, started, end, result)
        self.log.info("%s", training_finished_line(result))
        return result

    def _record_cost(self, context: Context, started: datetime.datetime, end: PodEnd, result: Any) -> None:
        """This try's process joins the run's earlier ones; the total goes to XCom and MLflow."""
        from trainyard.cost import XCOM_KEY, cost_line, find_training_run, log_cost, run_cost
        from trainyard.train.run_state import RunState, state_store

        try:
            store = state_store(context)
            try_number = context["ti"].try_number
            state = RunState.load(store).with_pod_time(
                uid=f"local-{context['dag_run'].run_id}-{try_number}",
                name=f"local process, try {try_number}",
                times={"created_at": started, "started_at": started},
                ended_at=_now(),
                end=end,
            )
            state.save(store)
            env = self.pipeline.environment
            cost = run_cost(
                state.pods,
                gpus=0,
                gpu_type=None,
                price_per_gpu_hour=env.price_per_gpu_hour(None),
                currency=env.currency,
                now=_now(),
                history=[],
            )
            context["ti"].xcom_push(key=XCOM_KEY, value=cost.model_dump(mode="json"))
            self.log.info("%s", cost_line(cost))
        except Exception:
            self.log.warning("Could not work out the cost of this run", exc_info=True)
            return
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=env.mlflow.tracking_uri)
            run_id = (result or {}).get("mlflow_run_id")
            if not run_id:
                run = find_training_run(
                    client,
                    self.pipeline.experiment_name,
                    pipeline=self.pipeline.name,
                    environment=env.name,
                    dag_run_id=context["dag_run"].run_id,
                )
                run_id = run.info.run_id if run is not None else None
            if run_id:
                log_cost(client, run_id, cost)
        except Exception:  # the cost is in the XCom and the log; the MLflow run only lacks it
            self.log.warning("Could not record the cost on the MLflow run", exc_info=True)

    def on_kill(self) -> None:
        if self._trainer is not None:
            self._trainer.terminate()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
