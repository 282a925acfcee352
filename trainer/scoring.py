"""The champion, scored on this run's validation split, and what the evaluation logs on the run.

Promotion compares the candidate with the champion on the candidate's own validation split, so the
champion's numbers come from here, not from the run that trained it (other data, maybe other code).
Its model (as ``Tracker.log_model`` logged it) is downloaded, the split is tokenized with the
champion's own tokenizer and ``max_length``, and its loss, accuracy and macro F1 come from the same
``compute_metrics`` and the same per-example loss mean as the HF Trainer's evaluation.

Rank 0 alone scores the champion, with a plain loop rather than ``Trainer.predict``: the Trainer's
evaluation gathers across ranks and would wait forever for ranks that are not scoring. A champion
that cannot be scored is a tag with the reason and a warning, never a failed run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import describe
from trainer.evaluation import (
    champion_columns,
    confusion_matrix,
    evaluation_report,
    per_class_metric_values,
    per_class_metrics,
    plot_confusion_matrix,
)
from trainer.spec import (
    CHAMPION_METRIC_PREFIX,
    CONFUSION_CANDIDATE_ARTIFACT,
    CONFUSION_CHAMPION_ARTIFACT,
    EVAL_METRICS,
    PER_CLASS_ARTIFACT,
    TAG_CHAMPION_SCORED_VERSION,
    TAG_CHAMPION_UNSCORABLE,
    ChampionRef,
    RunSpec,
)

logger = logging.getLogger(__name__)

_PYFUNC = "python_function"
_LOW_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Predictions:
    """One model's predictions on the validation split: class ids in this run's label order."""

    labels: np.ndarray
    predicted: np.ndarray
    metrics: dict[str, float]  # eval_loss, eval_accuracy, eval_f1_macro (and the Trainer's timings)


@dataclass(frozen=True)
class ChampionScore:
    """The champion's predictions, or the sentence saying why it could not be scored."""

    champion: ChampionRef
    predictions: Predictions | None = None
    unscorable: str | None = None


class Unscorable(Exception):
    """The champion cannot be compared on this split; the message is the reason, as a sentence."""


def candidate_predictions(output) -> Predictions:
    """From ``Trainer.predict(..., metric_key_prefix="eval")``: logits to class ids."""
    return Predictions(
        labels=np.asarray(output.label_ids),
        predicted=np.argmax(output.predictions, axis=-1),
        metrics=dict(output.metrics),
    )


def score_champion(
    spec: RunSpec,
    validation,
    compute_metrics: Callable[[tuple[np.ndarray, np.ndarray]], dict[str, float]],
    *,
    batch_size: int,
    device,
    precision: str,
) -> ChampionScore:
    """Download, load and score ``spec.champion`` on ``validation`` (the ``text``/``labels`` split
    before tokenization); any failure but a stop (SIGTERM, Ctrl-C) becomes the unscorable reason."""
    champion = spec.champion
    assert champion is not None
    scratch = os.environ.get("TRAINYARD_SCRATCH") or None
    try:
        with tempfile.TemporaryDirectory(prefix="trainyard-champion-", dir=scratch) as tmp:
            model_dir, max_length = fetch_champion(champion, Path(tmp))
            model, tokenizer = _load(champion, model_dir)
            columns = _columns(champion, model, spec.data.label_names)
            logits = _predict(
                model,
                tokenizer,
                validation,
                max_length=max_length,
                batch_size=batch_size,
                device=device,
                precision=precision,
            )[:, columns]
        labels = np.asarray(validation["labels"], dtype=np.int64)
        metrics = {f"eval_{k}": v for k, v in compute_metrics((logits, labels)).items()}
        metrics["eval_loss"] = _mean_cross_entropy(logits, labels)
    except Unscorable as error:
        logger.warning("The champion is not scored: %s", error)
        return ChampionScore(champion, unscorable=str(error))
    except Exception as error:
        reason = (
            f"champion v{champion.version} failed to predict on the validation split: {describe(error, 500)}"
        )
        logger.warning("The champion is not scored: %s", reason, exc_info=True)
        return ChampionScore(champion, unscorable=reason)
    logger.info(
        "Champion v%s on this validation split: %s",
        champion.version,
        ", ".join(f"{k} {metrics[k]:.4f}" for k in EVAL_METRICS),
    )
    return ChampionScore(champion, Predictions(labels, np.argmax(logits, axis=-1), metrics))


def fetch_champion(champion: ChampionRef, directory: Path) -> tuple[Path, int]:
    """The champion's ``save_pretrained`` directory and trained ``max_length``, downloaded into
    ``directory``.

    The whole model is downloaded and its MLmodel read: ``<model_uri>/artifacts/hf_model`` fails for
    a logged-model URI (``models:/m-...`` parses as a registered name), while the model URI itself
    works for ``models:/m-...``, ``models:/<name>/<version>`` and ``runs:/<id>/model``, on a local
    store and through a server's proxied artifacts alike.
    """
    import mlflow
    from mlflow.models import Model

    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=champion.model_uri, dst_path=str(directory))
        )
    except Exception as error:
        raise Unscorable(
            f"champion v{champion.version} could not be downloaded from {champion.model_uri}: "
            f"{describe(error, 500)}"
        ) from error
    from trainer.serving import MAX_LENGTH_KEY, MODEL_DIR_ARTIFACT

    try:
        flavor = Model.load(str(local)).flavors[_PYFUNC]
        model_dir = local / flavor["artifacts"][MODEL_DIR_ARTIFACT]["path"]
        max_length = int(flavor["config"][MAX_LENGTH_KEY])
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(model_dir / "config.json")
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise Unscorable(
            f"champion v{champion.version} ({champion.model_uri}) is not a model this trainer logged: "
            f"no {MODEL_DIR_ARTIFACT} artifact with weights, or no {MAX_LENGTH_KEY} in its model config "
            f"({describe(error, 300)})"
        ) from error
    return model_dir, max_length


def _load(champion: ChampionRef, model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        return AutoModelForSequenceClassification.from_pretrained(model_dir), AutoTokenizer.from_pretrained(
            model_dir
        )
    except Exception as error:
        raise Unscorable(
            f"champion v{champion.version} could not be loaded: {describe(error, 500)}"
        ) from error


def _columns(champion: ChampionRef, model, label_names: tuple[str, ...]) -> list[int]:
    id2label = model.config.id2label
    labels = [str(id2label[i]) for i in range(model.config.num_labels)]
    try:
        return champion_columns(labels, label_names)
    except ValueError as error:
        raise Unscorable(f"champion v{champion.version} {error}") from error


def _predict(
    model, tokenizer, validation, *, max_length: int, batch_size: int, device, precision: str
) -> np.ndarray:
    """Logits of every validation example, in order: the split tokenized as ``trainer.data.tokenize``
    does for training, padded per batch, under the autocast the Trainer's evaluation uses."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from trainer.data import tokenize
    from trainer.speed import LENGTH_COLUMN

    encoded = tokenize(validation, tokenizer, max_length).remove_columns(["labels", LENGTH_COLUMN])
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if precision != "fp32" else None)
    loader = DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=collator)
    dtype = getattr(torch, _LOW_PRECISION[precision]) if precision in _LOW_PRECISION else None
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None and device.type == "cuda" else None
    )
    model.to(device).eval()
    chunks = []
    try:
        with torch.inference_mode(), autocast or contextlib.nullcontext():
            for batch in loader:
                outputs = model(**{k: v.to(device) for k, v in batch.items()})
                chunks.append(outputs.logits.float().cpu().numpy())
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return np.concatenate(chunks)


def _mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The per-example mean cross-entropy: what the Trainer's ``eval_loss`` is for a classifier."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


# -- logging -----------------------------------------------------------------------------------------


def log_evaluation(
    tracker, spec: RunSpec, candidate: Predictions, champion: ChampionScore | None, step: int
) -> dict[str, Any] | None:
    """Per-class metrics and confusion matrices of both models, the champion's metrics and tags on
    the run; returns the result's ``champion`` entry.

    The champion's metrics and ``TAG_CHAMPION_SCORED_VERSION`` go in one batch, after the artifacts:
    the tag marks a complete scoring. A retry that cannot score the champion an earlier attempt of
    this run scored keeps that attempt's scores (same weights, same data) rather than setting the
    unscorable tag beside champion metrics, which MLflow cannot delete.
    """
    if not tracker.enabled:
        return None
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    if champion is not None and champion.unscorable and _scored_before(run, champion.champion):
        logger.warning(
            "%s; keeping the scores an earlier attempt of this run logged for it", champion.unscorable
        )
        return _champion_entry(champion.champion.version, run.data.metrics)

    labels = spec.data.label_names
    scored = champion.predictions if champion is not None else None
    candidate_report = per_class_metrics(candidate.labels, candidate.predicted, labels)
    champion_report = per_class_metrics(scored.labels, scored.predicted, labels) if scored else None
    tracker.log_metrics(per_class_metric_values(candidate_report, labels, "eval"), step=step)
    tracker.log_dict(
        evaluation_report(
            labels,
            candidate_report,
            champion_report,
            champion_version=champion.champion.version if scored else None,
            champion_unscorable=champion.unscorable if champion is not None else None,
            dataset_fingerprint=spec.dataset_fingerprint,
        ),
        PER_CLASS_ARTIFACT,
    )
    dataset = f"dataset {spec.dataset_fingerprint[:19]}"
    with tempfile.TemporaryDirectory(prefix="trainyard-evaluation-") as tmp:
        plots = [(candidate, f"candidate (MLflow run {tracker.run_id[:8]})", CONFUSION_CANDIDATE_ARTIFACT)]
        if scored:
            ref = champion.champion
            plots.append((scored, f"champion {ref.name} v{ref.version}", CONFUSION_CHAMPION_ARTIFACT))
        for predictions, model, artifact in plots:
            directory, name = posixpath.split(artifact)
            matrix = confusion_matrix(predictions.labels, predictions.predicted, len(labels))
            try:
                path = plot_confusion_matrix(matrix, labels, f"{model}\n{dataset}", Path(tmp) / name)
            except Exception:  # a picture is not worth a failed run; its numbers are in the JSON
                logger.warning("Could not draw %s", artifact, exc_info=True)
                continue
            mlflow.log_artifact(str(path), artifact_path=directory)

    if champion is None:
        return None
    tags = run.data.tags
    if scored is None:
        if TAG_CHAMPION_SCORED_VERSION in tags:  # an incomplete or other scoring: not this one
            client.delete_tag(tracker.run_id, TAG_CHAMPION_SCORED_VERSION)
        mlflow.set_tag(TAG_CHAMPION_UNSCORABLE, champion.unscorable)
        return {"version": champion.champion.version, "unscorable": champion.unscorable}
    values = {CHAMPION_METRIC_PREFIX + name: scored.metrics[name] for name in EVAL_METRICS}
    values.update(per_class_metric_values(champion_report, labels, f"{CHAMPION_METRIC_PREFIX}eval"))
    _log_champion_scores(client, tracker.run_id, champion.champion.version, values, step)
    if TAG_CHAMPION_UNSCORABLE in tags:  # an earlier attempt could not score it
        client.delete_tag(tracker.run_id, TAG_CHAMPION_UNSCORABLE)
    return _champion_entry(
        champion.champion.version, {CHAMPION_METRIC_PREFIX + k: v for k, v in scored.metrics.items()}
    )


def _scored_before(run, champion: ChampionRef) -> bool:
    return run.data.tags.get(TAG_CHAMPION_SCORED_VERSION) == champion.version and all(
        CHAMPION_METRIC_PREFIX + name in run.data.metrics for name in EVAL_METRICS
    )


def _log_champion_scores(client, run_id: str, version: str, values: dict[str, float], step: int) -> None:
    """The metrics and the scored tag in one request: the tag never stands without its metrics."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, step) for key, value in values.items()],
        tags=[RunTag(TAG_CHAMPION_SCORED_VERSION, version)],
    )


def _champion_entry(version: str, metrics: dict[str, float]) -> dict[str, Any]:
    """``{"version", "metrics"}``, the metrics under the ``EVAL_METRICS`` names (as the candidate's)."""
    return {
        "version": version,
        "metrics": {k: float(metrics[CHAMPION_METRIC_PREFIX + k]) for k in EVAL_METRICS},
    }
