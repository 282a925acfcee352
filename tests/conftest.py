"""Shared test setup: an isolated Airflow home, offline Hugging Face, and YAML fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.paths import DAGS, ROOT

# Airflow reads its configuration when first imported: point it at a throwaway home first.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="trainyard-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)  # never the developer's (or `make demo`'s) Airflow
os.environ["TRAINYARD_HOME"] = str(_AIRFLOW_HOME / "trainyard-home")
os.environ["TRAINYARD_CACHE_DIR"] = str(_AIRFLOW_HOME / "trainyard-cache")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("TRAINYARD_ENV", "TRAINYARD_PIPELINES_DIR", "TRAINYARD_ENVIRONMENTS_DIR"):
    os.environ.pop(_var, None)


@pytest.fixture
def config_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Copies of the real pipelines/ and environments/ that a test may edit or break."""
    pipelines = tmp_path / "pipelines"
    environments = tmp_path / "environments"
    shutil.copytree(DAGS / "pipelines", pipelines)
    shutil.copytree(DAGS / "environments", environments)
    monkeypatch.setenv("TRAINYARD_PIPELINES_DIR", str(pipelines))
    monkeypatch.setenv("TRAINYARD_ENVIRONMENTS_DIR", str(environments))
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    return pipelines, environments


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite) in the session's Airflow home."""
    import subprocess
    import sys

    home = Path(os.environ["AIRFLOW_HOME"])
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
        env={**os.environ},
    )
    return home / "airflow.db"
