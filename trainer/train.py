"""One training run, top to bottom, in the spirit of HuggingFace's ``run_glue.py``: ``run()`` is the
list of steps, and each step is a function below it, in the order they run.

    spec (``__main__`` loads it) -> stage and verify the data -> training plan -> checkpoint and base
    model -> model and tokenizer -> tokenize -> HF Trainer -> MLflow run (``tracking.mlflow_run``):
    inputs, train (resume, or skip when already complete), evaluate, score the champion on the same
    split, per-class metrics and confusion matrices, log the model -> remove the checkpoints -> result

Work done is never lost to a failure after training: the final weights are a checkpoint before
evaluation and logging start, and a relaunch that finds that checkpoint skips training and repeats
only what failed. ``tracking.mlflow_run`` ends the MLflow run: FINISHED, or FAILED (KILLED on
SIGTERM) with the error, the stage it happened in and the exit code recorded on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer import class_weights, tracking
from trainer.checkpoints import (
    CheckpointStore,
    MirrorCallback,
    PreemptionCallback,
    RanksCallback,
    checkpoint_step,
    ensure_final_checkpoint,
    training_complete,
)
from trainer.data import load_splits, tokenize
from trainer.efficiency import ProgressCallback, chunks, padding_fraction, peak_flops, trainable_parameters
from trainer.errors import TrainerInputError
from trainer.preemption import Preemption
from trainer.runtime import Processes, configure_libraries, resolve_precision, use_local_gpu
from trainer.scoring import ChampionScore, Predictions, candidate_predictions, log_evaluation, score_champion
from trainer.spec import (
    EVAL_METRICS,
    STAGE_CHAMPION_EVALUATION,
    STAGE_EVALUATION,
    STAGE_MODEL_LOGGING,
    STAGE_TRAINING,
    RunSpec,
)
from trainer.speed import LENGTH_COLUMN, SpeedPlan, log_plan, plan_speed, why_not_packed
from trainer.storage import is_s3, storage_options
from trainer.tracking import MlflowMetricsCallback, Tracker, run_params

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"


@dataclass(frozen=True)
class Plan:
    """Fixed before any model is loaded: who this process is, its precision, where the checkpoints
    go, the step arithmetic, and the ``TrainingArguments`` made of all of it."""

    processes: Processes
    precision: str
    store: CheckpointStore
    samples_per_step: int
    total_steps: int
    speed: SpeedPlan
    args: TrainingArguments


@dataclass(frozen=True)
class Start:
    """Where training starts: the base model, and the newest checkpoint an earlier attempt left."""

    model_path: str
    checkpoint: Path | None = None
    step: int | None = None  # the checkpoint's step: the run resumes from it
    complete: bool = False  # the checkpoint is at the final step: nothing is left to train


@dataclass(frozen=True)
class Trained:
    """Where training ended, and its metrics (none when an earlier attempt did the training)."""

    global_step: int
    metrics: dict[str, float]


def run(spec: RunSpec, preemption: Preemption) -> dict[str, Any] | None:
    """Train, evaluate and log one run; the result (rank 0) or None (other ranks).

    The MLflow run starts only once the data, model and Trainer are ready; from then on a failure is
    recorded on it under the stage set below. A failure before that (bad data, say) shows in the log
    and the exit code only, as there is no run to record it on yet.
    """
    processes = Processes.from_env()
    configure_libraries(progress_bars=sys.stderr.isatty())
    use_local_gpu(processes)  # before any CUDA query: each rank asks about its own GPU
    precision = resolve_precision(spec.hyperparameters.precision)

    data = load_data(spec)
    plan = plan_training(spec, data, processes, precision)
    start = fetch_checkpoint_and_base_model(spec, plan)
    model, tokenizer = load_model(spec, start)
    max_length = fitting_max_length(spec, model)
    encoded = tokenize_data(data, tokenizer, max_length, plan)
    tracker = Tracker(spec, enabled=processes.is_main)
    trainer = build_trainer(spec, plan, model, tokenizer, encoded, tracker=tracker, preemption=preemption)

    with tracking.mlflow_run(tracker, plan.store, start.step, preemption) as mlflow_run:
        log_inputs(tracker, spec, data, plan)
        mlflow_run.stage = STAGE_TRAINING
        trained = train_unless_complete(trainer, spec, plan, start, tracker=tracker, preemption=preemption)
        mlflow_run.trained_step = trained.global_step
        mlflow_run.stage = STAGE_EVALUATION
        candidate = evaluate(trainer, tracker, trained.global_step)
        mlflow_run.stage = STAGE_CHAMPION_EVALUATION if spec.champion else STAGE_EVALUATION
        champion = evaluate_champion(spec, plan, trainer, data)
        champion_entry = log_evaluation(tracker, spec, candidate, champion, trained.global_step)
        mlflow_run.stage = STAGE_MODEL_LOGGING
        model_uri = log_model(tracker, trainer, tokenizer, data, max_length)

    remove_checkpoints(spec, plan, preemption)
    if not processes.is_main:
        return None
    return result(
        plan,
        start,
        trained,
        candidate.metrics,
        mlflow_run_id=mlflow_run.run_id,
        model_uri=model_uri,
        champion=champion_entry,
    )


def load_data(spec: RunSpec):
    """Stage the files, verify they are the bytes ``validate_data`` approved, map labels to ids
    (``trainer.data``): bad data stops here, before any model is downloaded."""
    data = load_splits(spec)
    logger.info(
        "Data: %d train rows, %d validation rows, labels %s",
        data["train"].num_rows,
        data["validation"].num_rows,
        list(spec.data.label_names),
    )
    return data


def plan_training(spec: RunSpec, data, processes: Processes, precision: str) -> Plan:
    """The ``TrainingArguments``, from the spec and the data size: resumable checkpoints every
    ``checkpoint_every_steps``, one evaluation at the end, about 20 log lines a run, and no reporting
    by HF itself (``trainer.tracking`` logs to MLflow, on rank 0 only)."""
    import torch
    from transformers import TrainingArguments

    hp = spec.hyperparameters
    cuda = torch.cuda.is_available()
    speed = plan_speed(
        hp,
        cuda=cuda,
        tf32_available=_tf32_available(),
        not_packed=why_not_packed(
            hp.attention, cuda=cuda, flash_attn_installed=importlib.util.find_spec("flash_attn") is not None
        ),
    )
    store = CheckpointStore(spec.checkpoint_dir, spec.s3_endpoint_url)
    samples_per_step = hp.batch_size * hp.gradient_accumulation_steps * processes.world_size
    updates_per_epoch = math.ceil(data["train"].num_rows / samples_per_step)
    total_steps = hp.max_steps or math.ceil(hp.epochs * updates_per_epoch)
    args = TrainingArguments(
        output_dir=str(store.local_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        warmup_steps=hp.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        seed=hp.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        save_strategy="steps",
        save_steps=hp.checkpoint_every_steps,
        save_total_limit=2,
        eval_strategy="no",  # evaluated once, at the end
        logging_strategy="steps",
        logging_steps=max(1, min(50, total_steps // 20)),
        logging_first_step=True,
        report_to="none",  # MLflow is logged by trainer.tracking, on rank 0 only
        disable_tqdm=not sys.stderr.isatty(),
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),  # several CPU ranks: real DDP over gloo, not N copies
        # transformers 5.24 scales each rank's loss by the world size when the model takes loss kwargs,
        # assuming the model divided by the item count of all ranks; HF classifiers take the per-rank
        # mean instead, so on N ranks the loss, the gradient and its clipping would be N times too large.
        average_tokens_across_devices=False,
        **speed.training_arguments(),
    )
    if processes.is_main:
        log_plan(speed)
    return Plan(processes, precision, store, samples_per_step, total_steps, speed, args)


def _tf32_available() -> bool:
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()


def fetch_checkpoint_and_base_model(spec: RunSpec, plan: Plan) -> Start:
    """Bring the newest checkpoint of an earlier attempt (once per node) and the base model to
    local disk, local rank 0 first so that the other ranks find them there; then say where training
    starts. A checkpoint at the final step means an earlier attempt trained and failed afterwards."""
    with plan.args.main_process_first(local=True, desc="checkpoint and model download"):
        if plan.processes.local_rank == 0:
            plan.store.download()
        model_path = resolve_base_model(spec.model.base, spec.s3_endpoint_url)
    checkpoint = plan.store.latest()
    if checkpoint is None:
        return Start(model_path)
    start = Start(model_path, checkpoint, checkpoint_step(checkpoint), training_complete(checkpoint))
    if start.complete:
        logger.info(
            "Training already complete at step %d (checkpoint %s): evaluating and logging its weights, "
            "no training",
            start.step,
            checkpoint,
        )
    else:
        logger.info("Resuming from checkpoint %s (step %d)", checkpoint, start.step)
    return start


def load_model(spec: RunSpec, start: Start):
    """The base model's tokenizer and a classifier for this run's labels: the base model with a new
    head, seeded so that every attempt initialises it alike, or the final checkpoint's weights when
    training is complete already (the Trainer restores any other checkpoint itself).

    The weights load in float32 whatever dtype the checkpoint stores: bf16/fp16 training is autocast
    over float32 master weights (pure half-precision weights lose AdamW's small updates, and fp16
    ones make the gradient scaler fail). Attention is the training section's kernel (SDPA default).
    """
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = list(spec.data.label_names)
    transformers.set_seed(spec.hyperparameters.seed)  # the classification head is initialised here
    tokenizer = AutoTokenizer.from_pretrained(start.model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(start.checkpoint) if start.complete else start.model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,  # a base that is already a classifier with other labels
        dtype=torch.float32,
        attn_implementation=spec.hyperparameters.attention,
    )
    return model, tokenizer


def fitting_max_length(spec: RunSpec, model) -> int:
    """``model.max_length``, cut (with a warning) to the model's position limit: a longer input
    would index past its position embeddings."""
    max_length = min(spec.model.max_length, getattr(model.config, "max_position_embeddings", None) or 10**9)
    if max_length < spec.model.max_length:
        logger.warning(
            "model.max_length %d exceeds what %s supports: truncating to %d tokens",
            spec.model.max_length,
            spec.model.base,
            max_length,
        )
    return max_length


def tokenize_data(data, tokenizer, max_length: int, plan: Plan):
    """Token ids for both splits; the main process goes first and fills the ``datasets`` cache, which
    the other ranks then read instead of tokenizing again."""
    with plan.args.main_process_first(desc="tokenize"):
        return tokenize(data, tokenizer, max_length)


def build_trainer(
    spec: RunSpec, plan: Plan, model, tokenizer, encoded, *, tracker: Tracker, preemption: Preemption
):
    """The HF Trainer with our callbacks: a checkpoint and a stop on SIGTERM, one log line per logging
    step, step metrics to MLflow, each checkpoint mirrored to ``s3://``; and without its
    ``PrinterCallback``, which ``print()``s raw dicts to stdout (the result line's stream)."""
    from transformers import DataCollatorWithPadding, PrinterCallback

    from trainer.hf_trainer import TrainyardTrainer

    weighted = spec.hyperparameters.class_weights == "auto"
    weighted_loss = loss_weights(spec, encoded["train"]) if weighted else None
    trainer = TrainyardTrainer(
        model=model,
        args=plan.args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=plan.speed.pad_to_multiple_of),
        compute_metrics=compute_metrics,
        compute_loss_func=weighted_loss,
        callbacks=[
            PreemptionCallback(preemption),
            progress_callback(plan, model, tracker),
            MlflowMetricsCallback(tracker),
            RanksCallback(),  # before MirrorCallback: the ranks file goes up with the checkpoint
            *([MirrorCallback(plan.store)] if plan.store.remote else []),
        ],
    )
    if weighted_loss is not None:
        weighted_loss.model = trainer.model  # weights apply while training, not to the eval loss
    trainer.remove_callback(PrinterCallback)
    return trainer


def loss_weights(spec: RunSpec, train) -> class_weights.WeightedLoss:
    """``class_weights: auto``: the loss weighted by inverse class frequency in the training split."""
    weights = class_weights.inverse_frequency(train["labels"], len(spec.data.label_names))
    logger.info(
        "Class weights (inverse frequency): %s", class_weights.describe(weights, spec.data.label_names)
    )
    return class_weights.WeightedLoss(weights)


def progress_callback(plan: Plan, model, tracker: Tracker) -> ProgressCallback:
    """Progress lines and speed metrics; with the GPU's peak known, an MFU estimate as well."""
    import torch

    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    return ProgressCallback(
        plan.samples_per_step,
        tracker.log_step_metrics,
        parameters=trainable_parameters(model) if peak else None,
        peak=peak,
        devices=plan.processes.world_size,
    )


def batch_padding(trainer, plan: Plan) -> float:
    """The share of padding in the training batches as this run forms them (its sampler, its batch
    size, its padding multiple), measured on up to 200 batches of indices, before training: the
    sampler runs under a forked RNG, so training draws the same order as without the measurement."""
    import torch

    train = trainer.train_dataset
    with torch.random.fork_rng(devices=[]):
        sampler = trainer._get_train_sampler(train)
        indices = iter(sampler) if sampler is not None else iter(range(train.num_rows))
        batches = list(itertools.islice(chunks(indices, plan.args.per_device_train_batch_size), 200))
    return padding_fraction(train[LENGTH_COLUMN], batches, plan.speed.pad_to_multiple_of)


def log_inputs(tracker: Tracker, spec: RunSpec, data, plan: Plan) -> None:
    """What the run is trained on and how (the requested settings and the effective ``speed.*``
    ones), as params and the validation report: logged once per MLflow run, so a relaunch keeps the
    original params (``Tracker.log_params`` warns of changes)."""
    params = run_params(spec, data["train"].num_rows, data["validation"].num_rows, plan.precision)
    tracker.log_params({**params, **plan.speed.params(), "speed.world_size": plan.processes.world_size})
    if spec.validation_report is not None:
        tracker.log_dict(spec.validation_report, "validation_report.json")


def train_unless_complete(
    trainer, spec: RunSpec, plan: Plan, start: Start, *, tracker: Tracker, preemption: Preemption
) -> Trained:
    """Train, from the start or from the checkpoint of an interrupted attempt, or not at all when
    the checkpoint is at the final step (the attempt that trained logged its metrics). Inside the
    loop SIGTERM saves a checkpoint at the end of the step and stops; once the loop is done the
    final weights are a checkpoint, before anything after training can fail."""
    if start.complete:
        return Trained(start.step, {})
    logger.info(
        "Training %s: %d steps of %d samples, precision %s, device %s",
        spec.model.base,
        plan.total_steps,
        plan.samples_per_step,
        plan.precision,
        plan.args.device,
    )
    padding = batch_padding(trainer, plan)
    logger.info("Padding: %.1f%% of the tokens in the training batches", 100 * padding)
    with preemption.deferred():
        preemption.start_together(plan.processes.world_size)  # all ranks train, or none
        outcome = trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
    final = ensure_final_checkpoint(trainer, plan.store, plan.processes.is_main)
    logger.info("Training complete at step %d; final checkpoint %s", outcome.global_step, final.name)
    speed = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)).summary
    metrics = {
        **{k: v for k, v in outcome.metrics.items() if k != "total_flos"},
        **speed,
        "padding_fraction": padding,
    }
    tracker.log_metrics(metrics, step=outcome.global_step)
    return Trained(outcome.global_step, metrics)


def evaluate(trainer, tracker: Tracker, global_step: int) -> Predictions:
    """Once, on the validation split (``eval_strategy="no"`` while training): the metrics that
    promotion compares, logged at the final step, and the predictions the per-class numbers and
    the confusion matrix are made of (``predict`` is ``evaluate`` that also returns them)."""
    candidate = candidate_predictions(trainer.predict(trainer.eval_dataset, metric_key_prefix="eval"))
    tracker.log_metrics(candidate.metrics, step=global_step)
    logger.info("Evaluation: %s", ", ".join(f"{k} {candidate.metrics[k]:.4f}" for k in EVAL_METRICS))
    return candidate


def evaluate_champion(spec: RunSpec, plan: Plan, trainer, data) -> ChampionScore | None:
    """The champion the spec names, scored on the same validation split by rank 0 with the same
    ``compute_metrics``, batch size, device and precision (``trainer.scoring``); None without one.
    Done on every attempt, a relaunch after complete training too: it is read-only but for the run."""
    if spec.champion is None or not plan.processes.is_main:
        return None
    logger.info(
        "Scoring champion %s v%s (%s)", spec.champion.name, spec.champion.version, spec.champion.model_uri
    )
    return score_champion(
        spec,
        data["validation"],
        trainer.compute_metrics,
        batch_size=plan.args.per_device_eval_batch_size,
        device=plan.args.device,
        precision=plan.precision,
    )


def log_model(tracker: Tracker, trainer, tokenizer, data, max_length: int) -> str | None:
    """The fine-tuned model as the pyfunc that serving loads (``Tracker.log_model``), its signature
    inferred from the first validation texts; its model URI (None off rank 0)."""
    sample_texts = list(data["validation"]["text"][:5])
    return tracker.log_model(trainer.model, tokenizer, sample_texts, max_length)


def remove_checkpoints(spec: RunSpec, plan: Plan, preemption: Preemption) -> None:
    """Once the run is FINISHED its checkpoints are only disk, unless the spec keeps them. Shielded
    from SIGTERM: a relaunch would resume a half-removed checkpoint directory."""
    if plan.processes.is_main and not spec.keep_checkpoints:
        with preemption.shielded():
            plan.store.remove()


def result(
    plan: Plan,
    start: Start,
    trained: Trained,
    eval_metrics: dict[str, float],
    *,
    mlflow_run_id: str | None,
    model_uri: str | None,
    champion: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``trainyard_result`` line ``__main__`` prints: what the Airflow side reads back.

    ``champion`` is None without one in the spec, else ``{"version", "metrics"}`` (the champion's
    scores on this validation split under the ``metrics`` names) or ``{"version", "unscorable"}``.
    """
    return {
        "mlflow_run_id": mlflow_run_id,
        "model_uri": model_uri,
        "metrics": {k: float(eval_metrics[k]) for k in EVAL_METRICS},
        "champion": champion,
        "resumed_from_step": start.step,
        "global_step": trained.global_step,
        "precision": plan.precision,
        "train": {
            k: trained.metrics[k]
            for k in ("train_runtime", "train_samples_per_second")
            if k in trained.metrics
        },
    }


# -- what the steps use -----------------------------------------------------------------------------


def resolve_base_model(base: str, s3_endpoint_url: str | None) -> str:
    """A path or Hub id ``from_pretrained`` accepts: hf://org/name -> org/name, s3:// -> a local copy."""
    if base.startswith(HF_PREFIX):
        return base[len(HF_PREFIX) :]
    if is_s3(base):
        import fsspec

        cache_root = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
        local = cache_root / "trainyard-models" / hashlib.sha256(base.rstrip("/").encode()).hexdigest()[:16]
        if not (local / "config.json").is_file():
            fs = fsspec.filesystem("s3", **storage_options(base, s3_endpoint_url))
            if not fs.exists(f"{base.rstrip('/')}/config.json"):
                raise TrainerInputError(f"model.base {base}: no config.json under that prefix")
            partial = local.with_name(local.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            logger.info("Downloading base model %s", base)
            fs.get(base.rstrip("/") + "/", str(partial) + "/", recursive=True)
            shutil.rmtree(local, ignore_errors=True)
            partial.rename(local)
        return str(local)
    if not (Path(base) / "config.json").is_file():
        raise TrainerInputError(f"model.base {base}: not a model directory (no config.json)")
    return base


def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro F1 (every class counts, present or not); the Trainer adds the eval_ prefix."""
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    n_classes = logits.shape[-1]
    f1 = []
    for cls in range(n_classes):
        tp = np.sum((predictions == cls) & (labels == cls))
        wrong = np.sum((predictions == cls) != (labels == cls))  # false positives + false negatives
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return {"accuracy": float(np.mean(predictions == labels)), "f1_macro": float(np.mean(f1))}
