"""A temporary DAG folder that ``dag.test()`` in this process reads, for tests that write DAG files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest


def dag_bundle_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """Yield an empty folder configured as the only DAG bundle while the caller's fixture lives.

    An explicit bundle, not DAGS_FOLDER: Airflow freezes settings.DAGS_FOLDER at first import,
    while DagBundlesManager reads this option afresh each time dag.test() syncs bundles.
    """
    folder = tmp_path_factory.mktemp(f"{name}-dags")
    bundle = {
        "name": name,
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(folder), "refresh_interval": 0},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([bundle]))
        yield folder
