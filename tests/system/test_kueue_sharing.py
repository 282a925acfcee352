"""System test: two teams share two GPUs through Kueue, and prod outranks dev; no run fails.

A real Airflow 3 deployment (api-server, scheduler with LocalExecutor, dag-processor, triggerer;
tests/support/services.py) runs the dev environment ``kq-dev`` with three pipelines: team nlp's
``tweet-sentiment`` and team cv's ``cv-a`` and ``cv-b`` (one DAG allows one active run, so a team
with two runs at once has two pipelines). A prod run of ``tweet-sentiment`` (environment
``kq-prod``) is an ``airflow dags test`` in its own Airflow home against the same cluster,
MLflow and S3. The real KubernetesPodOperator talks to the Kubernetes emulator, which speaks
Kueue (webhook gate, Workloads, admission with borrowing in a cohort, preemption, visibility
API; Kueue's controller itself cannot run here). The Kueue objects are the trainyard-cluster
chart's, rendered from these environment files. Training is the real trainer on a tiny BERT.

The cohort holds two GPUs: dev's nlp queue owns one, prod's nlp queue the other; cv owns none.

1. cv starts two runs while nlp is idle: both borrow, one of them prod's idle GPU.
2. nlp triggers: its GPU is lent out and dev never preempts dev, so the run waits in its queue,
   and its task log says where it stands.
3. prod's nlp submits: prod takes its GPU back from the cv run borrowing it (Kueue preempts it);
   that run queues again and later resumes from its checkpoint.
4. Every run, dev and prod, succeeds; the runs that waited recorded it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from tests.support import services as svc
from tests.support.k8s_emulator import KubernetesEmulator
from tests.support.kueue_cluster import install, render_cluster
from tests.support.paths import DAGS, ROOT
from tests.support.synthetic_data import write_splits
from tests.support.tiny_model import build_tiny_model

pytestmark = [pytest.mark.system, pytest.mark.slow]

DEV, PROD = "kq-dev", "kq-prod"
NAMESPACES = {DEV: "kq-system-dev", PROD: "kq-system-prod"}
PRIORITY = {DEV: "trainyard-kq-dev", PROD: "trainyard-kq-prod"}
#: pipeline -> (team, steps): cv's runs train long enough for prod to arrive while they borrow.
PIPELINES = {"tweet-sentiment": ("nlp", 120), "cv-a": ("cv", 700), "cv-b": ("cv", 700)}
S3_SECRET = "trainyard-system-s3"
IMAGE = "ghcr.io/trainyard/trainer:0.1.0-system"
AWS = {
    "AWS_ACCESS_KEY_ID": "kueuesystemkey",
    "AWS_SECRET_ACCESS_KEY": "kueue-system-secret-value",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKETS = {
    "data": "kq-datasets",
    "models": "kq-models",
    "checkpoints": "kq-checkpoints",
    "mlflow": "kq-mlflow",
}
RUN_TIMEOUT = 420


def _team(gpus: int, name: str) -> dict:
    return {
        "gpus": gpus,
        "cpu": "4",
        "memory": "16Gi",
        "service_account": "trainyard-trainer",
        "credentials_secret": S3_SECRET,
        "storage": {
            "data": [f"s3://{BUCKETS['data']}/{name}/"],
            "models": [f"s3://{BUCKETS['models']}/{name}/"],
        },
    }


def environment_yaml(name: str, mlflow_url: str, s3_url: str) -> dict:
    return {
        "launcher": "kubernetes",
        "airflow": {"schedules_enabled": False, "retries": 0, "execution_timeout_minutes": 10},
        "mlflow": {
            "tracking_uri": mlflow_url,
            "experiment_name": "{environment}/{pipeline}",
            "registered_model_name": "{environment}.{team}.{pipeline}",
        },
        "storage": {
            "data_root": f"s3://{BUCKETS['data']}",
            "models_root": f"s3://{BUCKETS['models']}",
            "checkpoint_root": f"s3://{BUCKETS['checkpoints']}/{name}",
            "s3_endpoint_url": s3_url,
        },
        "kubernetes": {
            "namespace": NAMESPACES[name],
            "image": IMAGE,
            "service_account": "trainyard-trainer",
            "priority_class": PRIORITY[name],
            "scheduling": "kueue",
            "kueue": {"status_interval_seconds": 2},
            "max_queue_wait_minutes": 8,
            "gpu_types": {"tiny": {"node_labels": {"trainyard.io/test-gpu": "tiny"}}},
            "caps": {"gpus": 1, "cpu": "2", "memory": "4Gi", "shm_size": "256Mi"},
            "startup_timeout_seconds": 30,
            "termination_grace_period_seconds": 20,
            "deferrable": name == DEV,  # the dev deployment waits in the triggerer, prod's dags test in sync
            "on_finish_action": "delete_pod",
        },
        "teams": {"nlp": _team(1, "nlp"), "cv": _team(0, "cv")},
    }


def pipeline_yaml(name: str, team: str, steps: int) -> dict:
    """The real tweet-sentiment pipeline, resized: tiny BERT, ``steps`` steps on CPU."""
    config = yaml.safe_load((DAGS / "pipelines" / "tweet-sentiment.yaml").read_text())
    config.update({"name": name, "team": team})
    config["dataset"].update(
        {"train": f"{team}/tweets/train.csv", "validation": f"{team}/tweets/validation.csv"}
    )
    config["model"] = {"base": f"{team}/tiny-bert", "max_length": 32}
    config["training"].update(
        {
            "batch_size": 16,
            "max_steps": steps,
            "checkpoint_every_steps": 20,
            "warmup_ratio": 0.0,
            "epochs": 20,
        }
    )
    config["resources"] = {"gpus": 1, "cpu": "1", "memory": "2Gi", "shm_size": "64Mi"}
    config["promotion"] = {"metric": "eval_accuracy", "min_improvement": 0.0, "alias": "champion"}
    config.pop("environments", None)
    return config


@dataclass
class Stack:
    services: svc.Services
    k8s: KubernetesEmulator
    api_url: str
    airflow_env: dict[str, str]
    prod_env: dict[str, str]
    mlflow_url: str
    runs: dict[str, str] = field(default_factory=dict)

    def get(self, path: str) -> dict:
        response = requests.get(f"{self.api_url}/api/v2{path}", timeout=15)
        response.raise_for_status()
        return response.json()

    def trigger(self, dag_id: str) -> str:
        run_id = f"kq-{dag_id}-{uuid.uuid4().hex[:6]}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": {}}
        response = requests.post(f"{self.api_url}/api/v2/dags/{dag_id}/dagRuns", json=body, timeout=30)
        assert response.status_code == 200, response.text
        self.runs[run_id] = dag_id
        return run_id

    def state(self, run_id: str) -> str:
        return self.get(f"/dags/{self.runs[run_id]}/dagRuns/{run_id}")["state"]

    def task_log(self, run_id: str, task_id: str = "train") -> str:
        root = Path(self.airflow_env["AIRFLOW_HOME"]) / "logs"
        paths = sorted(root.glob(f"dag_id={self.runs[run_id]}/run_id={run_id}/task_id={task_id}/*.log"))
        return "\n".join(path.read_text(errors="replace") for path in paths)

    def train_pods(self, environment: str, dag_id: str | None = None) -> list[dict]:
        pods = self.k8s.pods(NAMESPACES[environment])
        return [
            p
            for p in pods
            if dag_id is None or p["metadata"]["labels"].get("trainyard.io/pipeline") == dag_id
        ]

    def wait(self, what: str, condition, timeout: float = 180):
        return self.services.wait_until(what, condition, timeout, watch=svc.AIRFLOW_COMPONENTS, interval=1)


def _running(pod: dict) -> bool:
    return pod["status"].get("phase") == "Running"


def _gated(pod: dict) -> bool:
    return any(g["name"] == "kueue.x-k8s.io/admission" for g in pod["spec"].get("schedulingGates") or [])


def _write_inputs(s3_url: str, scratch: Path) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS["AWS_DEFAULT_REGION"],
    )
    for bucket in BUCKETS.values():
        s3.create_bucket(Bucket=bucket)
    data_dir = scratch / "tweets"
    write_splits(data_dir, train_rows=1000, validation_rows=200)
    model_dir = build_tiny_model(scratch / "tiny-bert")
    for team in ("nlp", "cv"):  # each team reads only under its own prefix
        for path in sorted(data_dir.iterdir()):
            s3.upload_file(str(path), BUCKETS["data"], f"{team}/tweets/{path.name}")
        for path in sorted(model_dir.iterdir()):
            s3.upload_file(str(path), BUCKETS["models"], f"{team}/tiny-bert/{path.name}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("kueue-system")
    with KubernetesEmulator() as k8s, svc.Services(base / "logs") as services:
        try:
            yield _start(base, services, k8s)
        except BaseException:
            print(services.report(60))
            raise


def _start(base: Path, services: svc.Services, k8s: KubernetesEmulator) -> Stack:
    s3_url = svc.start_moto(services, svc.free_port(), svc.clean_env())
    _write_inputs(s3_url, base / "inputs")
    mlflow_url = svc.start_mlflow(
        services,
        svc.free_port(),
        base / "mlflow.db",
        f"s3://{BUCKETS['mlflow']}/mlflow",
        svc.clean_env({"MLFLOW_S3_ENDPOINT_URL": s3_url, **AWS}),
    )
    environments = base / "environments"
    shutil.copytree(DAGS / "environments", environments)
    texts = {}
    for name in (DEV, PROD):
        texts[name] = yaml.safe_dump(environment_yaml(name, mlflow_url, s3_url), sort_keys=False)
        (environments / f"{name}.yaml").write_text(texts[name])
    installed = install(k8s, render_cluster({DEV: (texts[DEV], "dev"), PROD: (texts[PROD], "prod")}))
    assert installed["ClusterQueue"] == 4 and installed["LocalQueue"] == 4, installed
    for namespace in NAMESPACES.values():
        k8s.add_secret(namespace, S3_SECRET, {**AWS, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    kubeconfig = k8s.write_kubeconfig(base / "kube" / "config")

    pipelines = base / "pipelines"
    pipelines.mkdir()
    for name, (team, steps) in PIPELINES.items():
        document = pipeline_yaml(name, team, steps)
        (pipelines / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    shared = {
        "TRAINYARD_ENVIRONMENTS_DIR": str(environments),
        "TRAINYARD_PIPELINES_DIR": str(pipelines),
        "TRAINYARD_HOME": str(base / "trainyard-home"),
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": svc.kubernetes_connection(kubeconfig),
        **AWS,
    }
    api_port = svc.free_port()
    env = svc.airflow_env(base / "airflow", api_port, {"TRAINYARD_ENV": DEV, **shared})
    # Prod's run is an `airflow dags test` with its own metadata DB: one deployment, one TRAINYARD_ENV.
    prod_env = svc.airflow_env(base / "airflow-prod", svc.free_port(), {"TRAINYARD_ENV": PROD, **shared})
    svc.migrate_airflow_db(env)
    svc.migrate_airflow_db(prod_env)
    api_url = f"http://127.0.0.1:{api_port}"
    svc.start_airflow(services, env, api_port)
    services.wait_http("api-server", f"{api_url}/api/v2/monitor/health", timeout=120)
    svc.wait_airflow_healthy(services, api_url)
    stack = Stack(services, k8s, api_url, env, prod_env, mlflow_url)

    def serialized() -> bool:
        dags = {d["dag_id"] for d in stack.get("/dags")["dags"]}
        return set(PIPELINES) <= dags

    stack.wait("the three DAGs", serialized, 180)
    for dag_id in PIPELINES:
        svc.airflow_cli(env, "dags", "unpause", dag_id)
    return stack


def test_two_teams_share_two_gpus_queue_borrow_and_prod_reclaims_without_a_failure(stack: Stack):
    # 1. cv borrows both idle GPUs.
    cv_runs = [stack.trigger("cv-a"), stack.trigger("cv-b")]
    stack.wait("both cv runs training", lambda: sum(map(_running, stack.train_pods(DEV))) == 2, 240)

    # 3 starts now (an `airflow dags test` takes a while to reach its train task): prod submits and
    # takes back the GPU a cv run borrowed from it; that run queues again.
    prod_log = Path(stack.prod_env["AIRFLOW_HOME"]) / "prod-run.log"
    with prod_log.open("wb") as log:
        prod = subprocess.Popen(
            [sys.executable, "-m", "airflow", "dags", "test", "tweet-sentiment"],
            env=stack.prod_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # 2. nlp's own GPU is lent out: its run waits in the queue and says where it stands.
    nlp_run = stack.trigger("tweet-sentiment")
    stack.wait(
        "nlp's run waiting for quota",
        lambda: "waiting for GPU quota in nlp (ClusterQueue trainyard-kq-dev-nlp)" in stack.task_log(nlp_run),
        240,
    )
    waiting = next(line for line in stack.task_log(nlp_run).splitlines() if "waiting for GPU quota" in line)
    assert "position 1 in the team queue" in waiting, waiting
    assert "insufficient unused quota for nvidia.com/gpu in flavor trainyard-tiny" in waiting, waiting
    assert stack.state(nlp_run) == "running", "a queued run is a running DAG run, not a failed one"

    # 3. prod's run, without waiting for dev's: it preempted a borrower.
    try:
        code = prod.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        prod.kill()
        raise
    prod_output = prod_log.read_text(errors="replace")
    assert code == 0, prod_output[-5000:]
    assert "waiting for GPU quota" not in prod_output or "admitted by Kueue" in prod_output

    # 4. Every dev run finishes, successfully.
    def all_done() -> bool:
        return all(stack.state(r) in ("success", "failed") for r in [*cv_runs, nlp_run])

    stack.wait("every dev run to finish", all_done, RUN_TIMEOUT)
    states = {r: stack.state(r) for r in [*cv_runs, nlp_run]}
    assert set(states.values()) == {"success"}, {r: (s, stack.task_log(r)[-3000:]) for r, s in states.items()}

    preempted = [
        r for r in cv_runs if "was preempted by Kueue (WorkloadEvictedDueToPreempted)" in stack.task_log(r)
    ]
    assert len(preempted) == 1, "prod reclaimed exactly the GPU a cv run had borrowed from it"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_url)
    dag_id = stack.runs[preempted[0]]
    experiment = client.get_experiment_by_name(f"{DEV}/{dag_id}")
    (run,) = client.search_runs([experiment.experiment_id])
    assert int(run.data.tags["trainyard.resumed_from_step"]) > 0, "the preempted run resumed"
    assert json.loads(run.data.tags["trainyard.queue.detail"]), "its second wait was recorded"
    nlp_experiment = client.get_experiment_by_name(f"{DEV}/tweet-sentiment")
    (nlp_mlflow,) = client.search_runs([nlp_experiment.experiment_id])
    assert float(nlp_mlflow.data.tags["trainyard.queue.wait_seconds"]) > 0
    assert nlp_mlflow.data.tags["trainyard.queue.first_position_in_local_queue"] == "1"
