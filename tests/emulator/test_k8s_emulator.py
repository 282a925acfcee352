"""The real ``KubernetesPodOperator`` against the Kubernetes API emulator, inside real DAG runs.

How the DAG runs: ``dag.test()`` in this process (with the migrated ``airflow_db``). Airflow 3's
``dag.test()`` needs the DAG in the metadata DB, so each test writes a tiny DAG file into a
module-wide temporary folder (configured as the only DAG bundle for this module), loads it
with ``DagBag`` and calls ``dag.test()``, which syncs the folder's bundle, runs the task through the
Task SDK supervisor in-process and, for ``deferrable=True``, runs the trigger *inline* (no triggerer
process needed). The task log goes to stdout, which ``capfd`` captures. The first ``dag.test()`` of
the session costs a few seconds of Airflow start-up; later ones take well under a second plus the pod.

``airflow dags test`` in a subprocess would work too but pays Airflow's import (~5 s) per run.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dag_bundle import dag_bundle_folder
from tests.support.k8s_emulator import KubernetesEmulator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NAMESPACE = "trainyard"
SECRET_VALUE = "hf_s3cr3t-value-never-logged"
STARTUP_TIMEOUT = 60


@pytest.fixture(scope="module")
def k8s():
    with KubernetesEmulator() as emulator:
        emulator.add_namespace(NAMESPACE)
        emulator.add_priority_class("trainyard-dev", 1000, preemption_policy="Never")
        emulator.add_secret(NAMESPACE, "hf-token", {"token": SECRET_VALUE})
        emulator.add_namespace("gpu-team")
        emulator.add_resource_quota("gpu-team", "gpu-quota", {"requests.nvidia.com/gpu": "1", "pods": "10"})
        yield emulator


@pytest.fixture(scope="module")
def kubeconfig(k8s, tmp_path_factory) -> Path:
    return k8s.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory, airflow_db) -> Iterator[Path]:
    yield from dag_bundle_folder(tmp_path_factory, "k8s-emulator-tests")


def run_pod_dag(  # noqa: PLR0917
    folder: Path,
    kubeconfig: Path,
    dag_id: str,
    operator_args: str,
    namespace: str = NAMESPACE,
    extra: str = "",
    image: str = "ghcr.io/trainyard/trainer:test",
    on_finish_action: str = "delete_pod",
):
    """Write a one-task DAG (task ``train``, a KubernetesPodOperator), run it with ``dag.test()``.

    Returns ``(dag_run, task_instance_state, seconds)``.
    """
    source = textwrap.dedent(
        """
        import datetime
        from airflow.sdk import DAG
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s
        {extra}

        with DAG({dag_id!r}, schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
            KubernetesPodOperator(
                task_id="train",
                name={name!r},
                config_file={kubeconfig!r},
                in_cluster=False,
                namespace={namespace!r},
                image={image!r},
                get_logs=True,
                do_xcom_push=False,
                on_finish_action={on_finish_action!r},
                startup_timeout_seconds={startup},
                startup_check_interval_seconds=1,
                poll_interval=1,
                retries=0,
                {operator_args}
            )
        """
    ).format(
        extra=extra,
        image=image,
        on_finish_action=on_finish_action,
        dag_id=dag_id,
        name=dag_id.replace("_", "-"),
        kubeconfig=str(kubeconfig),
        namespace=namespace,
        startup=STARTUP_TIMEOUT,
        operator_args=operator_args,
    )
    path = folder / f"{dag_id}.py"
    path.write_text(source)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(path))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    started = time.monotonic()
    dag_run = dag.test()
    elapsed = time.monotonic() - started
    (ti,) = dag_run.get_task_instances()
    return dag_run, ti.state, elapsed


def _py(code: str) -> str:
    return f"cmds=['python', '-c'], arguments=[{code!r}],"


def _dag_pods(k8s: KubernetesEmulator, dag_id: str, namespace: str = NAMESPACE) -> list[dict]:
    return [p for p in k8s.pods(namespace) if p["metadata"].get("labels", {}).get("dag_id") == dag_id]


def _created(k8s: KubernetesEmulator, namespace: str = NAMESPACE) -> int:
    return sum(
        1
        for method, path in k8s.requests_log
        if method == "POST" and path.split("?")[0].endswith(f"/{namespace}/pods")
    )


def test_pod_succeeds_logs_reach_the_task_log_and_pod_is_deleted(k8s, kubeconfig, dags_folder, capfd):
    _, state, _ = run_pod_dag(
        dags_folder, kubeconfig, "kpo_hello", _py("print('hello from the emulated pod')")
    )
    out = capfd.readouterr().out
    assert state == "success", out[-3000:]
    assert "hello from the emulated pod" in out
    assert _dag_pods(k8s, "kpo_hello") == []  # on_finish_action=delete_pod
    deletes = [path for method, path in k8s.requests_log if method == "DELETE"]
    assert any("/pods/kpo-hello-" in path for path in deletes)
    assert k8s.unknown_routes == []


def test_failing_command_fails_the_task_with_its_exit_code(k8s, kubeconfig, dags_folder, capfd):
    code = "import sys; print('about to fail', flush=True); sys.exit(3)"
    _, state, _ = run_pod_dag(
        dags_folder,
        kubeconfig,
        "kpo_fail",
        _py(code) + "\nlog_events_on_failure=True,",
        on_finish_action="keep_pod",
    )
    out = capfd.readouterr().out
    assert state == "failed"
    assert "about to fail" in out
    assert "state='TERMINATED', reason='Error', exit_code=3" in out  # log_events_on_failure
    assert "Pod Event: Started - Started container base" in out
    (pod,) = _dag_pods(k8s, "kpo_fail")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert pod["metadata"]["labels"]["already_checked"] == "True"  # KPO's PATCH


def test_unknown_priority_class_fails_fast(k8s, kubeconfig, dags_folder, capfd):
    before = _created(k8s)
    _, state, elapsed = run_pod_dag(
        dags_folder, kubeconfig, "kpo_prio", _py("print(1)") + "\npriority_class_name='trainyard-prodd',"
    )
    out = capfd.readouterr().out
    assert state == "failed"
    assert elapsed < STARTUP_TIMEOUT / 4
    assert "no PriorityClass with name trainyard-prodd was found" in out
    assert _created(k8s) == before + 1  # one attempt, rejected (403 is not retried)
    assert _dag_pods(k8s, "kpo_prio") == []


def test_quota_overrun_fails_fast_naming_the_quota(k8s, kubeconfig, dags_folder, capfd):
    args = (
        _py("print(1)") + "\ncontainer_resources=k8s.V1ResourceRequirements(limits={'nvidia.com/gpu': '2'}),"
    )
    _, state, elapsed = run_pod_dag(dags_folder, kubeconfig, "kpo_quota", args, namespace="gpu-team")
    out = capfd.readouterr().out
    assert state == "failed"
    assert elapsed < STARTUP_TIMEOUT / 4
    assert "exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=2" in out
    assert _dag_pods(k8s, "kpo_quota", "gpu-team") == []


def test_schema_invalid_pod_is_rejected_with_422(k8s, kubeconfig, dags_folder, capfd):
    # The python client drops unknown attributes, so make a field the wrong *type* instead.
    args = textwrap.dedent(
        """
        full_pod_spec=k8s.V1Pod(spec=k8s.V1PodSpec(
            active_deadline_seconds="soon",
            containers=[k8s.V1Container(name="base", image="x", command=["python", "-c", "print(1)"])],
        )),
        """
    )
    before = _created(k8s)
    _, state, elapsed = run_pod_dag(dags_folder, kubeconfig, "kpo_invalid", args)
    out = capfd.readouterr().out
    assert state == "failed"
    assert elapsed < STARTUP_TIMEOUT / 4
    assert "(422)" in out and "Invalid" in out
    assert "spec.activeDeadlineSeconds" in out
    assert _created(k8s) == before + 1
    assert _dag_pods(k8s, "kpo_invalid") == []


def test_preempted_pod_fails_with_disruption_target(k8s, kubeconfig, dags_folder, capfd):
    code = "import time; print('training', flush=True); time.sleep(60)"
    final: dict = {}

    def preempt_when_running() -> None:
        pod = k8s.wait_for_pod(
            NAMESPACE,
            lambda p: (
                p["metadata"].get("labels", {}).get("dag_id") == "kpo_preempt"
                and p["status"].get("phase") == "Running"
            ),
            timeout=30,
        )
        time.sleep(0.5)
        final.update(k8s.preempt(NAMESPACE, pod["metadata"]["name"], grace_seconds=1))

    thread = threading.Thread(target=preempt_when_running)
    thread.start()
    started = time.monotonic()
    _, state, _ = run_pod_dag(
        dags_folder,
        kubeconfig,
        "kpo_preempt",
        _py(code) + "\npriority_class_name='trainyard-dev',",
        on_finish_action="keep_pod",
    )
    thread.join(timeout=30)
    out = capfd.readouterr().out
    assert state == "failed"
    assert time.monotonic() - started < 30
    assert final["status"]["phase"] == "Failed"
    (condition,) = [c for c in final["status"]["conditions"] if c["type"] == "DisruptionTarget"]
    assert (condition["status"], condition["reason"]) == ("True", "PreemptionByScheduler")
    terminated = final["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (143, "Error")  # SIGTERM, python's default
    assert "training" in out
    assert final["spec"]["priority"] == 1000
    reasons = [e["reason"] for e in k8s.events(NAMESPACE, final["metadata"]["name"])]
    assert "Preempted" in reasons and "Killing" in reasons


def test_secret_reaches_the_process_env_only(k8s, kubeconfig, dags_folder, capfd):
    code = "import hashlib, os; print('token-sha256', hashlib.sha256(os.environ['HF_TOKEN'].encode())"
    code += ".hexdigest())"
    args = _py(code) + "\nsecrets=[Secret('env', 'HF_TOKEN', 'hf-token', 'token')],"
    _, state, _ = run_pod_dag(
        dags_folder,
        kubeconfig,
        "kpo_secret",
        args,
        extra="from airflow.providers.cncf.kubernetes.secret import Secret",
        on_finish_action="keep_pod",
    )
    out = capfd.readouterr().out
    assert state == "success", out[-3000:]
    assert f"token-sha256 {hashlib.sha256(SECRET_VALUE.encode()).hexdigest()}" in out
    assert SECRET_VALUE not in out
    (pod,) = _dag_pods(k8s, "kpo_secret")
    assert SECRET_VALUE not in json.dumps(pod)
    env = pod["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in env


def test_deferrable_mode_runs_the_trigger_inline(k8s, kubeconfig, dags_folder, capfd, caplog):
    code = "import time; print('deferred hello', flush=True); time.sleep(1.5); print('deferred bye')"
    _, state, _ = run_pod_dag(
        dags_folder,
        kubeconfig,
        "kpo_deferred",
        _py(code) + "\ndeferrable=True,\nlogging_interval=1,\nlog_events_on_startup=True,",
    )
    out = capfd.readouterr().out
    assert state == "success", out[-3000:]
    assert "running trigger in line" in out + caplog.text  # dag.test() ran the trigger; no triggerer
    assert "deferred hello" in out and "deferred bye" in out
    assert _dag_pods(k8s, "kpo_deferred") == []


def test_missing_image_fails_fast(k8s, kubeconfig, dags_folder, capfd):
    image = "ghcr.io/trainyard/does-not-exist:1"
    _, state, elapsed = run_pod_dag(dags_folder, kubeconfig, "kpo_image", _py("print(1)"), image=image)
    out = capfd.readouterr().out
    assert state == "failed"
    assert elapsed < STARTUP_TIMEOUT / 4
    assert "ErrImagePull" in out or "ImagePullBackOff" in out


# ------------------------------------------------------------------ the emulator itself, no Airflow


@pytest.fixture
def api(k8s, kubeconfig):
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))


def _pod(name: str, code: str, **spec) -> dict:
    container = {"name": "base", "image": "python:3.11", "command": ["python", "-c", code]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "emu", "case": name}},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def _status(exc) -> dict:
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["status"] == "Failure"
    return body


def _wait_phase(k8s, name: str, *phases: str, timeout: float = 15) -> dict:
    return k8s.wait_for_pod(
        NAMESPACE, lambda p: p["metadata"]["name"] == name and p["status"].get("phase") in phases, timeout
    )


def test_api_errors_are_real_status_objects(k8s, api, kubeconfig):
    from kubernetes import client, config

    with pytest.raises(client.ApiException) as missing:
        api.read_namespaced_pod("nope", NAMESPACE)
    assert (missing.value.status, _status(missing.value)["reason"]) == (404, "NotFound")
    with pytest.raises(client.ApiException) as no_ns:
        api.create_namespaced_pod("no-such-ns", _pod("x", "print(1)"))
    assert (
        no_ns.value.status == 404 and 'namespaces "no-such-ns" not found' in _status(no_ns.value)["message"]
    )
    with pytest.raises(client.ApiException) as bad_selector:
        api.list_namespaced_pod(NAMESPACE, label_selector="a in (b")
    assert bad_selector.value.status == 400
    with pytest.raises(client.ApiException) as bad_field:
        api.list_namespaced_event(NAMESPACE, field_selector="spec.foo=bar")
    assert "field label not supported" in _status(bad_field.value)["message"]
    cfg = client.Configuration()
    cfg.host = k8s.url
    with pytest.raises(client.ApiException) as unauthorized:
        client.CoreV1Api(client.ApiClient(cfg)).list_namespaced_pod(NAMESPACE)
    assert unauthorized.value.status == 401
    assert client.VersionApi(config.new_client_from_config(str(kubeconfig))).get_code().major == "1"


def test_quota_must_specify_and_label_selectors(k8s, api):
    k8s.add_namespace("cpu-team")
    k8s.add_resource_quota("cpu-team", "compute", {"requests.cpu": "1", "limits.memory": "1Gi"})
    from kubernetes import client

    with pytest.raises(client.ApiException) as missing:
        api.create_namespaced_pod("cpu-team", _pod("no-requests", "print(1)"))
    assert _status(missing.value)["message"] == (
        'pods "no-requests" is forbidden: failed quota: compute: must specify limits.memory for: base; '
        "requests.cpu for: base"
    )
    sized = {"resources": {"requests": {"cpu": "600m"}, "limits": {"memory": "512Mi"}}}
    sleeper = "import time; time.sleep(30)"
    api.create_namespaced_pod("cpu-team", _pod("first", sleeper, container=sized))
    with pytest.raises(client.ApiException) as over:
        api.create_namespaced_pod("cpu-team", _pod("second", sleeper, container=sized))
    assert _status(over.value)["message"] == (
        'pods "second" is forbidden: exceeded quota: compute, requested: requests.cpu=600m, '
        "used: requests.cpu=600m, limited: requests.cpu=1"
    )
    assert api.list_namespaced_pod("cpu-team", label_selector="app=emu,case!=second,!missing").items
    assert not api.list_namespaced_pod("cpu-team", label_selector="app==emu,missing").items
    assert len(api.list_namespaced_pod("cpu-team", label_selector="case in (first, other)").items) == 1
    k8s.delete_pod("cpu-team", "first", grace=0)


def test_logs_follow_tail_and_eviction(k8s, api):
    code = (
        "import time\nfor i in range(3):\n    print('line', i, flush=True); time.sleep(0.2)\ntime.sleep(30)"
    )
    api.create_namespaced_pod(NAMESPACE, _pod("logger", code))
    _wait_phase(k8s, "logger", "Running")
    k8s.wait_for_pod(NAMESPACE, lambda p: "line 2" in k8s.logs(NAMESPACE, "logger"), timeout=10)

    def read(**query) -> str:  # the v36 client returns str(bytes) for a preloaded str body: read raw
        return api.read_namespaced_pod_log("logger", NAMESPACE, _preload_content=False, **query).data.decode()

    assert read(tail_lines=1) == "line 2\n"
    stamped = read(timestamps=True)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z line 0$", stamped.splitlines()[0])
    stream = api.read_namespaced_pod_log("logger", NAMESPACE, follow=True, _preload_content=False)
    threading.Timer(0.3, k8s.evict, args=(NAMESPACE, "logger"), kwargs={"grace_seconds": 1}).start()
    assert b"".join(stream.stream()) == b"line 0\nline 1\nline 2\n"  # follow ends with the process
    pod = _wait_phase(k8s, "logger", "Failed")
    assert pod["status"]["reason"] == "Evicted"
    assert {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}.items() <= next(
        c for c in pod["status"]["conditions"] if c["type"] == "DisruptionTarget"
    ).items()


def test_oom_deadline_and_missing_secret(k8s, api):
    api.create_namespaced_pod(NAMESPACE, _pod("oom", "import time; time.sleep(30)"))
    _wait_phase(k8s, "oom", "Running")
    terminated = k8s.oom_kill(NAMESPACE, "oom")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)

    api.create_namespaced_pod(
        NAMESPACE, _pod("deadline", "import time; time.sleep(30)", activeDeadlineSeconds=1)
    )
    pod = _wait_phase(k8s, "deadline", "Failed")
    assert pod["status"]["reason"] == "DeadlineExceeded"

    env = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "later", "key": "t"}}}]
    api.create_namespaced_pod(
        NAMESPACE, _pod("needs-secret", "import os; print(len(os.environ['T']))", container={"env": env})
    )
    waiting = k8s.wait_for_pod(
        NAMESPACE,
        lambda p: (
            p["metadata"]["name"] == "needs-secret"
            and p["status"]
            .get("containerStatuses", [{}])[0]
            .get("state", {})
            .get("waiting", {})
            .get("reason")
            == "CreateContainerConfigError"
        ),
        timeout=10,
    )
    assert waiting["status"]["phase"] == "Pending"
    k8s.add_secret(NAMESPACE, "later", {"t": "abcd"})  # the kubelet retries, like a real one
    _wait_phase(k8s, "needs-secret", "Succeeded")
    assert k8s.logs(NAMESPACE, "needs-secret") == "4\n"


def test_mounts_are_rewritten_to_local_dirs(k8s, api):
    pvc = k8s.add_persistent_volume_claim(NAMESPACE, "checkpoints")
    code = (
        "import os, pathlib; p = pathlib.Path(os.environ['HF_HOME']); p.mkdir(parents=True);"
        "pathlib.Path(os.environ['CKPT'], 'step-1').write_text('x'); print(os.environ['TMPDIR'])"
    )
    container = {
        "env": [
            {"name": "HF_HOME", "value": "/cache/huggingface"},
            {"name": "CKPT", "value": "/checkpoints"},
            {"name": "TMPDIR", "value": "/tmp/x"},
        ],
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "ckpt", "mountPath": "/checkpoints"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    volumes = [
        {"name": "cache", "emptyDir": {}},
        {"name": "ckpt", "persistentVolumeClaim": {"claimName": "checkpoints"}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    api.create_namespaced_pod(NAMESPACE, _pod("mounts", code, container=container, volumes=volumes))
    pod = _wait_phase(k8s, "mounts", "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Succeeded", k8s.logs(NAMESPACE, "mounts")
    assert (pvc / "step-1").read_text() == "x"
    assert k8s.logs(NAMESPACE, "mounts") == "/tmp/x\n"


def test_async_hook_watches_events_of_a_pod_stuck_pulling(k8s, api, kubeconfig):
    """The deferrable trigger's event watch (kubernetes_asyncio, ``?watch=True``) on a pending pod."""
    import asyncio

    from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

    api.create_namespaced_pod(
        NAMESPACE, _pod("stuck", "print(1)", container={"image": "registry.example/does-not-exist:1"})
    )
    hook = AsyncKubernetesHook(config_dict=json.loads(kubeconfig.read_text()), in_cluster=False, conn_id=None)
    seen: list[str] = []

    async def watch() -> None:
        async for event in hook.watch_pod_events("stuck", NAMESPACE, timeout_seconds=2):
            seen.append(event.reason)
            if event.reason == "BackOff":
                return

    asyncio.run(asyncio.wait_for(watch(), 10))
    assert seen[:3] == ["Scheduled", "Pulling", "Failed"]
    waiting = k8s.pod(NAMESPACE, "stuck")["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ImagePullBackOff"
    k8s.delete_pod(NAMESPACE, "stuck", grace=0)
    assert k8s.pod(NAMESPACE, "stuck") is None
