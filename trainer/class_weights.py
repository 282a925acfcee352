"""Class weights for skewed labels: ``training.class_weights: auto`` weights each class's loss by
its inverse frequency in the training split, so that a class with 2% of the rows is not simply
never predicted (plain cross-entropy is minimised by ignoring it, which macro F1 punishes).

The weights are normalised so that the mean weight over the training rows is 1: the loss keeps the
scale of the unweighted one, and so does the learning rate that suits it. They apply to training
only; the evaluation loss stays the plain cross-entropy, comparable with the champion's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def inverse_frequency(label_ids: Sequence[int], n_classes: int) -> list[float]:
    """``n / (k * count_c)`` per class; a class absent from the training split gets weight 0 (no row
    of it can contribute to the loss anyway, and a huge weight would only surprise)."""
    counts = [0] * n_classes
    for label in label_ids:
        counts[label] += 1
    present = sum(1 for c in counts if c)
    total = len(label_ids)
    return [total / (present * c) if c else 0.0 for c in counts]


class WeightedLoss:
    """A ``compute_loss_func`` for the HF Trainer: class-weighted cross-entropy while the model
    trains, the plain one while it evaluates. ``model`` is set once the Trainer holds it.

    The Trainer passes ``num_items_in_batch``, the labelled rows of this rank's accumulated batch
    (``average_tokens_across_devices`` is off): the sum divided by it is this rank's mean over the
    accumulated batch, already scaled for gradient accumulation; DDP averages the ranks.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = list(weights)
        self.model = None
        self._tensor = None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch.nn.functional as F

        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits.float()
        training = self.model is None or self.model.training
        weight = None
        if training:
            if self._tensor is None or self._tensor.device != logits.device:
                import torch

                self._tensor = torch.tensor(self.weights, dtype=torch.float32, device=logits.device)
            weight = self._tensor[labels]
        losses = F.cross_entropy(logits, labels, reduction="none")
        if weight is not None:
            losses = losses * weight
        if num_items_in_batch is not None:
            return losses.sum() / num_items_in_batch
        return losses.mean()


def describe(weights: Sequence[float], label_names: Sequence[str]) -> str:
    return ", ".join(f"{name} {w:.2f}" for name, w in zip(label_names, weights, strict=True))
