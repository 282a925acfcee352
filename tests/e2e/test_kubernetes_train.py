"""The real ``train`` task of the real DAG (``KubernetesTrainOperator``) against the Kubernetes emulator.

Each test runs ``airflow dags test <pipeline>`` in a subprocess with ``TRAINYARD_ENV`` set to a test
environment whose ``kubernetes:`` section points at ``tests/support/k8s_emulator/`` (through the
``kubernetes_default`` connection given as ``AIRFLOW_CONN_KUBERNETES_DEFAULT``). The emulator runs
in this process and executes each pod's ``python -m trainer ...`` as a local process, so the trainer,
its checkpoints (a local ``checkpoint_root`` stands in for S3 / a PVC) and MLflow (SQLite) are real.
Where a test must act during a run (preempt, OOM-kill) the DAG run is a background process.

Each scenario has its own environment file and namespace, so pods and API requests are counted
per scenario. The environment files sit in a temporary ``TRAINYARD_ENVIRONMENTS_DIR`` next to
copies of the real local/dev/prod files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.k8s_emulator import KubernetesEmulator
from tests.support.paths import DAGS, ROOT
from tests.support.pipelines import tiny_pipeline
from tests.support.s3 import CREDENTIALS, MotoS3
from tests.support.synthetic_data import write_splits
from tests.support.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

PIPELINE = "tiny-k8s"
PRIORITY_CLASS = "trainyard-test-low"
IMAGE = "ghcr.io/trainyard/trainer:0.1.0-test"
SECRET_VALUE = "tySecr3t-7c4e9a1f0b2d-never-in-specs-logs-or-mlflow"
S3_SECRET = "trainyard-test-s3"
MLFLOW_SECRET = "trainyard-test-mlflow"
STARTUP_TIMEOUT = 300
RUN_TIMEOUT = 300

# scenario (= environment name) -> namespace
MAIN, OOM, NO_PRIORITY, QUOTA, TIMEOUT = "k8s-test", "k8s-oom", "k8s-noprio", "k8s-quota", "k8s-timeout"
BAD_IMAGE, NO_MODEL, EVICT = "k8s-badimage", "k8s-nomodel", "k8s-evict"
NAMESPACES = {
    MAIN: "ty-main",
    OOM: "ty-oom",
    NO_PRIORITY: "ty-prio",
    QUOTA: "ty-quota",
    TIMEOUT: "ty-timeout",
    BAD_IMAGE: "ty-image",
    NO_MODEL: "ty-exit",
    EVICT: "ty-evict",
}
MISSING_IMAGE = "ghcr.io/trainyard/does-not-exist:0.1.0"
QUOTA_NAME = "gpu-quota"
MISSING_PRIORITY_CLASS = "trainyard-missing-class"
BUCKET = "trainyard-k8s"


def _pipeline_yaml(model_dir: str) -> dict:
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
        },
        # The emulator admits extended resources (no scheduling against node capacity), so ask for a
        # GPU like a real pipeline; the trainer falls back to fp32 on CPU.
        resources={"gpus": 1, "cpu": "1", "memory": "2Gi", "shm_size": "256Mi"},
    )


def _environment(home: Path, namespace: str, s3_endpoint: str, **kubernetes: Any) -> dict:
    airflow = {"execution_timeout_minutes": kubernetes.pop("execution_timeout_minutes", 10)}
    models_root = kubernetes.pop("models_root", f"s3://{BUCKET}/models")
    return {
        "launcher": "kubernetes",
        "airflow": {"schedules_enabled": False, "retries": 0, "retry_delay_minutes": 0, **airflow},
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
                "env": {"MLFLOW_TRACKING_TOKEN": {"secret": MLFLOW_SECRET, "key": "token"}},
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

    def start(self, environment: str, conf: dict | None = None) -> DagTest:
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


def _wait_until(condition, timeout: float, what: str, run: DagTest | None = None, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None:
            run.check_alive()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _running_pod(cluster: Cluster, namespace: str, run: DagTest) -> dict:
    def running() -> dict | None:
        pods = [p for p in cluster.emulator.pods(namespace) if p["status"].get("phase") == "Running"]
        return pods[-1] if pods else None

    return _wait_until(running, 120, f"a running pod in {namespace}", run)


def _step_logged(cluster: Cluster, namespace: str, name: str) -> bool:
    """The trainer logged a training step ("step N/M ... loss ...")."""
    return any(
        " step " in line and " loss " in line for line in cluster.emulator.logs(namespace, name).splitlines()
    )


def _trainer_processes(home: Path) -> list[int]:
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


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, airflow_db):
    home = tmp_path_factory.mktemp("trainyard-k8s-home")
    write_splits(home / "data" / "tiny", train_rows=320, validation_rows=80)
    build_tiny_model(home / "models" / "tiny-bert")
    with MotoS3(BUCKET) as s3:
        s3.upload_tree(home / "data", f"s3://{BUCKET}/data")
        s3.upload_tree(home / "models", f"s3://{BUCKET}/models")
        yield from _cluster(tmp_path_factory, home, s3.endpoint)


def _cluster(tmp_path_factory, home: Path, s3_endpoint: str):
    pipelines = tmp_path_factory.mktemp("k8s-pipelines")
    (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(_pipeline_yaml("tiny-bert"), sort_keys=False))
    environments = tmp_path_factory.mktemp("k8s-environments")
    for real in (DAGS / "environments").glob("*.yaml"):  # pipelines validate overrides against known envs
        shutil.copy(real, environments / real.name)
    specific: dict[str, dict[str, Any]] = {
        MAIN: {},
        OOM: {},
        NO_PRIORITY: {"priority_class": MISSING_PRIORITY_CLASS},
        QUOTA: {},
        # dev's on_finish_action: a pod that did not succeed is kept, so deleting it on timeout is
        # the operator's own doing.
        TIMEOUT: {"execution_timeout_minutes": 0.15, "on_finish_action": "delete_succeeded_pod"},
        BAD_IMAGE: {"image": MISSING_IMAGE},
        NO_MODEL: {"models_root": f"s3://{BUCKET}/no-models"},  # the trainer exits 3: no base model
        EVICT: {"max_preemption_relaunches": 1},
    }
    for name, extra in specific.items():
        (environments / f"{name}.yaml").write_text(
            yaml.safe_dump(_environment(home, NAMESPACES[name], s3_endpoint, **extra), sort_keys=False)
        )

    with KubernetesEmulator() as emulator:
        for namespace in NAMESPACES.values():
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
            emulator.add_secret(namespace, MLFLOW_SECRET, {"token": SECRET_VALUE})
        emulator.add_priority_class(PRIORITY_CLASS, 1000)
        emulator.add_resource_quota(NAMESPACES[QUOTA], QUOTA_NAME, {"requests.nvidia.com/gpu": "0"})
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


@dataclass
class PreemptedRun:
    code: int
    output: str
    elapsed: float
    preempted: dict
    checkpoint_step_before: int
    trainer_environ: dict[str, str]


@pytest.fixture(scope="module")
def preempted_run(cluster) -> PreemptedRun:
    """One DAG run whose first pod is preempted after its first checkpoint (shared by two tests)."""
    namespace = NAMESPACES[MAIN]
    run = cluster.start(MAIN)
    first = _running_pod(cluster, namespace, run)
    name = first["metadata"]["name"]
    environ = _wait_until(
        lambda: cluster.emulator.process_environ(namespace, name), 30, "the trainer's process"
    )
    checkpoints = _wait_until(cluster.checkpoints, 120, "a first checkpoint", run, interval=0.02)
    step_before = int(checkpoints[-1].parent.name.split("-")[1])
    preempted = cluster.emulator.preempt(namespace, name)
    code, output, elapsed = run.finish()
    return PreemptedRun(code, output, elapsed, preempted, step_before, environ)


# ------------------------------------------------------------------------------------------- tests


def test_preempted_pod_is_relaunched_and_resumes_the_same_mlflow_run(cluster, preempted_run):
    run = preempted_run
    namespace = NAMESPACES[MAIN]
    assert run.code == 0, run.output[-6000:]
    conditions = {c["type"]: c for c in run.preempted["status"]["conditions"]}
    assert conditions["DisruptionTarget"]["reason"] == "PreemptionByScheduler"

    # Relaunched once, inside the same Airflow try.
    assert cluster.posts(namespace) == 2
    pods = {p["metadata"]["name"]: p for p in cluster.emulator.pods(namespace)}
    assert len(pods) == 2
    first = pods.pop(run.preempted["metadata"]["name"])
    (second,) = pods.values()
    for pod in (first, second):
        assert pod["metadata"]["labels"]["try_number"] == "1"
        assert pod["metadata"]["labels"]["dag_id"] == PIPELINE
        assert pod["spec"]["priorityClassName"] == PRIORITY_CLASS
    assert first["status"]["phase"] == "Failed" and second["status"]["phase"] == "Succeeded"
    assert "Relaunching (1/2, no Airflow retry used)" in run.output
    assert "was preempted by the cluster (PreemptionByScheduler)" in run.output

    # The first trainer saved on SIGTERM; the second resumed from a checkpoint of this DAG run.
    first_log = cluster.emulator.logs(namespace, first["metadata"]["name"])
    second_log = cluster.emulator.logs(namespace, second["metadata"]["name"])
    assert "SIGTERM received" in first_log, first_log[-3000:]
    assert "Resuming from checkpoint" in second_log, second_log[-3000:]
    resumed_line = next(line for line in second_log.splitlines() if "Resuming from checkpoint" in line)
    resumed_step = int(resumed_line.rsplit("(step ", 1)[1].rstrip(")"))
    assert resumed_step >= run.checkpoint_step_before > 0
    assert "Resuming from checkpoint" not in first_log

    # One MLflow run, continued; the Airflow try did not change; the model was promoted.
    (mlflow_run,) = cluster.runs(MAIN)
    assert mlflow_run.info.status == "FINISHED"
    tags = mlflow_run.data.tags
    assert int(tags["trainyard.resumed_from_step"]) == resumed_step > 0
    assert tags["airflow.try_number"] == "1"
    assert tags["trainyard.environment"] == MAIN
    assert "MLflow run " + mlflow_run.info.run_id + " (resumed)" in second_log
    assert "MLflow run " + mlflow_run.info.run_id + " (new)" in first_log
    champion = cluster.mlflow().get_model_version_by_alias(f"{MAIN}.{PIPELINE}", "champion")
    assert champion.run_id == mlflow_run.info.run_id
    assert cluster.checkpoints() == [], "checkpoints are removed after a successful run"


def test_secrets_never_appear_in_pod_specs_logs_or_mlflow(cluster, preempted_run):
    # Positive control: the Secret did reach the trainer process, through the kubelet only.
    environ = preempted_run.trainer_environ
    assert environ["AWS_SECRET_ACCESS_KEY"] == SECRET_VALUE
    assert environ["MLFLOW_TRACKING_TOKEN"] == SECRET_VALUE

    received = cluster.emulator.received_pods()  # every POSTed pod body, refused ones too
    assert received, "the emulator received pods"
    for body in received:
        assert SECRET_VALUE not in json.dumps(body)
        (container,) = body["spec"]["containers"]
        assert {"secretRef": {"name": S3_SECRET}} in container["envFrom"]
        assert {
            "name": "MLFLOW_TRACKING_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": MLFLOW_SECRET, "key": "token"}},
        } in container["env"]
    for namespace in NAMESPACES.values():
        for pod in cluster.emulator.pods(namespace):
            assert SECRET_VALUE not in json.dumps(pod)

    assert cluster.outputs
    for output in cluster.outputs:
        assert SECRET_VALUE not in output
    logs_dir = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    for path in logs_dir.rglob("*") if logs_dir.is_dir() else []:
        if path.is_file():
            assert SECRET_VALUE not in path.read_text(errors="replace"), path

    client = cluster.mlflow()
    runs = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]
    assert runs
    for mlflow_run in runs:
        assert SECRET_VALUE not in json.dumps(mlflow_run.data.params)
        assert SECRET_VALUE not in json.dumps(mlflow_run.data.tags)
    for version in client.search_model_versions():
        assert SECRET_VALUE not in json.dumps(version.tags)


def test_oom_killed_trainer_fails_without_relaunch(cluster):
    namespace = NAMESPACES[OOM]
    run = cluster.start(OOM)
    pod = _running_pod(cluster, namespace, run)
    name = pod["metadata"]["name"]
    _wait_until(lambda: _step_logged(cluster, namespace, name), 120, "a training step", run)
    killed = cluster.emulator.oom_kill(namespace, name)
    code, output, _ = run.finish()

    terminated = killed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled"
    assert code != 0
    assert "Training pod failed: the trainer was OOMKilled" in output, output[-6000:]
    assert "Relaunching" not in output
    assert cluster.posts(namespace) == 1
    assert [p["metadata"]["name"] for p in cluster.emulator.pods(namespace)] == [name]
    (mlflow_run,) = cluster.runs(OOM)
    assert mlflow_run.info.status != "FINISHED"


def test_evictions_beyond_the_relaunch_limit_fail_the_task(cluster):
    namespace = NAMESPACES[EVICT]
    run = cluster.start(EVICT)
    for attempt in range(2):  # max_preemption_relaunches is 1: the second eviction is one too many
        pod = _running_pod(cluster, namespace, run)
        name = pod["metadata"]["name"]
        _wait_until(lambda name=name: _step_logged(cluster, namespace, name), 120, "a training step", run)
        cluster.emulator.evict(namespace, name)
        if attempt == 0:
            _wait_until(lambda: cluster.posts(namespace) == 2, 60, "the relaunched pod", run)
    code, output, _ = run.finish()
    assert code != 0
    assert "Relaunching (1/1, no Airflow retry used)" in output, output[-6000:]
    assert "was evicted by the cluster (TerminationByKubelet)" in output
    assert "gave up after 1 relaunches (max_preemption_relaunches)" in output
    assert cluster.posts(namespace) == 2


@pytest.mark.parametrize(
    ("environment", "causes"),
    [
        pytest.param(
            NO_MODEL,
            # FallbackToLogsOnError: the log tail (the trainer's own error) is in the failure message
            [
                "Training pod failed: the trainer exited with code 3 (Error): ",
                "no config.json under that prefix",
            ],
            id="trainer-exits-3",
        ),
        pytest.param(
            BAD_IMAGE,
            ["Training pod failed: image pull failed for " + MISSING_IMAGE, "ErrImagePull"],
            id="image-pull",
        ),
    ],
)
def test_failing_pod_is_not_relaunched_and_names_the_cause(cluster, environment, causes):
    namespace = NAMESPACES[environment]
    code, output, elapsed = cluster.start(environment).finish()
    assert code != 0
    for cause in causes:
        assert cause in output, output[-6000:]
    assert "Relaunching" not in output
    assert cluster.posts(namespace) == 1
    assert elapsed < STARTUP_TIMEOUT / 5, f"took {elapsed:.0f}s"


def test_unknown_priority_class_fails_fast(cluster):
    namespace = NAMESPACES[NO_PRIORITY]
    code, output, elapsed = cluster.start(NO_PRIORITY).finish()
    assert code != 0
    assert elapsed < STARTUP_TIMEOUT / 5, f"took {elapsed:.0f}s"
    assert (
        f'Kubernetes refused the training pod: pods "train-{PIPELINE}-' in output
        and f"no PriorityClass with name {MISSING_PRIORITY_CLASS} was found" in output
    ), output[-6000:]
    assert cluster.posts(namespace) == 1
    assert cluster.emulator.pods(namespace) == []
    assert cluster.runs(NO_PRIORITY) == [], "no training happened"


def test_quota_exceeded_fails_fast_naming_the_quota(cluster):
    namespace = NAMESPACES[QUOTA]
    code, output, elapsed = cluster.start(QUOTA).finish()
    assert code != 0
    assert elapsed < STARTUP_TIMEOUT / 5, f"took {elapsed:.0f}s"
    assert "Kubernetes refused the training pod:" in output, output[-6000:]
    assert f"exceeded quota: {QUOTA_NAME}, requested: requests.nvidia.com/gpu=1" in output
    assert cluster.posts(namespace) == 1
    assert cluster.emulator.pods(namespace) == []
    assert cluster.runs(QUOTA) == [], "no training happened"


def test_timed_out_task_deletes_its_pod(cluster):
    namespace = NAMESPACES[TIMEOUT]
    run = cluster.start(TIMEOUT, conf={"max_steps": 1_000_000})
    pod = _running_pod(cluster, namespace, run)
    name = pod["metadata"]["name"]
    code, output, _ = run.finish()
    assert code != 0
    assert "Process timed out" in output, output[-6000:]
    traceback = output.split("Task failed with exception", 1)[1].split("::group::Post Execute", 1)[0]
    final_error = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception|Timeout)\b.*)$", traceback, re.M)[-1]
    assert final_error.startswith("airflow.sdk.exceptions.AirflowTaskTimeout"), traceback[-3000:]
    assert f"Deleting pod {name} (phase Running): the task is ending" in output
    assert "Training pod failed" not in output, "the timeout is reported as such, not as a pod failure"
    assert any(path.split("?")[0].endswith(f"/pods/{name}") for path in cluster.deletes(namespace)), (
        cluster.emulator.requests_log[-20:]
    )
    # The emulated kubelet stops the process (SIGTERM, grace period) and the pod disappears.
    _wait_until(lambda: cluster.emulator.pod(namespace, name) is None, 30, "the pod to be gone")
    _wait_until(lambda: not _trainer_processes(cluster.home), 30, "no trainer process left running")
    assert cluster.posts(namespace) == 1


def test_a_launch_failure_is_classified_by_the_pods_current_state(cluster, monkeypatch):
    """In process: the pod operator hands ``cleanup`` the copy it read right after creating the pod.

    When waiting for the pod ends early (a launch failure, a timeout) that copy is still Pending with
    no container state on a real cluster, where pulling takes seconds (the emulator reports states
    within milliseconds, so a DAG run rarely shows the difference): the operator must re-read the pod
    to name the cause.
    """
    from airflow.sdk.exceptions import AirflowException
    from kubernetes.client import ApiClient

    from trainyard.config.loading import available_environments, load_environment, load_pipeline
    from trainyard.train.pod_failures import classify
    from trainyard.train.pod_operator import KubernetesTrainOperator

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", cluster.env["AIRFLOW_CONN_KUBERNETES_DEFAULT"])
    environments = Path(cluster.env["TRAINYARD_ENVIRONMENTS_DIR"])
    pipeline_file = Path(cluster.env["TRAINYARD_PIPELINES_DIR"]) / f"{PIPELINE}.yaml"
    environment = load_environment(BAD_IMAGE, environments)
    pipeline = load_pipeline(pipeline_file, environment, available_environments(environments))
    operator = KubernetesTrainOperator(task_id="train", pipeline=pipeline)

    namespace, name = NAMESPACES[BAD_IMAGE], "stale-copy"
    container = {"name": "base", "image": MISSING_IMAGE, "command": ["python", "-c", "pass"]}
    body = {"metadata": {"name": name}, "spec": {"restartPolicy": "Never", "containers": [container]}}
    created = cluster.emulator.create_pod(namespace, body)  # directly: not among received_pods()
    assert created["status"]["phase"] == "Pending" and "containerStatuses" not in created["status"]

    def pulling_failed(pod: dict) -> bool:
        statuses = pod["status"].get("containerStatuses") or [{}]
        return pod["metadata"]["name"] == name and "waiting" in statuses[0].get("state", {})

    cluster.emulator.wait_for_pod(namespace, pulling_failed, timeout=10)
    stale = ApiClient()._ApiClient__deserialize(created, "V1Pod")  # the client's own deserializer
    try:
        with pytest.raises(AirflowException, match="returned a failure"):
            operator.cleanup(pod=stale, remote_pod=stale)
        failure = classify(operator._last_remote_pod, operator.base_container_name)
        assert failure.kind == "image_pull", failure.message
        assert MISSING_IMAGE in failure.message
    finally:
        cluster.emulator.delete_pod(namespace, name, 0)
