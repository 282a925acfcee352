"""The DAG run's note: the line people read first in the Airflow UI's run list ("Skipped: ...").

Airflow 3's task SDK can read a run's note but not write it, and the ORM is blocked in task
processes run by a worker. So the note is written through the public REST API (``PATCH
/api/v2/dags/{dag_id}/dagRuns/{run_id}``) with the credentials of the Airflow connection
``trainyard_airflow_api`` (an ``http`` connection: host = the api-server's URL, login/password of
a user that may edit the DAG's runs). Where a task runs in the process that owns the metadata
database (``airflow dags test``, as ``make demo`` runs), the ORM is used directly. Without either
the note is skipped with a warning: it is a convenience, and the task log has the same line.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

API_CONNECTION_ID = "trainyard_airflow_api"
#: Airflow caps a DAG run note at 1,000 characters.
MAX_NOTE_CHARS = 1000
TIMEOUT_S = 10


def set_run_note(context: Any, note: str) -> bool:
    """Set the note of the context's DAG run; True when it was written. Never raises."""
    dag_run = context["dag_run"]
    note = note[:MAX_NOTE_CHARS]
    try:
        if _through_api(dag_run.dag_id, dag_run.run_id, note):
            return True
        return _through_orm(dag_run.dag_id, dag_run.run_id, note)
    except Exception as exc:  # the note must never fail the task
        log.warning("could not set the note of DAG run %s: %s", dag_run.run_id, exc)
        return False


def _api_connection() -> Any | None:
    from airflow.sdk import Connection

    try:
        return Connection.get(API_CONNECTION_ID)
    except Exception:  # not defined (the task SDK and the in-process runner raise different errors)
        return None


def _through_api(dag_id: str, run_id: str, note: str) -> bool:
    import requests

    connection = _api_connection()
    if connection is None or not connection.host:
        return False
    base = connection.host.rstrip("/")
    if "://" not in base:
        base = f"http://{base}" + (f":{connection.port}" if connection.port else "")
    headers = {}
    if connection.login:
        token = requests.post(
            f"{base}/auth/token",
            json={"username": connection.login, "password": connection.password or ""},
            timeout=TIMEOUT_S,
        )
        token.raise_for_status()
        headers["Authorization"] = f"Bearer {token.json()['access_token']}"
    quote = requests.utils.quote
    response = requests.patch(
        f"{base}/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}",
        params={"update_mask": "note"},
        json={"note": note},
        headers=headers,
        timeout=TIMEOUT_S,
    )
    response.raise_for_status()
    return True


def _through_orm(dag_id: str, run_id: str, note: str) -> bool:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    try:
        with create_session() as session:
            run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
            if run is None:
                return False
            run.note = note
    except RuntimeError as exc:  # a worker's task process: no database access
        log.warning(
            "DAG run note not set (%s): define the Airflow connection %s to let tasks write notes",
            exc,
            API_CONNECTION_ID,
        )
        return False
    return True
