"""Where things live: every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ENVIRONMENT = "local"


def project_root() -> Path:
    """The checkout this package runs from (plugins/trainyard/ -> project root)."""
    return Path(__file__).resolve().parents[2]


def dags_dir() -> Path:
    return Path(os.environ.get("AIRFLOW__CORE__DAGS_FOLDER") or project_root() / "dags")


def pipelines_dir(dags_folder: Path | None = None) -> Path:
    return Path(os.environ.get("TRAINYARD_PIPELINES_DIR") or (dags_folder or dags_dir()) / "pipelines")


def environments_dir(dags_folder: Path | None = None) -> Path:
    return Path(os.environ.get("TRAINYARD_ENVIRONMENTS_DIR") or (dags_folder or dags_dir()) / "environments")


def trainyard_home() -> Path:
    """Project-local state for the embedded default: Airflow and MLflow databases, data, models."""
    return Path(os.environ.get("TRAINYARD_HOME") or project_root() / ".trainyard")


def environment_name() -> str:
    return os.environ.get("TRAINYARD_ENV") or DEFAULT_ENVIRONMENT
