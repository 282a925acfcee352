"""``trainer.evaluation``: per-class numbers, metric names, label alignment and confusion-matrix images,
from plain arrays (no model, no MLflow)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.evaluation import (
    LabelMismatch,
    champion_columns,
    confusion_matrix,
    metric_label_keys,
    per_class_metric_values,
    per_class_metrics,
    plot_confusion_matrix,
)
from trainer.train import compute_metrics

LABELS = ("cat", "dog", "bird")
TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PREDICTED = np.array([0, 0, 1, 1, 0, 2, 1, 1])


def test_per_class_numbers_on_a_hand_computed_example():
    assert confusion_matrix(TRUE, PREDICTED, 3).tolist() == [[2, 1, 0], [1, 1, 0], [0, 2, 1]]
    report = per_class_metrics(TRUE, PREDICTED, LABELS)
    # cat: tp 2, predicted 3, support 3; dog: tp 1, predicted 4, support 2; bird: tp 1, predicted 1, support 3
    assert report["cat"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert report["dog"] == pytest.approx({"precision": 1 / 4, "recall": 1 / 2, "f1": 1 / 3, "support": 2})
    assert report["bird"] == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 1 / 2, "support": 3})
    assert all(isinstance(stats["support"], int) for stats in report.values())
    macro = compute_metrics((np.eye(3)[PREDICTED], TRUE))["f1_macro"]
    assert macro == pytest.approx(np.mean([stats["f1"] for stats in report.values()])), "the promotion F1"


def test_a_class_never_predicted_nor_present_scores_zero_not_nan():
    report = per_class_metrics(np.array([0, 0]), np.array([0, 0]), ("a", "b"))
    assert report["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_per_class_metric_names_are_mlflow_safe_unique_and_capped():
    names = ("positive", "très bien", "a/b", "a:b", "", "x" * 300)
    keys = metric_label_keys(names)
    assert keys[0] == "positive"
    assert keys[1] == "tr_s bien"
    assert keys[2:4] == ["a_b_2", "a_b_3"], "collisions keep one name per class"
    assert keys[4] == "_4"
    assert len(keys[5]) == 200
    assert metric_label_keys(("a+", "a*", "a__1")) == ["a__0", "a__1_1", "a__1"]

    from mlflow.utils.validation import _validate_metric_name

    report = per_class_metrics(np.arange(6), np.arange(6), names)
    values = per_class_metric_values(report, names, "champion_eval")
    assert len(values) == 6 * 3
    for name in values:
        _validate_metric_name(name)
    assert values["champion_eval_f1.positive"] == 1.0

    many = tuple(f"class {i}" for i in range(150))
    labels = np.array([*range(150), *range(100, 150)])  # classes 100..149 have twice the support
    capped = per_class_metric_values(per_class_metrics(labels, labels, many), many, "eval", limit=60)
    assert len(capped) == 60 * 3
    assert {n.split(".", 1)[1] for n in capped} == {f"class {i}" for i in [*range(10), *range(100, 150)]}


def test_champion_columns_identity_permutation_or_mismatch():
    assert champion_columns(["neg", "pos"], ("neg", "pos")) == [0, 1]
    columns = champion_columns(["pos", "neutral", "neg"], ("neg", "pos", "neutral"))
    assert columns == [2, 0, 1]
    champion_logits = np.array([[5.0, 1.0, 0.0]])  # the champion says "pos"
    assert ("neg", "pos", "neutral")[int(np.argmax(champion_logits[:, columns]))] == "pos"
    reason = r"predicts labels \[a, b, c\], this run's labels are \[neg, pos\]"
    with pytest.raises(LabelMismatch, match=reason):
        champion_columns(["a", "b", "c"], ("neg", "pos"))
    with pytest.raises(LabelMismatch):
        champion_columns(["neg", "pos"], ("neg", "positive"))


@pytest.mark.parametrize("n_classes", [2, 50])
def test_confusion_matrix_png_is_a_readable_image(tmp_path, n_classes):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_classes, 500)
    predicted = np.where(rng.random(500) < 0.7, labels, rng.integers(0, n_classes, 500))
    names = tuple(f"label number {i} with a long name" for i in range(n_classes))
    matrix = confusion_matrix(labels, predicted, n_classes)
    path = plot_confusion_matrix(matrix, names, "candidate\ndataset sha256:0123456789ab", tmp_path / "c.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.load()
    assert min(width, height) >= 400
    if n_classes == 50:
        assert min(width, height) >= 1400, "the figure grows with the class count"
    assert max(width, height) <= 2400, "and stops growing"
