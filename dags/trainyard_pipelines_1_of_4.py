"""Airflow DAG file: the Trainyard pipelines whose names hash to this file (see trainyard.loader_files).

The provider import lets the dag-processor import it once, before it forks a parser per file.
"""

import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401

from trainyard.dag import build_loader_dags

globals().update(build_loader_dags(__file__))
