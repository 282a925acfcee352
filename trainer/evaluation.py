"""What the evaluation reports beyond the promotion metrics: per-class numbers, confusion matrices,
and whether a champion's classes can be compared with this run's at all.

Pure functions of numpy arrays (class ids in this run's ``label_names`` order), so they are tested
without a model or MLflow; ``trainer.scoring`` feeds them and logs what they return.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

#: Per-class statistics as MLflow metrics: at most this many classes (the best supported ones) get
#: them, so a 10,000-class run does not log 40,000 metrics; the JSON report always has every class.
MAX_CLASS_METRICS = 100
#: Per-class statistics logged as metrics (support is the data's, the same for every model).
CLASS_METRIC_STATS = ("precision", "recall", "f1")
#: Cell counts are written into the confusion matrix up to this many classes.
MAX_ANNOTATED_CLASSES = 20
#: Every class gets a tick label up to this many classes; beyond, every n-th.
MAX_TICK_LABELS = 60
_TICK_CHARS = 24
_LABEL_KEY_CHARS = 200
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\- ]")


class LabelMismatch(ValueError):
    """The champion's classes are not this run's: its scores would not measure the same task."""


def champion_columns(champion_labels: list[str], label_names: tuple[str, ...]) -> list[int]:
    """Which champion logit column holds each of this run's classes (``logits[:, columns]`` is in
    this run's class order).

    Same labels in the same order: the identity. The same labels in another order: a permutation,
    so a champion trained with ``[pos, neg]`` is scored fairly on a ``[neg, pos]`` run. Any other
    difference (a class missing, added or renamed) raises ``LabelMismatch`` naming both lists.
    """
    if list(champion_labels) == list(label_names):
        return list(range(len(label_names)))
    if len(champion_labels) == len(label_names) and set(champion_labels) == set(label_names):
        return [list(champion_labels).index(label) for label in label_names]
    raise LabelMismatch(
        f"predicts labels {_listed(champion_labels)}, this run's labels are {_listed(label_names)}"
    )


def _listed(labels, shown: int = 20) -> str:
    """``[a, b, c]``; a long list cut to its first labels and its length (the reason is a tag)."""
    more = f", … {len(labels)} in all" if len(labels) > shown else ""
    return f"[{', '.join(list(labels)[:shown])}{more}]"


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """``matrix[true, predicted]`` = how many examples of class ``true`` were predicted ``predicted``."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def per_class_metrics(
    labels: np.ndarray, predictions: np.ndarray, label_names: tuple[str, ...]
) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support of every class, keyed by label name.

    A ratio with nothing to count (a class never predicted has no precision) is 0.0, as in
    ``train.compute_metrics``, whose macro F1 is the mean of these F1 values.
    """
    matrix = confusion_matrix(labels, predictions, len(label_names))
    report: dict[str, dict[str, float | int]] = {}
    for cls, name in enumerate(label_names):
        tp = int(matrix[cls, cls])
        predicted, support = int(matrix[:, cls].sum()), int(matrix[cls, :].sum())
        report[name] = {
            "precision": tp / predicted if predicted else 0.0,
            "recall": tp / support if support else 0.0,
            "f1": 2 * tp / (predicted + support) if predicted + support else 0.0,
            "support": support,
        }
    return report


def metric_label_keys(label_names: tuple[str, ...]) -> list[str]:
    """Each label as it may appear in an MLflow metric name: characters outside ``A-Z a-z 0-9 _ . -``
    and space become ``_`` (slashes too: MLflow treats them as paths), and a label that then collides
    with another, or is empty, gets ``_<class id>`` appended so that every class keeps its own name."""
    keys = [_UNSAFE_KEY_CHARS.sub("_", name)[:_LABEL_KEY_CHARS] for name in label_names]
    counts = {key: keys.count(key) for key in keys}
    unique: list[str] = []
    for cls, key in enumerate(keys):
        name = key if key and counts[key] == 1 else f"{key}_{cls}"
        while name in unique or (name != key and name in counts):  # "a_1" may be a label itself
            name = f"{name}_{cls}"
        unique.append(name)
    return unique


def per_class_metric_values(
    report: dict[str, dict[str, float | int]],
    label_names: tuple[str, ...],
    prefix: str,
    limit: int = MAX_CLASS_METRICS,
) -> dict[str, float]:
    """MLflow metrics ``<prefix>_<stat>.<label>`` (``eval_f1.positive``) of at most ``limit``
    classes: those with the most support (ties by class id), so the same classes for every model
    scored on the same data."""
    keys = metric_label_keys(label_names)
    ranked = sorted(range(len(label_names)), key=lambda cls: (-report[label_names[cls]]["support"], cls))
    return {
        f"{prefix}_{stat}.{keys[cls]}": float(report[label_names[cls]][stat])
        for cls in sorted(ranked[:limit])
        for stat in CLASS_METRIC_STATS
    }


def evaluation_report(
    label_names: tuple[str, ...],
    candidate: dict[str, dict[str, float | int]],
    champion: dict[str, dict[str, float | int]] | None,
    *,
    champion_version: str | None,
    champion_unscorable: str | None,
    dataset_fingerprint: str,
) -> dict[str, Any]:
    """The per-class JSON artifact: both models' per-class numbers on the one validation split."""
    return {
        "labels": list(label_names),
        "candidate": candidate,
        "champion": champion,
        "champion_version": champion_version,
        "champion_unscorable": champion_unscorable,
        "dataset_fingerprint": dataset_fingerprint,
    }


def plot_confusion_matrix(matrix: np.ndarray, label_names: tuple[str, ...], title: str, path: Path) -> Path:
    """A PNG of ``matrix`` (rows: true class, columns: predicted) at ``path``.

    Colour is row-normalised (the share of each true class predicted as each class), so a rare
    class reads as clearly as a frequent one; counts are written in the cells of small matrices,
    tick labels thin out and shrink for large ones, and the figure grows with the class count up
    to a cap. Agg canvas, no pyplot: no display, no global figure state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(label_names)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = float(min(max(4.0 + 0.22 * n, 5.0), 22.0))
    figure = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")

    step = max(1, -(-n // MAX_TICK_LABELS))
    ticks = list(range(0, n, step))
    names = [_short(label_names[i]) for i in ticks]
    font = 10 if n <= 10 else 8 if n <= 30 else 6
    axes.set_xticks(ticks, names, rotation=90 if n > 6 else 0, fontsize=font)
    axes.set_yticks(ticks, names, fontsize=font)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=10)
    if n <= MAX_ANNOTATED_CLASSES:
        for (true, predicted), count in np.ndenumerate(matrix):
            colour = "white" if shares[true, predicted] > 0.5 else "black"
            axes.text(predicted, true, str(count), ha="center", va="center", color=colour, fontsize=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _short(label: str) -> str:
    """A tick label cut in the middle: long labels often differ only at their end."""
    if len(label) <= _TICK_CHARS:
        return label
    head = (_TICK_CHARS - 1) // 2
    return f"{label[:head]}…{label[-(_TICK_CHARS - 1 - head) :]}"
