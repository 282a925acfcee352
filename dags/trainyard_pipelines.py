"""Airflow DAG file: one DAG per ``dags/pipelines/*.yaml``, built by ``trainyard.dag_factory``.

This file only wires; see plugins/trainyard/ for the logic and README.md for the YAML reference.
"""

from pathlib import Path

from trainyard.dag_factory import build_dags

globals().update(build_dags(Path(__file__).parent))
