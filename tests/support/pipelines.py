"""Pipeline YAML documents for tests that run a whole DAG with the tiny model."""

from __future__ import annotations

from typing import Any


def tiny_pipeline(name: str, model_dir: str, *, description: str, **sections: Any) -> dict[str, Any]:
    """A pipeline over ``tiny/{train,validation}.csv`` under the data root; ``sections`` replace keys."""
    return {
        "name": name,
        "description": description,
        "owner": "tests@example.com",
        "team": "qa",
        "schedule": None,
        "dataset": {
            "train": "tiny/train.csv",
            "validation": "tiny/validation.csv",
            "label_names": ["negative", "positive"],
            "checks": {"min_rows": 100, "min_validation_rows": 20},
        },
        "model": {"base": model_dir, "max_length": 32},
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "checkpoint_every_steps": 10},
        "promotion": {"metric": "eval_accuracy", "min_improvement": 0.0},
        "overridable": ["epochs", "learning_rate", "max_steps"],
        **sections,
    }
