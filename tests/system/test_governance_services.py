"""System test: human approval and dataset-triggered runs on real Airflow services.

What runs, each as its own process on 127.0.0.1 (LocalExecutor, SQLite, simple auth with every
user an admin): ``airflow api-server`` (REST API, Human-in-the-loop responses), ``scheduler`` (runs
the tasks, resolves HITL timeouts, turns asset events into DAG runs) and ``dag-processor``. No
triggerer: on Airflow 3.3 a HITL task waits in ``awaiting_input`` without one. Plus a real SMTP
server (aiosmtpd) that the environment's notifications point at. The trainer is the real one, with
the tiny BERT built by the tests (local launcher).

Pipelines, each fresh (no champion, so its first candidate is "better" and asks for approval):
``approve-me`` (a person approves), ``reject-me`` (a person rejects), ``time-me-out`` (nobody
answers within its 0.005 h) and ``on-new-data`` (``schedule: {on_dataset_update: true}``).
"""

from __future__ import annotations

import html
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.support import services as svc
from tests.support.paths import DAGS
from tests.support.pipelines import tiny_pipeline
from tests.support.smtp import SmtpSink
from tests.support.synthetic_data import write_splits
from tests.support.tiny_model import build_tiny_model

pytestmark = [pytest.mark.system, pytest.mark.slow]

ENVIRONMENT = "governance"
REPARSE_SECONDS = 5
RUN_TIMEOUT = 600
APPROVAL = {"required": True, "timeout_hours": 2}


def environment_yaml(base: Path) -> dict:
    return {
        "launcher": "local",
        "airflow": {"schedules_enabled": True, "retries": 0},
        "mlflow": {
            "tracking_uri": f"sqlite:///{base / 'mlflow.db'}",
            "artifact_location": str(base / "mlruns"),
        },
        "storage": {
            "data_root": f"{base}/data",
            "models_root": f"{base}/models",
            "checkpoint_root": f"{base}/checkpoints",
        },
        "notifications": {"email": {"connection_id": "smtp_test", "from_email": "trainyard@example.com"}},
    }


def pipelines(base: Path) -> dict[str, dict]:
    def approval(**policy: Any) -> dict:
        return {"promotion": {"metric": "eval_accuracy", "approval": {**APPROVAL, **policy}}}

    return {
        "approve-me": tiny_pipeline("approve-me", "tiny-bert", description="approved", **approval()),
        "reject-me": tiny_pipeline("reject-me", "tiny-bert", description="rejected", **approval()),
        "time-me-out": tiny_pipeline(
            "time-me-out", "tiny-bert", description="timeout", **approval(timeout_hours=0.005)
        ),
        "on-new-data": tiny_pipeline(
            "on-new-data",
            "tiny-bert",
            description="retrained when the data changes",
            schedule={"on_dataset_update": True},
            dataset={
                "train": "fresh/train.csv",
                "validation": "fresh/validation.csv",
                "label_names": ["negative", "positive"],
                "checks": {"min_rows": 100, "min_validation_rows": 20},
            },
        ),
    }


@dataclass
class Stack:
    services: svc.Services
    api_url: str
    base: Path
    smtp: SmtpSink

    def call(self, method: str, path: str, **kwargs: Any) -> dict:
        response = requests.request(method, f"{self.api_url}/api/v2{path}", timeout=30, **kwargs)
        assert response.status_code in (200, 201), (
            f"{method} {path}: {response.status_code} {response.text[:800]}"
        )
        return response.json()

    def trigger(self, dag_id: str) -> str:
        return self.call("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None})["dag_run_id"]

    def task_state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        """None until the task instance exists."""
        url = f"{self.api_url}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        response = requests.get(url, timeout=30)
        return response.json()["state"] if response.status_code == 200 else None

    def wait_task(self, dag_id: str, run_id: str, task_id: str, states: set[str]) -> str:
        return self.services.wait_until(
            f"{dag_id}/{run_id}/{task_id} in {sorted(states)}",
            lambda: (s := self.task_state(dag_id, run_id, task_id)) in states and s,
            timeout=RUN_TIMEOUT,
            watch=["api-server", "scheduler", "dag-processor"],
            interval=2,
        )

    def wait_run(self, dag_id: str, run_id: str) -> dict:
        return self.services.wait_until(
            f"{dag_id}/{run_id} finished",
            lambda: (
                (r := self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}"))["state"] in ("success", "failed")
                and r
            ),
            timeout=RUN_TIMEOUT,
            watch=["api-server", "scheduler", "dag-processor"],
            interval=2,
        )

    def explain(self, dag_id: str, run_id: str) -> str:
        """Task states and the tail of each task's log: what a failed assertion shows."""
        tis = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        parts = [", ".join(f"{ti['task_id']}={ti['state']}" for ti in tis)]
        root = self.base / "airflow" / "logs" / f"dag_id={dag_id}"
        for path in sorted(root.glob("run_id=*/task_id=*/*.log")):
            if run_id in str(path):
                parts += [f"----- {path.relative_to(root)}", svc.tail(path, 15)]
        return "\n".join(parts)

    def wait_parked(self, dag_id: str, run_id: str, task_id: str = "approve") -> None:
        """Wait until the task is in awaiting_input and the scheduler has seen its worker exit.

        Airflow 3.3 races here: the worker that parks the task exits with success, and if an answer
        re-queues the task before the scheduler has processed that exit, the scheduler takes the
        stale event for the new attempt ("state mismatch") and fails the task. A person answers
        minutes later; a test answers within a second, so it waits for the scheduler's
        "TaskInstance Finished" line for the parked attempt first.
        """
        self.wait_task(dag_id, run_id, task_id, {"awaiting_input"})
        log = self.services.started["scheduler"].log_path
        line = f"TaskInstance Finished: dag_id={dag_id}, task_id={task_id}, run_id={run_id},"
        self.services.wait_until(
            f"the scheduler to process the exit of {dag_id}/{run_id}/{task_id}",
            lambda: any(
                line in row and ", state=awaiting_input," in row
                for row in log.read_text(errors="replace").splitlines()
            ),
            timeout=120,
            watch=["scheduler"],
            interval=1,
        )

    def answer(self, dag_id: str, run_id: str, option: str, comment: str) -> dict:
        return self.call(
            "PATCH",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails",
            json={"chosen_options": [option], "params_input": {"comment": comment}},
        )

    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=f"sqlite:///{self.base / 'mlflow.db'}")

    def version_of(self, dag_id: str, run_id: str):
        client = self.mlflow()
        experiment = client.get_experiment_by_name(dag_id)
        (run,) = [
            r
            for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("airflow.run_id") == run_id and "trainyard.outcome" not in r.data.tags
        ]
        (version,) = client.search_model_versions(f"name = '{dag_id}' and run_id = '{run.info.run_id}'")
        return version

    def alias_holder(self, dag_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.mlflow().get_model_version_by_alias(dag_id, "champion").version)
        except MlflowException:
            return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("governance")
    with SmtpSink() as smtp, svc.Services(base / "logs") as services:
        try:
            yield _start(base, services, smtp)
        except BaseException:
            print(services.report(80))
            raise


def _start(base: Path, services: svc.Services, smtp: SmtpSink) -> Stack:
    write_splits(base / "data" / "tiny", train_rows=320, validation_rows=80)
    write_splits(base / "data" / "fresh", train_rows=320, validation_rows=80)
    build_tiny_model(base / "models" / "tiny-bert")
    # Create the MLflow tables now: three runs start at once, and SQLite lets only one create them.
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}").search_experiments()
    environments = base / "environments"
    shutil.copytree(DAGS / "environments", environments)
    (environments / f"{ENVIRONMENT}.yaml").write_text(yaml.safe_dump(environment_yaml(base), sort_keys=False))
    folder = base / "pipelines"
    folder.mkdir()
    for name, document in pipelines(base).items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    api_port = svc.free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = svc.airflow_env(
        base / "airflow",
        api_port,
        {
            "TRAINYARD_ENV": ENVIRONMENT,
            "TRAINYARD_ENVIRONMENTS_DIR": str(environments),
            "TRAINYARD_PIPELINES_DIR": str(folder),
            "TRAINYARD_HOME": str(base / "trainyard-home"),
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(REPARSE_SECONDS),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW_CONN_SMTP_TEST": smtp.connection(),
            # Lets tasks write the DAG run's note (simple auth, every user an admin: no login).
            "AIRFLOW_CONN_TRAINYARD_AIRFLOW_API": json.dumps({"conn_type": "http", "host": api_url}),
            "HF_HUB_OFFLINE": "1",
        },
    )
    svc.migrate_airflow_db(env)
    components = ["api-server", "scheduler", "dag-processor"]
    svc.start_airflow(services, env, api_port, components=components)
    svc.wait_airflow_healthy(services, api_url, components, timeout=180)
    stack = Stack(services, api_url, base, smtp)
    services.wait_until(
        "the pipelines' DAGs",
        lambda: {d["dag_id"] for d in stack.call("GET", "/dags")["dags"]} >= set(pipelines(base)),
        timeout=180,
        watch=components,
        interval=2,
    )
    return stack


def _mails(stack: Stack, subject_part: str, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in stack.smtp.messages if subject_part in str(m.message["Subject"])]
        if found:
            return found
        time.sleep(1)
    subjects = [str(m.message["Subject"]) for m in stack.smtp.messages]
    raise AssertionError(f"no mail with {subject_part!r} in its subject; got {subjects}")


def test_approve_reject_and_timeout_on_real_services(stack):
    runs = {name: stack.trigger(name) for name in ("approve-me", "reject-me", "time-me-out")}
    for name in ("approve-me", "reject-me"):
        stack.wait_parked(name, runs[name])
    stack.wait_task("time-me-out", runs["time-me-out"], "approve", {"awaiting_input", "success", "failed"})
    for name in runs:
        assert stack.alias_holder(name) is None, "nothing moves while a person is asked"

    page = html.unescape(_mails(stack, "approve-me: approval waiting")[0].body)
    assert "waits for approval to become 'champion'" in page and "eval_accuracy" in page

    approved = stack.answer("approve-me", runs["approve-me"], "Approve", "confusion matrix looks right")
    rejected = stack.answer("reject-me", runs["reject-me"], "Reject", "not before the launch")
    for name, run_id in runs.items():
        assert stack.wait_run(name, run_id)["state"] == "success", stack.explain(name, run_id)

    version = stack.version_of("approve-me", runs["approve-me"])
    assert stack.alias_holder("approve-me") == str(version.version)
    assert version.tags["trainyard.decision"] == "promoted"
    assert version.tags["trainyard.approval.state"] == "approved"
    assert version.tags["trainyard.approval.by"] == approved["responded_by"]["name"]
    assert version.tags["trainyard.approval.comment"] == "confusion matrix looks right"
    _mails(stack, "approve-me: model promoted")

    version = stack.version_of("reject-me", runs["reject-me"])
    assert stack.alias_holder("reject-me") is None
    assert version.tags["trainyard.decision"] == "rejected"
    assert version.tags["trainyard.approval.state"] == "rejected"
    assert version.tags["trainyard.approval.by"] == rejected["responded_by"]["name"]
    assert "not before the launch" in version.tags["trainyard.reason"]
    _mails(stack, "reject-me: candidate rejected")

    version = stack.version_of("time-me-out", runs["time-me-out"])
    assert stack.alias_holder("time-me-out") is None
    assert version.tags["trainyard.approval.state"] == "timed_out"
    assert "approval timed out" in version.tags["trainyard.reason"]


def test_an_asset_event_triggers_a_run_and_unchanged_bytes_do_not_retrain(stack):
    listed = stack.call("GET", "/assets", params={"uri_pattern": "fresh"})["assets"]
    (asset,) = [a for a in listed if a["uri"].endswith("/data/fresh/train.csv")]
    assert asset["uri"].startswith("file://")

    def event_run(seen: set[str]) -> str:
        stack.call("POST", "/assets/events", json={"asset_id": asset["id"], "extra": {"producer": "test"}})

        def new_run() -> str | None:
            listed = stack.call("GET", "/dags/on-new-data/dagRuns")["dag_runs"]
            fresh = [r for r in listed if r["dag_run_id"] not in seen and r["run_type"] == "asset_triggered"]
            return fresh[0]["dag_run_id"] if fresh else None

        return stack.services.wait_until("an asset-triggered run", new_run, timeout=180, interval=2)

    first = event_run(set())
    assert stack.wait_run("on-new-data", first)["state"] == "success", stack.explain("on-new-data", first)
    assert stack.task_state("on-new-data", first, "train") == "success"
    assert stack.alias_holder("on-new-data") is not None

    second = event_run({first})
    assert stack.wait_run("on-new-data", second)["state"] == "success", stack.explain("on-new-data", second)
    assert stack.task_state("on-new-data", second, "train") == "skipped", "same bytes: nothing to retrain"
    note = stack.call("GET", f"/dags/on-new-data/dagRuns/{second}")["note"]
    assert note.startswith(f"Skipped: identical inputs to run {first}"), note
    _mails(stack, "on-new-data: run skipped")


def test_the_trigger_form_offers_force_retrain(stack):
    """The form the UI's Trigger button opens is rendered from the DAG's params as the API serves them."""
    params = stack.call("GET", "/dags/approve-me/details")["params"]
    assert params["force_retrain"]["value"] is False
    assert params["force_retrain"]["schema"]["type"] == "boolean"
    assert "identical inputs" in params["force_retrain"]["description"]
