"""A Kubernetes emulator, moto S3 and a tiny model for ``airflow dags test`` runs of a training pod.

Each scenario is an environment file (its name) with its own namespace, so pods and API requests
are counted per scenario; the files sit in a temporary ``TRAINYARD_ENVIRONMENTS_DIR`` next to
copies of the real local/dev/prod files. The emulator runs in the test's process and executes
each pod's ``python -m trainer ...`` as a local process, so the trainer, its checkpoints and MLflow
(SQLite) are real; ``airflow dags test`` runs in the background, so a test can act during a run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.k8s_emulator import KubernetesEmulator
from tests.support.paths import DAGS, ROOT
from tests.support.pipelines import tiny_pipeline
from tests.support.s3 import CREDENTIALS, MotoS3
from tests.support.synthetic_data import write_splits
from tests.support.tiny_model import build_tiny_model

PIPELINE = "tiny-k8s"
PRIORITY_CLASS = "trainyard-test-low"
IMAGE = "ghcr.io/trainyard/trainer:0.1.0-test"
SECRET_VALUE = "tySecr3t-7c4e9a1f0b2d-never-in-specs-logs-or-mlflow"
S3_SECRET = "trainyard-test-s3"
MLFLOW_SECRET = "trainyard-test-mlflow"
STARTUP_TIMEOUT = 300
RUN_TIMEOUT = 300
BUCKET = "trainyard-k8s"


def pipeline_yaml(model_dir: str, **training: Any) -> dict:
    return tiny_pipeline(
        PIPELINE,
        model_dir,
        description="Tiny BERT on synthetic sentiment, trained in an emulated Kubernetes pod.",
        training={
            "epochs": 1,
            "max_steps": 200,
            "batch_size": 16,
            "learning_rate": 1e-3,
            "checkpoint_every_steps": 10,
            **training,
        },
        # The emulator admits extended resources (no scheduling against node capacity), so ask for a
        # GPU like a real pipeline; the trainer falls back to fp32 on CPU.
        resources={"gpus": 1, "cpu": "1", "memory": "2Gi", "shm_size": "256Mi"},
    )


def environment_yaml(home: Path, namespace: str, s3_endpoint: str, **kubernetes: Any) -> dict:
    airflow = {
        "execution_timeout_minutes": kubernetes.pop("execution_timeout_minutes", 10),
        "retries": kubernetes.pop("retries", 0),
    }
    models_root = kubernetes.pop("models_root", f"s3://{BUCKET}/models")
    teams = kubernetes.pop("teams", None)
    document = {
        "launcher": "kubernetes",
        "airflow": {"schedules_enabled": False, "retry_delay_minutes": 0, **airflow},
        "mlflow": {
            "tracking_uri": f"sqlite:///{home}/mlflow.db",
            "artifact_location": str(home / "mlartifacts"),
            "experiment_name": "{environment}/{pipeline}",
            "registered_model_name": "{environment}.{pipeline}",
        },
        "storage": {
            # Data and models in object storage (moto), as pods need; the emulator's pods share this
            # machine's disk, so checkpoints can stay local and be inspected by the tests.
            "data_root": f"s3://{BUCKET}/data",
            "models_root": models_root,
            "checkpoint_root": str(home / "checkpoints"),
            "s3_endpoint_url": s3_endpoint,
        },
        "kubernetes": {
            "namespace": namespace,
            "image": IMAGE,
            "service_account": "trainyard-trainer",
            "priority_class": PRIORITY_CLASS,
            "secrets": {
                "env_from": [S3_SECRET],
                # As an environment without teams would map its MLflow user (the shipped YAML has
                # teams: their credentials Secret carries it); the tracking URI here is sqlite.
                "env": {
                    "MLFLOW_TRACKING_USERNAME": {"secret": MLFLOW_SECRET, "key": "username"},
                    "MLFLOW_TRACKING_PASSWORD": {"secret": MLFLOW_SECRET, "key": "password"},
                },
            },
            "caps": {"gpus": 1, "cpu": "2", "memory": "4Gi", "shm_size": "1Gi"},
            "startup_timeout_seconds": STARTUP_TIMEOUT,
            "termination_grace_period_seconds": 10,
            "max_preemption_relaunches": 2,
            "deferrable": False,
            "on_finish_action": "keep_pod",  # the tests read the pods' labels and logs afterwards
            **kubernetes,
        },
    }
    if teams is not None:
        # Teams bring their own ServiceAccount and credentials Secret (the shared env_from is refused).
        document["teams"] = {
            name: {"service_account": "trainyard-trainer", "credentials_secret": S3_SECRET, **team}
            for name, team in teams.items()
        }
        del document["kubernetes"]["secrets"]["env_from"]
    return document


def kueue_team(**quota: Any) -> dict[str, Any]:
    """The tiny pipeline's team ``qa`` with a GPU quota, reading only this cluster's buckets."""
    return {
        "qa": {
            "cpu": "8",
            "memory": "16Gi",
            "storage": {"data": [f"s3://{BUCKET}/data/"], "models": [f"s3://{BUCKET}/models/"]},
            **quota,
        }
    }


KUEUE_GPU_TYPES = {"tiny": {"node_labels": {"trainyard.io/test-gpu": "tiny"}}}


@dataclass
class Cluster:
    emulator: KubernetesEmulator
    env: dict[str, str]
    home: Path
    outputs: list[str] = field(default_factory=list)  # every `airflow dags test` output

    def posts(self, namespace: str) -> int:
        return sum(
            1
            for method, path in self.emulator.requests_log
            if method == "POST" and path.split("?")[0] == f"/api/v1/namespaces/{namespace}/pods"
        )

    def deletes(self, namespace: str) -> list[str]:
        prefix = f"/api/v1/namespaces/{namespace}/pods/"
        return [path for method, path in self.emulator.requests_log if method == "DELETE" and prefix in path]

    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=f"sqlite:///{self.home}/mlflow.db")

    def runs(self, environment: str) -> list:
        client = self.mlflow()
        experiment = client.get_experiment_by_name(f"{environment}/{PIPELINE}")
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id])

    def checkpoints(self) -> list[Path]:
        return sorted((self.home / "checkpoints" / PIPELINE).glob("*/*/checkpoint-*/trainer_state.json"))

    def start(self, environment: str, conf: dict | None = None, *, force_retrain: bool = True) -> DagTest:
        """``airflow dags test`` of the pipeline in ``environment``. Forced to train by default: these
        tests run the same inputs many times to watch the pod, and a repeat would be skipped as
        unchanged (the skip itself is tested in tests/e2e/test_governance.py)."""
        if force_retrain:
            conf = {**(conf or {}), "force_retrain": True}
        return DagTest(self, environment, conf)


class DagTest:
    """``airflow dags test`` in the background; output to a file (no pipe to fill up)."""

    def __init__(self, cluster: Cluster, environment: str, conf: dict | None) -> None:
        self.cluster = cluster
        self.log_path = cluster.home / f"airflow-{environment}-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "airflow", "dags", "test", PIPELINE]
        if conf is not None:
            argv += ["-c", json.dumps(conf)]
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            env={**cluster.env, "TRAINYARD_ENV": environment},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"airflow dags test ended early:\n{self.output()[-4000:]}")

    def finish(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str, float]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"airflow dags test ran over {timeout}s:\n{self.output()[-4000:]}") from None
        finally:
            self._log.close()
        elapsed = time.monotonic() - self.started
        output = self.output()
        self.cluster.outputs.append(output)
        return code, output, elapsed


def wait_until(condition, timeout: float, what: str, run: DagTest | None = None, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None:
            run.check_alive()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def running_pod(cluster: Cluster, namespace: str, run: DagTest) -> dict:
    def running() -> dict | None:
        pods = [p for p in cluster.emulator.pods(namespace) if p["status"].get("phase") == "Running"]
        return pods[-1] if pods else None

    return wait_until(running, 120, f"a running pod in {namespace}", run)


def step_logged(cluster: Cluster, namespace: str, name: str) -> bool:
    """The trainer logged a training step ("step N/M ... loss ...")."""
    return any(
        " step " in line and " loss " in line for line in cluster.emulator.logs(namespace, name).splitlines()
    )


def trainer_processes(home: Path) -> list[int]:
    """Live processes whose command line mentions this test's TRAINYARD_HOME (the pod's trainer)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "-m trainer" in cmdline and str(home) in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def open_cluster(
    tmp_path_factory: Any,
    scenarios: dict[str, tuple[str, dict[str, Any]]],
    setup: Callable[[KubernetesEmulator], None] = lambda emulator: None,
    training: dict[str, Any] | None = None,
    kueue: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A cluster with one environment per scenario: ``{name: (namespace, kubernetes overrides)}``.

    ``kueue`` names the scenarios whose environment (``scheduling: kueue``) the trainyard-cluster
    chart renders and installs, each with the shipped values of "dev" or "prod".
    """
    home = tmp_path_factory.mktemp("trainyard-k8s-home")
    write_splits(home / "data" / "tiny", train_rows=320, validation_rows=80)
    build_tiny_model(home / "models" / "tiny-bert")
    # MLflow's tables now: runs of several environments start at once, and SQLite lets one create them.
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db").search_experiments()
    with MotoS3(BUCKET) as s3:
        s3.upload_tree(home / "data", f"s3://{BUCKET}/data")
        s3.upload_tree(home / "models", f"s3://{BUCKET}/models")
        pipelines = tmp_path_factory.mktemp("k8s-pipelines")
        document = pipeline_yaml("tiny-bert", **(training or {}))
        (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        environments = tmp_path_factory.mktemp("k8s-environments")
        for real in (DAGS / "environments").glob("*.yaml"):  # pipelines validate overrides against known envs
            shutil.copy(real, environments / real.name)
        texts = {}
        for name, (namespace, extra) in scenarios.items():
            texts[name] = yaml.safe_dump(
                environment_yaml(home, namespace, s3.endpoint, **extra), sort_keys=False
            )
            (environments / f"{name}.yaml").write_text(texts[name])
        with KubernetesEmulator() as emulator:
            if kueue:
                from tests.support.kueue_cluster import install, render_cluster

                install(emulator, render_cluster({name: (texts[name], like) for name, like in kueue.items()}))
            for namespace, _ in scenarios.values():
                emulator.add_namespace(namespace)
                emulator.add_secret(
                    namespace,
                    S3_SECRET,
                    {
                        "AWS_ACCESS_KEY_ID": "test-key-id",
                        "AWS_SECRET_ACCESS_KEY": SECRET_VALUE,
                        "AWS_DEFAULT_REGION": "us-east-1",
                    },
                )
                emulator.add_secret(
                    namespace, MLFLOW_SECRET, {"username": "trainyard-test-trainer", "password": SECRET_VALUE}
                )
            emulator.add_priority_class(PRIORITY_CLASS, 1000)
            setup(emulator)
            kubeconfig = emulator.write_kubeconfig(home / "kubeconfig")
            connection = {
                "conn_type": "kubernetes",
                "extra": {"kube_config_path": str(kubeconfig), "in_cluster": False},
            }
            env = {
                **os.environ,
                "TRAINYARD_HOME": str(home),
                "TRAINYARD_PIPELINES_DIR": str(pipelines),
                "TRAINYARD_ENVIRONMENTS_DIR": str(environments),
                "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
                "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(connection),
                "OMP_NUM_THREADS": "1",
                **CREDENTIALS,  # validate_data reads the data from S3 on the Airflow side
                "MLFLOW_DISABLE_TELEMETRY": "true",
            }
            yield Cluster(emulator=emulator, env=env, home=home)
