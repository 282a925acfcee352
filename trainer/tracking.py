"""MLflow bookkeeping for one training run. Only the main process (rank 0) touches MLflow.

``mlflow_run`` is the MLflow run around a training run's body: it starts (or resumes) the run and
ends it however the body ends, recording why on a failure. A relaunched pod resumes the same MLflow
run (its id is kept in the checkpoint directory), so tags are (re)set on every start and params are
logged only where not already there: MLflow params are write-once. Nothing here reads
``os.environ``: no secret can end up in a param.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from trainer.checkpoints import checkpoint_step
from trainer.errors import Terminated, describe, exit_code_for
from trainer.metrics_queue import MetricsQueue
from trainer.spec import (
    ERROR_TAGS,
    MODEL_ARTIFACT,
    STAGE_FINISHING,
    STAGE_SETUP,
    STAGES_AFTER_TRAINING,
    TAG_CHECKPOINT_STEP,
    TAG_ERROR,
    TAG_ERROR_STAGE,
    TAG_EXIT_CODE,
    TAG_MODEL_URI,
    TAG_RESUMED_FROM_STEP,
    RunSpec,
    run_tags,
)

if TYPE_CHECKING:
    from trainer.checkpoints import CheckpointStore
    from trainer.preemption import Preemption

logger = logging.getLogger(__name__)

#: Pinned into the logged model's requirements (mlflow would otherwise guess, and look for torchvision).
MODEL_REQUIREMENTS = ("mlflow", "transformers", "torch", "tokenizers", "safetensors")

#: Step metrics the HF Trainer logs while training, and the MLflow names they get.
STEP_METRICS = ("loss", "learning_rate", "grad_norm", "epoch")


def pip_requirements() -> list[str]:
    """Each package at the release it was trained with, as a serving environment can install it:
    "2.13.0+cu128" -> "2.13.0" (a local label resolves on no public index), and a vendor build such
    as "2.7.0a0+79aa174.nv25.04" -> "2.7.0" (its base release, not an uninstallable pre-release)."""
    from packaging.version import Version

    return [f"{name}=={Version(version(name)).base_version}" for name in MODEL_REQUIREMENTS]


def run_params(spec: RunSpec, train_rows: int, validation_rows: int, precision: str) -> dict[str, Any]:
    """Everything that describes the run; flat names, hyperparameters unprefixed."""
    return {
        **spec.hyperparameters.model_dump(),
        "precision_effective": precision,
        "model.base": spec.model.base,
        "model.max_length": spec.model.max_length,
        "data.train_uri": spec.data.train_uri,
        "data.validation_uri": spec.data.validation_uri,
        "data.format": spec.data.format,
        "data.text_column": spec.data.text_column,
        "data.label_column": spec.data.label_column,
        "data.label_names": ",".join(spec.data.label_names),
        "data.train_rows": train_rows,
        "data.validation_rows": validation_rows,
        "dataset_fingerprint": spec.dataset_fingerprint,
    }


class Tracker:
    """The MLflow run of this training run; every method is a no-op when ``enabled`` is false."""

    def __init__(self, spec: RunSpec, enabled: bool) -> None:
        self.spec = spec
        self.enabled = enabled
        self.run_id: str | None = None
        self._steps: MetricsQueue | None = None

    def start(self, previous_run_id: str | None, resumed_from_step: int | None) -> str | None:
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.spec.mlflow.tracking_uri)
        experiment_id = self._experiment_id()
        run_id = (
            previous_run_id if previous_run_id and self._resumable(previous_run_id, experiment_id) else None
        )
        identity = self.spec.identity
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=experiment_id,
            run_name=None if run_id else f"{identity.pipeline}-{identity.run_id}",
            log_system_metrics=_gpu_present(),  # GPU utilisation and memory, CPU, host memory
        )
        self.run_id = run.info.run_id
        self._steps = MetricsQueue(_batch_sender(self.run_id))
        tags = run_tags(
            identity, self.spec.dataset_fingerprint, team=self.spec.team, content_key=self.spec.content_key
        )
        if resumed_from_step is not None:
            tags[TAG_RESUMED_FROM_STEP] = str(resumed_from_step)
        mlflow.set_tags(tags)
        if run_id:
            self._clear_previous_error(run.data.tags)
        logger.info(
            "MLflow run %s (%s) in experiment %r",
            self.run_id,
            "resumed" if run_id else "new",
            self.spec.mlflow.experiment_name,
        )
        return self.run_id

    def _clear_previous_error(self, tags: dict[str, str]) -> None:
        """A new attempt of a failed run: log why the last one failed, then drop its error tags."""
        from mlflow import MlflowClient

        if TAG_ERROR in tags:
            logger.info(
                "The previous attempt of this run failed in %s: %s",
                tags.get(TAG_ERROR_STAGE, "?"),
                tags[TAG_ERROR],
            )
        client = MlflowClient()
        for key in ERROR_TAGS:
            if key in tags:
                client.delete_tag(self.run_id, key)

    def record_failure(self, error: str, stage: str, exit_code: int, checkpoint_step: int | None) -> None:
        """Why the run stops, on the run itself, so ``trainyard summary`` can say it and what to do."""
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        tags = {TAG_ERROR: error, TAG_ERROR_STAGE: stage, TAG_EXIT_CODE: str(exit_code)}
        if checkpoint_step is not None:
            tags[TAG_CHECKPOINT_STEP] = str(checkpoint_step)
        mlflow.set_tags(tags)

    def _experiment_id(self) -> str:
        import mlflow
        from mlflow.exceptions import MlflowException

        name = self.spec.mlflow.experiment_name
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return mlflow.create_experiment(name, artifact_location=self.spec.mlflow.artifact_location)
        except MlflowException:
            # Another run created it between our lookup and our create.
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _resumable(self, run_id: str, experiment_id: str) -> bool:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            run = MlflowClient().get_run(run_id)
        except MlflowException as error:
            logger.warning(
                "Checkpoint names MLflow run %s, which cannot be read (%s): starting a new run", run_id, error
            )
            return False
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            logger.warning(
                "Checkpoint names MLflow run %s, which is deleted or elsewhere: starting a new run", run_id
            )
            return False
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        import mlflow

        existing = mlflow.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != str(v))
        if changed:
            logger.warning("Resumed run keeps its original params; these differ now: %s", ", ".join(changed))
        if new:
            mlflow.log_params(new)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        numeric = _numeric(metrics)
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def log_step_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Metrics of a training step: queued and sent in the background (``trainer.metrics_queue``),
        so an unreachable tracking server delays them but never stalls or fails training."""
        if not self.enabled or self._steps is None:
            return
        numeric = _numeric(metrics)
        if numeric:
            self._steps.put(numeric, step)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_dict(data, artifact_file)

    def log_model(self, model, tokenizer, sample_texts: list[str], max_length: int) -> str | None:
        """Log the fine-tuned model as a pyfunc (``trainer/serving.py``) that truncates every input to
        ``max_length``, the length it was trained with; returns its model URI.

        The signature comes from that same classifier, so inferring it truncates too.
        """
        if not self.enabled:
            return None
        import mlflow
        from mlflow.models import infer_signature

        from trainer import serving

        model.eval()
        classifier = serving.TextClassifier.from_objects(model, tokenizer, max_length)
        signature = infer_signature(sample_texts, classifier.predict(None, sample_texts))
        with tempfile.TemporaryDirectory(prefix="trainyard-model-") as tmp:
            directory = Path(tmp) / serving.MODEL_DIR_ARTIFACT
            save_for_serving(model, tokenizer, max_length, directory)
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=serving.__file__,
                artifacts={serving.MODEL_DIR_ARTIFACT: str(directory)},
                model_config={serving.MAX_LENGTH_KEY: max_length},
                signature=signature,
                pip_requirements=pip_requirements(),
            )
        mlflow.set_tag(TAG_MODEL_URI, info.model_uri)
        logger.info("Logged model %s (inputs truncated to %d tokens)", info.model_uri, max_length)
        return info.model_uri

    def end(self, status: str) -> None:
        """FINISHED, FAILED, or KILLED (preempted: the run is resumed by the next launch)."""
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        if self._steps is not None:
            self._steps.close()
            self._steps = None
        mlflow.end_run(status=status)
        logger.info("MLflow run %s ended: %s", self.run_id, status)
        self.run_id = None


@dataclass
class TrackedRun:
    """The MLflow run as the body of ``mlflow_run`` sees it. The body moves ``stage`` on as it goes
    and sets ``trained_step`` once training is over: a failure is recorded under that stage."""

    run_id: str | None = None  # None off rank 0
    stage: str = STAGE_SETUP
    trained_step: int | None = None


@contextlib.contextmanager
def mlflow_run(
    tracker: Tracker, store: CheckpointStore, resumed_from_step: int | None, preemption: Preemption
) -> Iterator[TrackedRun]:
    """Start the MLflow run (or continue the one named in ``store``) and end it however the body ends.

    The run id goes into the checkpoint directory at once, so that a relaunch continues this run.
    The body returns: the run ends FINISHED, shielded from SIGTERM (it is complete; a SIGTERM now
    must not turn it into KILLED). The body raises: the run gets the failure tags (error, stage,
    exit code, the newest checkpoint kept) and ends FAILED, or KILLED on SIGTERM or Ctrl-C (the next
    launch resumes it); then the exception goes on, for ``__main__`` to turn into the exit code.
    """
    run = TrackedRun()
    try:
        run.run_id = tracker.start(store.read_run_id(), resumed_from_step)
        if run.run_id:
            store.write_run_id(run.run_id)  # a relaunch continues this MLflow run
        yield run
        run.stage = STAGE_FINISHING
        with preemption.shielded():
            tracker.end("FINISHED")
    except BaseException as error:
        _end_failed(tracker, store, error, run.stage)
        if run.stage in STAGES_AFTER_TRAINING:
            logger.error(
                "Failed in %s after training completed at step %d: its checkpoint is kept, and a retry "
                "resumes there and repeats only %s and what follows",
                run.stage,
                run.trained_step,
                run.stage,
            )
        raise


def _end_failed(tracker: Tracker, store: CheckpointStore, error: BaseException, stage: str) -> None:
    """Record why the run stops and end it; a tracking-server error here is logged, never raised in
    place of ``error``, which is why the run stopped."""
    try:
        kept = store.latest()
        tracker.record_failure(
            describe(error), stage, exit_code_for(error), checkpoint_step(kept) if kept is not None else None
        )
        tracker.end("KILLED" if isinstance(error, Terminated | KeyboardInterrupt) else "FAILED")
    except Exception:
        logger.exception("Could not record the failure on the MLflow run")


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The values MLflow can take as metrics (numbers; a bool is not one)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _batch_sender(run_id: str):
    """One ``log_batch`` call per batch of queued step metrics, with its own client (thread-safe)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()

    def send(batch: list[tuple[str, float, int, int]]) -> None:
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, step, ts in batch])

    return send


def save_for_serving(model, tokenizer, max_length: int, directory: Path) -> None:
    """Weights and tokenizer as ``from_pretrained`` loads them, the tokenizer's ``model_max_length``
    set to ``max_length``: whoever loads the directory with transformers and ``truncation=True``
    gets the trained length, not the tokenizer's default (which may exceed the position limit)."""
    model.save_pretrained(directory)
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = max_length
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.model_max_length = previous


class MlflowMetricsCallback(TrainerCallback):
    """Sends the Trainer's per-logging-step loss, learning rate and grad norm to MLflow (queued: see
    ``Tracker.log_step_metrics``)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.tracker.log_step_metrics({k: logs[k] for k in STEP_METRICS if k in logs}, state.global_step)
        return control
