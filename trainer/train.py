"""One training run, top to bottom, in the spirit of HuggingFace's ``run_glue.py``.

    spec -> data (labels as ids) -> base model + tokenizer -> HF Trainer (resumes from the last
    checkpoint) -> final checkpoint -> evaluation -> MLflow (tags, params, metrics, model) -> result

Work done is never lost to a failure after training: the final weights are a checkpoint before
evaluation and logging start, and a relaunch that finds that checkpoint skips training and repeats
only what failed. A failure records its error, stage and exit code on the MLflow run.

Precision: ``auto`` is bf16 on CUDA GPUs that support it, fp16 on other CUDA GPUs, fp32 on CPU.
An explicit ``bf16``/``fp16`` without a CUDA GPU falls back to fp32 with a warning (the same pipeline
then runs on a laptop and on a GPU node); ``bf16`` on a GPU without bf16 is an input error.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from trainer.checkpoints import (
    CheckpointStore,
    MirrorCallback,
    PreemptionCallback,
    checkpoint_step,
    ensure_final_checkpoint,
    training_complete,
)
from trainer.data import load_splits, tokenize
from trainer.errors import Terminated, TrainerInputError, describe, exit_code_for
from trainer.preemption import Preemption
from trainer.spec import (
    EVAL_METRICS,
    STAGE_EVALUATION,
    STAGE_FINISHING,
    STAGE_MODEL_LOGGING,
    STAGE_SETUP,
    STAGE_TRAINING,
    STAGES_AFTER_TRAINING,
    RunSpec,
)
from trainer.storage import is_s3, storage_options
from trainer.tracking import MlflowMetricsCallback, Tracker, run_params

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"


@dataclass(frozen=True)
class Processes:
    """Where this process sits under ``torchrun`` (a single process otherwise)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Processes:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def configure_libraries(progress_bars: bool) -> None:
    """HF libraries log through our handler (stderr); progress bars only on a terminal."""
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()
    for library in (transformers.utils.logging, datasets.utils.logging):
        library.set_verbosity_warning()
        library.enable_propagation()
    if not progress_bars:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _native_bf16(torch: Any) -> bool:
    """bf16 in hardware (Ampere and newer); torch's default also counts slow emulation (V100, T4)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str) -> str:
    import torch

    if not torch.cuda.is_available():
        if requested in ("bf16", "fp16"):
            logger.warning("precision %s requested but there is no CUDA GPU: training in fp32", requested)
        return "fp32"
    if requested == "auto":
        return "bf16" if _native_bf16(torch) else "fp16"
    if requested == "bf16" and not _native_bf16(torch):
        raise TrainerInputError(
            f"precision bf16 requested but {torch.cuda.get_device_name()} does not support bf16; "
            "use fp16 or auto"
        )
    return requested


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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLogCallback(TrainerCallback):
    """One log line per logging step: step N/M, loss, lr, samples/s, ETA (no progress bars in pod logs)."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self._start: tuple[float, int] = (0.0, 0)
        self._last: tuple[float, int] = (0.0, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._last = (time.monotonic(), state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        now, step = time.monotonic(), state.global_step
        recent = (step - self._last[1]) * self.samples_per_step / max(now - self._last[0], 1e-9)
        overall = (step - self._start[1]) / max(now - self._start[0], 1e-9)
        eta = _duration((state.max_steps - step) / overall) if overall > 0 else "?"
        logger.info(
            "step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.1f samples/s  ETA %s",
            step,
            state.max_steps,
            logs.get("epoch", state.epoch or 0.0),
            logs["loss"],
            logs.get("learning_rate", float("nan")),
            recent,
            eta,
        )
        self._last = (now, step)
        return control


def run(spec: RunSpec, preemption: Preemption) -> dict[str, Any] | None:
    """Train, evaluate and log one run; the result (rank 0) or None (other ranks)."""
    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    processes = Processes.from_env()
    hp = spec.hyperparameters
    interactive = sys.stderr.isatty()
    configure_libraries(progress_bars=interactive)
    precision = resolve_precision(hp.precision)
    labels = list(spec.data.label_names)
    store = CheckpointStore(spec.checkpoint_dir, spec.s3_endpoint_url)

    data = load_splits(spec)
    rows = {split: data[split].num_rows for split in data}
    logger.info(
        "Data: %d train rows, %d validation rows, labels %s", rows["train"], rows["validation"], labels
    )

    samples_per_step = hp.batch_size * hp.gradient_accumulation_steps * processes.world_size
    updates_per_epoch = math.ceil(rows["train"] / samples_per_step)
    total_steps = hp.max_steps or math.ceil(hp.epochs * updates_per_epoch)
    args = TrainingArguments(
        output_dir=str(store.local_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
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
        disable_tqdm=not interactive,
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )

    with args.main_process_first(local=True, desc="checkpoint and model download"):
        if processes.local_rank == 0:
            store.download()
        model_path = resolve_base_model(spec.model.base, spec.s3_endpoint_url)
    resume = store.latest()
    resumed_from_step = checkpoint_step(resume) if resume else None
    trained = resume is not None and training_complete(resume)
    if trained:
        logger.info(
            "Training already complete at step %d (checkpoint %s): evaluating and logging its weights, "
            "no training",
            resumed_from_step,
            resume,
        )
    elif resume:
        logger.info("Resuming from checkpoint %s (step %d)", resume, resumed_from_step)

    transformers.set_seed(hp.seed)  # the classification head is initialised here, before the Trainer
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(resume) if trained else model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,  # a base that is already a classifier with other labels
    )
    max_length = min(spec.model.max_length, getattr(model.config, "max_position_embeddings", None) or 10**9)
    if max_length < spec.model.max_length:
        logger.warning(
            "model.max_length %d exceeds what %s supports: truncating to %d tokens",
            spec.model.max_length,
            spec.model.base,
            max_length,
        )
    with args.main_process_first(desc="tokenize"):
        encoded = tokenize(data, tokenizer, max_length)

    tracker = Tracker(spec, enabled=processes.is_main)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=8 if precision != "fp32" else None
        ),
        compute_metrics=compute_metrics,
        callbacks=[
            PreemptionCallback(preemption),
            ProgressLogCallback(samples_per_step),
            MlflowMetricsCallback(tracker),
            *([MirrorCallback(store)] if store.remote else []),
        ],
    )
    trainer.remove_callback(PrinterCallback)  # it print()s raw dicts to stdout

    stage = STAGE_SETUP
    try:
        run_id = tracker.start(store.read_run_id(), resumed_from_step)
        if run_id:
            store.write_run_id(run_id)  # a relaunch continues this MLflow run
        tracker.log_params(run_params(spec, rows["train"], rows["validation"], precision))
        if spec.validation_report is not None:
            tracker.log_dict(spec.validation_report, "validation_report.json")

        stage = STAGE_TRAINING
        train_metrics: dict[str, float] = {}
        if trained:  # the metrics of that training were logged by the attempt that trained
            global_step = resumed_from_step
        else:
            logger.info(
                "Training %s: %d steps of %d samples, precision %s, device %s",
                spec.model.base,
                total_steps,
                samples_per_step,
                precision,
                args.device,
            )
            with preemption.deferred():
                outcome = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            global_step = outcome.global_step
            final = ensure_final_checkpoint(trainer, store, processes.is_main)
            logger.info("Training complete at step %d; final checkpoint %s", global_step, final.name)
            train_metrics = {k: v for k, v in outcome.metrics.items() if k != "total_flos"}
            tracker.log_metrics(train_metrics, step=global_step)

        stage = STAGE_EVALUATION
        eval_metrics = trainer.evaluate()
        tracker.log_metrics(eval_metrics, step=global_step)
        logger.info("Evaluation: %s", ", ".join(f"{k} {eval_metrics[k]:.4f}" for k in EVAL_METRICS))

        stage = STAGE_MODEL_LOGGING
        sample_texts = data["validation"]["text"][:5]
        model_uri = tracker.log_model(trainer.model, tokenizer, list(sample_texts), max_length)
        stage = STAGE_FINISHING
        with preemption.shielded():  # complete: a SIGTERM now must not turn it into KILLED
            tracker.end("FINISHED")
    except BaseException as error:
        exit_code = exit_code_for(error)
        try:
            kept = store.latest()
            tracker.record_failure(
                describe(error), stage, exit_code, checkpoint_step(kept) if kept is not None else None
            )
            tracker.end("KILLED" if isinstance(error, Terminated | KeyboardInterrupt) else "FAILED")
        except Exception:  # never hide why the run stopped behind a tracking-server error
            logger.exception("Could not record the failure on the MLflow run")
        if stage in STAGES_AFTER_TRAINING:
            logger.error(
                "Failed in %s after training completed at step %d: its checkpoint is kept, and a retry "
                "resumes there and repeats only %s and what follows",
                stage,
                global_step,
                stage,
            )
        raise

    if processes.is_main and not spec.keep_checkpoints:
        with preemption.shielded():  # a half-removed checkpoint dir would be resumed by a relaunch
            store.remove()
    if not processes.is_main:
        return None
    return {
        "mlflow_run_id": run_id,
        "model_uri": model_uri,
        "metrics": {k: float(eval_metrics[k]) for k in EVAL_METRICS},
        "resumed_from_step": resumed_from_step,
        "global_step": global_step,
        "precision": precision,
        "train": {
            k: train_metrics[k] for k in ("train_runtime", "train_samples_per_second") if k in train_metrics
        },
    }
