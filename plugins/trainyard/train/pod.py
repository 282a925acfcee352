"""The training pod as data: every field derived from the pipeline and environment YAML.

Everything security-relevant (image, namespace, PriorityClass, service account, command,
resources) comes from the environment and pipeline files; the trigger conf reaches the pod only
as validated hyperparameters inside the JSON run spec argument: overrides cannot escalate.
Pure functions, no Airflow: ``pod_operator.py`` adds only the relaunch loop around them.
"""

from __future__ import annotations

import re
from typing import Any

from kubernetes.client import Configuration
from kubernetes.client import models as _models

from trainer.spec import RunSpec
from trainyard.config.environment_schema import QUEUE_LABEL, WORKLOAD_PRIORITY_LABEL
from trainyard.config.loading import ResolvedPipeline
from trainyard.train.launch import LaunchSpec, trainer_env

CONTAINER_NAME = "base"  # the KubernetesPodOperator's name for the main container
CACHE_DIR = "/cache"
SCRATCH_DIR = "/scratch"
LABEL_PREFIX = "trainyard.io"


class _SharedConfigModels:
    """``kubernetes.client.models`` whose objects share one Configuration.

    Each model otherwise deep-copies the default Configuration (with its loggers) when built,
    which made pod specs the largest cost of parsing hundreds of DAGs.
    """

    _config = Configuration()

    def __getattr__(self, name: str) -> Any:
        cls = getattr(_models, name)

        def build(*args: Any, **kwargs: Any) -> Any:
            return cls(*args, local_vars_configuration=self._config, **kwargs)

        return build


k8s = _SharedConfigModels()


def label_value(value: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", value)[:63]
    return cleaned.strip("._-") or "none"


def launch_argv(pipeline: ResolvedPipeline, spec: RunSpec) -> tuple[str, ...]:
    """``python -m trainer ...``, or ``python -m trainer.launcher`` with one rank per GPU when the pod
    has several (the pod then exits with the first failing rank's code)."""
    launch = LaunchSpec.for_run(spec)
    gpus = pipeline.config.resources.gpus
    if gpus > 1:
        # The ranks get the pod's grace period, less a margin, to checkpoint on SIGTERM.
        grace = pipeline.environment.kubernetes.termination_grace_period_seconds  # type: ignore[union-attr]
        return launch.multi_gpu_argv(gpus, shutdown_timeout=max(grace - 15, 5))
    return launch.argv


def kueue_labels(pipeline: ResolvedPipeline) -> dict[str, str]:
    """Under Kueue: the team's LocalQueue and the environment's WorkloadPriorityClass; else none."""
    k8s_env = pipeline.environment.kubernetes
    if k8s_env is None or k8s_env.scheduling != "kueue":
        return {}
    return {
        QUEUE_LABEL: pipeline.environment.local_queue(pipeline.config.team),
        WORKLOAD_PRIORITY_LABEL: k8s_env.workload_priority_class,
    }


def pod_labels(pipeline: ResolvedPipeline, run_id: str | None = None) -> dict[str, str]:
    """Labels to find a pipeline's pods by (``kubectl get pods -l``); the run id only at run time."""
    labels = {
        f"{LABEL_PREFIX}/pipeline": label_value(pipeline.name),
        f"{LABEL_PREFIX}/team": label_value(pipeline.config.team),
        f"{LABEL_PREFIX}/environment": label_value(pipeline.environment.name),
        "app.kubernetes.io/name": "trainyard-trainer",
        "app.kubernetes.io/part-of": "trainyard",
    }
    if run_id:
        labels[f"{LABEL_PREFIX}/dag-run"] = label_value(run_id)
    return labels


def pod_kwargs(pipeline: ResolvedPipeline) -> dict[str, Any]:
    """KubernetesPodOperator arguments fixed by the YAML (everything but the run spec argument)."""
    k8s_env = pipeline.environment.kubernetes
    assert k8s_env is not None, "kubernetes launcher without a kubernetes section"
    res = pipeline.config.resources
    # Left out of the YAML, cpu, memory and shm_size follow the GPU count (Resources.resolved).
    quantities = {"cpu": res.resolved("cpu"), "memory": res.resolved("memory")}
    shm_size = res.resolved("shm_size")
    if res.gpus:
        quantities["nvidia.com/gpu"] = str(res.gpus)
    secrets = k8s_env.secrets
    team = pipeline.config.team
    gpu = k8s_env.gpu_types.get(res.gpu_type or "")
    env_vars = [
        *(k8s.V1EnvVar(name=k, value=v) for k, v in _plain_env(pipeline).items()),
        *(
            k8s.V1EnvVar(
                name=name,
                value_from=k8s.V1EnvVarSource(
                    secret_key_ref=k8s.V1SecretKeySelector(name=ref.secret, key=ref.key)
                ),
            )
            for name, ref in secrets.env.items()
        ),
    ]
    timeout_seconds = int(pipeline.environment.airflow.execution_timeout_minutes * 60)
    return {
        "namespace": k8s_env.namespace,
        "image": k8s_env.image,
        "image_pull_policy": k8s_env.image_pull_policy,
        "name": f"train-{pipeline.name}"[:50],
        "random_name_suffix": True,
        "labels": {**pod_labels(pipeline), **kueue_labels(pipeline)},
        "annotations": {f"{LABEL_PREFIX}/owner": pipeline.config.owner},
        "container_resources": k8s.V1ResourceRequirements(requests=quantities, limits=dict(quantities)),
        "priority_class_name": k8s_env.priority_class,
        "service_account_name": pipeline.environment.team_service_account(team),
        "automount_service_account_token": False,
        "node_selector": dict(gpu.node_labels) if gpu is not None else None,
        "tolerations": [
            k8s.V1Toleration(**t.model_dump(exclude_none=True)) for t in k8s_env.gpu_tolerations(res.gpu_type)
        ]
        or None,
        "env_vars": env_vars,
        "env_from": [
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name))
            for name in pipeline.environment.team_credentials_secrets(team)
        ]
        or None,
        "volumes": [
            k8s.V1Volume(
                name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_size)
            ),
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
            k8s.V1Volume(name="cache", empty_dir=k8s.V1EmptyDirVolumeSource()),
            k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource()),
        ],
        "volume_mounts": [
            k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
            k8s.V1VolumeMount(name="cache", mount_path=CACHE_DIR),
            k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH_DIR),
        ],
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=k8s_env.run_as_user,
            run_as_group=k8s_env.run_as_group,
            fs_group=k8s_env.run_as_group,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            read_only_root_filesystem=True,
            run_as_non_root=True,
        ),
        "termination_grace_period": k8s_env.termination_grace_period_seconds,
        "active_deadline_seconds": timeout_seconds,
        "startup_timeout_seconds": k8s_env.startup_timeout_seconds,
        "deferrable": k8s_env.deferrable,
        "on_finish_action": k8s_env.on_finish_action,
        "on_kill_action": "delete_pod",
        "kubernetes_conn_id": k8s_env.connection_id,
        "in_cluster": k8s_env.in_cluster,
        "get_logs": True,
        "do_xcom_push": False,
        "reattach_on_restart": False,
        "log_events_on_failure": True,
        # The last lines of a failing trainer's log become the failure message Airflow shows.
        "termination_message_policy": "FallbackToLogsOnError",
    }


def _plain_env(pipeline: ResolvedPipeline) -> dict[str, str]:
    """The local launcher's env plus writable cache locations (the root filesystem is read-only),
    then the environment's ``kubernetes.env`` (NCCL and the like), which never replaces the former."""
    own = {
        **trainer_env(pipeline.environment.name),
        "HF_HOME": f"{CACHE_DIR}/huggingface",
        "TRAINYARD_SCRATCH": SCRATCH_DIR,
    }
    k8s_env = pipeline.environment.kubernetes
    extra = k8s_env.pod_env if k8s_env is not None else {}
    return {**own, **{name: value for name, value in extra.items() if name not in own}}
