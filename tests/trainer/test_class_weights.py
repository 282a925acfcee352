"""``training.class_weights: auto``: inverse-frequency weights, applied while training only, and a
real run on skewed data where they make the difference in macro F1."""

from __future__ import annotations

import random

import pytest
import torch

from tests.support.synthetic_data import sentiment_rows, write_csv
from tests.support.trainer_runs import child_env, make_spec, result_of, run_trainer
from trainer.class_weights import WeightedLoss, inverse_frequency


def test_inverse_frequency_weights_have_mean_one_over_the_training_rows():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    weights = inverse_frequency(labels, 3)
    assert weights == pytest.approx([100 / (3 * 90), 100 / (3 * 9), 100 / 3])
    assert sum(weights[y] for y in labels) / len(labels) == pytest.approx(1.0)


def test_a_class_absent_from_training_gets_weight_zero():
    assert inverse_frequency([0, 0, 1, 1], 3) == [1.0, 1.0, 0.0]


def test_weights_apply_while_training_and_not_to_the_evaluation_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    loss = WeightedLoss([0.5, 2.0])
    loss.model = torch.nn.Linear(1, 1)
    plain = torch.nn.functional.cross_entropy(logits, labels)

    loss.model.train()
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    weighted = (per_row * torch.tensor([0.5, 2.0, 2.0])).mean()
    assert loss({"logits": logits}, labels) == pytest.approx(weighted.item())
    # with the accumulated batch's row count (gradient accumulation, several ranks): sum / count
    assert loss({"logits": logits}, labels, num_items_in_batch=6) == pytest.approx(weighted.item() / 2)

    loss.model.eval()
    assert loss({"logits": logits}, labels) == pytest.approx(plain.item())


def _skewed(n_rows: int, positive_share: float, seed: int, prefix: str) -> list[dict[str, str]]:
    rows = sentiment_rows(4 * n_rows, seed, prefix)
    positive = [r for r in rows if r["label"] == "positive"][: int(n_rows * positive_share)]
    negative = [r for r in rows if r["label"] == "negative"][: n_rows - len(positive)]
    skewed = positive + negative
    random.Random(seed).shuffle(skewed)
    return skewed


@pytest.mark.extended
def test_on_skewed_labels_class_weights_raise_macro_f1(tmp_path, tiny_model):
    """4% positives in training: plain cross-entropy is minimised by never saying positive, which
    the balanced-ish validation split (25% positives) punishes in macro F1."""
    train = write_csv(tmp_path / "train.csv", _skewed(600, 0.04, seed=1, prefix="t"))
    validation = write_csv(tmp_path / "validation.csv", _skewed(200, 0.25, seed=2, prefix="v"))
    f1 = {}
    for weights in ("none", "auto"):
        run_dir = tmp_path / weights
        run_dir.mkdir()
        spec = make_spec(run_dir, str(tiny_model), str(train), str(validation), class_weights=weights)
        proc = run_trainer(spec, child_env(run_dir))
        f1[weights] = result_of(proc)["metrics"]["eval_f1_macro"]
        if weights == "auto":
            assert "Class weights (inverse frequency): negative 0.52, positive 12.50" in proc.stderr
    assert f1["auto"] > f1["none"] + 0.2, f1
