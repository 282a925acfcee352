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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s_cluster import (
    BUCKET,
    MLFLOW_SECRET,
    PIPELINE,
    PRIORITY_CLASS,
    S3_SECRET,
    SECRET_VALUE,
    STARTUP_TIMEOUT,
    open_cluster,
    running_pod,
    step_logged,
    trainer_processes,
    wait_until,
)
from tests.support.k8s_emulator import KubernetesEmulator

pytestmark = [pytest.mark.slow, pytest.mark.extended]

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


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, airflow_db):
    scenarios: dict[str, tuple[str, dict[str, Any]]] = {
        MAIN: (NAMESPACES[MAIN], {}),
        OOM: (NAMESPACES[OOM], {}),
        NO_PRIORITY: (NAMESPACES[NO_PRIORITY], {"priority_class": MISSING_PRIORITY_CLASS}),
        QUOTA: (NAMESPACES[QUOTA], {}),
        # dev's on_finish_action: a pod that did not succeed is kept, so deleting it on timeout is
        # the operator's own doing.
        TIMEOUT: (
            NAMESPACES[TIMEOUT],
            {"execution_timeout_minutes": 0.15, "on_finish_action": "delete_succeeded_pod"},
        ),
        BAD_IMAGE: (NAMESPACES[BAD_IMAGE], {"image": MISSING_IMAGE}),
        # the trainer exits 3: no base model
        NO_MODEL: (NAMESPACES[NO_MODEL], {"models_root": f"s3://{BUCKET}/no-models"}),
        EVICT: (NAMESPACES[EVICT], {"max_preemption_relaunches": 1}),
    }

    def setup(emulator: KubernetesEmulator) -> None:
        emulator.add_resource_quota(NAMESPACES[QUOTA], QUOTA_NAME, {"requests.nvidia.com/gpu": "0"})

    yield from open_cluster(tmp_path_factory, scenarios, setup)


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
    first = running_pod(cluster, namespace, run)
    name = first["metadata"]["name"]
    environ = wait_until(
        lambda: cluster.emulator.process_environ(namespace, name), 30, "the trainer's process"
    )
    checkpoints = wait_until(cluster.checkpoints, 120, "a first checkpoint", run, interval=0.02)
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
    admitted = [p for p in cluster.emulator.admitted_pods() if p["metadata"]["namespace"] == namespace]
    first, second = admitted
    assert first["metadata"]["name"] == run.preempted["metadata"]["name"]
    for pod in admitted:
        assert pod["metadata"]["labels"]["try_number"] == "1"
        assert pod["metadata"]["labels"]["dag_id"] == PIPELINE
        assert pod["spec"]["priorityClassName"] == PRIORITY_CLASS
    # The scheduler deleted the preempted pod (it was Failed when last read); the second succeeded.
    assert run.preempted["status"]["phase"] == "Failed"
    assert [(p["metadata"]["name"], p["status"]["phase"]) for p in cluster.emulator.pods(namespace)] == [
        (second["metadata"]["name"], "Succeeded")
    ]
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


def test_the_preempted_run_records_its_gpu_time(cluster, preempted_run):
    """Both pods' time, on the one MLflow run: queued and running within the run's wall time, and
    the first pod's loss small (it saved on SIGTERM). No gpu_hour_price here: no cost metric."""
    run = preempted_run
    assert run.code == 0, run.output[-6000:]
    (mlflow_run,) = cluster.runs(MAIN)
    metrics, tags = mlflow_run.data.metrics, mlflow_run.data.tags
    assert (tags["trainyard.gpus"], tags["trainyard.gpu_type"], tags["trainyard.pods"]) == (
        "1",
        "default",
        "2",
    )
    assert tags["trainyard.currency"] == "USD"
    queued = metrics["trainyard.gpu_seconds.queued"]
    running = metrics["trainyard.gpu_seconds.running"]
    lost = metrics["trainyard.gpu_seconds.lost"]
    assert running > 0 and queued >= 0
    assert queued + running < run.elapsed, (queued, running, run.elapsed)
    assert 0 <= lost < running / 2, (lost, running)
    assert metrics["trainyard.seconds.running"] == running  # 1 GPU a pod
    assert "trainyard.cost" not in metrics
    assert "GPU time of this run (2 pod(s), 1 x default GPU each)" in run.output


def test_secrets_never_appear_in_pod_specs_logs_or_mlflow(cluster, preempted_run):
    # Positive control: the Secret did reach the trainer process, through the kubelet only.
    environ = preempted_run.trainer_environ
    assert environ["AWS_SECRET_ACCESS_KEY"] == SECRET_VALUE
    assert environ["MLFLOW_TRACKING_PASSWORD"] == SECRET_VALUE

    received = cluster.emulator.received_pods()  # every POSTed pod body, refused ones too
    assert received, "the emulator received pods"
    for body in received:
        assert SECRET_VALUE not in json.dumps(body)
        (container,) = body["spec"]["containers"]
        assert {"secretRef": {"name": S3_SECRET}} in container["envFrom"]
        assert {
            "name": "MLFLOW_TRACKING_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": MLFLOW_SECRET, "key": "password"}},
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
    pod = running_pod(cluster, namespace, run)
    name = pod["metadata"]["name"]
    wait_until(lambda: step_logged(cluster, namespace, name), 120, "a training step", run)
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
        pod = running_pod(cluster, namespace, run)
        name = pod["metadata"]["name"]
        wait_until(lambda name=name: step_logged(cluster, namespace, name), 120, "a training step", run)
        cluster.emulator.evict(namespace, name)
        if attempt == 0:
            wait_until(lambda: cluster.posts(namespace) == 2, 60, "the relaunched pod", run)
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
    pod = running_pod(cluster, namespace, run)
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
    wait_until(lambda: cluster.emulator.pod(namespace, name) is None, 30, "the pod to be gone")
    wait_until(lambda: not trainer_processes(cluster.home), 30, "no trainer process left running")
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
