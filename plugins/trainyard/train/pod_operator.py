"""The ``train`` task on Kubernetes: a KubernetesPodOperator whose pod is derived from YAML only.

Everything security-relevant (image, namespace, PriorityClass, service account, command,
resources) comes from the environment and pipeline files; the trigger conf reaches the pod only
as validated hyperparameters inside the JSON run spec argument: overrides cannot escalate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Context
from kubernetes.client import Configuration
from kubernetes.client import models as _models

from trainer.spec import PERMANENT_EXIT_CODES, RunSpec
from trainyard.config.loading import ResolvedPipeline
from trainyard.handoff import Approval, PipelineOperator
from trainyard.train.launch import LaunchSpec, trainer_env
from trainyard.train.local import run_spec_for

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
    """``python -m trainer ...``, or torchrun with one process per GPU when the pod has several."""
    argv = LaunchSpec.for_run(spec).argv
    gpus = pipeline.config.resources.gpus
    if gpus > 1:
        # torchrun SIGKILLs its workers 30 s after forwarding SIGTERM unless told otherwise; give them
        # the pod's grace period (less a margin) to save and upload the checkpoint.
        grace = pipeline.environment.kubernetes.termination_grace_period_seconds  # type: ignore[union-attr]
        return (
            "torchrun",
            "--standalone",
            f"--nproc_per_node={gpus}",
            f"--shutdown-timeout={max(grace - 15, 5)}",
            *argv[1:],
        )
    return argv


def pod_labels(pipeline: ResolvedPipeline, run_id: str | None = None) -> dict[str, str]:
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
    quantities = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        quantities["nvidia.com/gpu"] = str(res.gpus)
    secrets = k8s_env.secrets
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
        "labels": pod_labels(pipeline),
        "annotations": {f"{LABEL_PREFIX}/owner": pipeline.config.owner},
        "container_resources": k8s.V1ResourceRequirements(requests=quantities, limits=dict(quantities)),
        "priority_class_name": k8s_env.priority_class,
        "service_account_name": k8s_env.service_account,
        "automount_service_account_token": False,
        "node_selector": dict(k8s_env.gpu_node_selectors.get(res.gpu_type or "", {})) or None,
        "tolerations": [k8s.V1Toleration(**t.model_dump(exclude_none=True)) for t in k8s_env.tolerations]
        or None,
        "env_vars": env_vars,
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=n)) for n in secrets.env_from]
        or None,
        "volumes": [
            k8s.V1Volume(
                name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=res.shm_size)
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
    """The local launcher's env plus writable cache locations (the root filesystem is read-only)."""
    return {
        **trainer_env(pipeline.environment.name),
        "HF_HOME": f"{CACHE_DIR}/huggingface",
        "TRAINYARD_SCRATCH": SCRATCH_DIR,
    }


class KubernetesTrainOperator(KubernetesPodOperator):
    """Runs the trainer in a GPU pod and relaunches it when the cluster preempts or evicts it.

    The run spec is computed at run time, never templated. A relaunch does not spend an Airflow
    retry: the trainer resumes from the last checkpoint of the same DAG run. Genuine failures
    (non-zero exit, OOMKilled, image pull errors, refused pods) fail with their cause.
    """

    # Nothing is templated: every field comes from YAML or from the validated run spec, and Jinja in
    # a YAML value (an owner, say) must reach the pod as text, never as conf, variables or secrets.
    template_fields: Sequence[str] = ()
    template_ext: Sequence[str] = ()

    def __init__(self, *, pipeline: ResolvedPipeline, **kwargs: Any) -> None:
        super().__init__(**pod_kwargs(pipeline), **kwargs)
        self.pipeline = pipeline
        self.max_relaunches = pipeline.environment.kubernetes.max_preemption_relaunches  # type: ignore[union-attr]
        self._last_remote_pod: Any = None

    def prepare_run(self, context: Context, approved: Approval) -> None:
        """Fill in the command and labels of this DAG run (also used by ``trainyard render``)."""
        spec = run_spec_for(self.pipeline, context, approved)
        argv = launch_argv(self.pipeline, spec)
        self.cmds = [argv[0]]
        self.arguments = list(argv[1:])
        self.labels = {**self.labels, **pod_labels(self.pipeline, context["dag_run"].run_id)}

    def execute(self, context: Context) -> Any:
        self.prepare_run(context, PipelineOperator.approval(context))
        while True:
            outcome = self._attempt(context, lambda: super(KubernetesTrainOperator, self).execute(context))
            if outcome is not _RELAUNCH:
                return outcome

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        outcome = self._attempt(
            context, lambda: super(KubernetesTrainOperator, self).trigger_reentry(context, event)
        )
        if outcome is _RELAUNCH:
            return self.execute(context)  # defers again with a fresh pod
        return outcome

    def cleanup(
        self, pod: Any, remote_pod: Any, xcom_result: dict | None = None, context: Any = None
    ) -> None:
        # When the wait for the pod ended early (launch failure, timeout) ``remote_pod`` is the copy
        # read right after creation, still Pending: read the pod again so that the failure is
        # classified (and the pod kept or deleted) by its real state, before cleanup may delete it.
        remote_pod = self._refreshed(remote_pod)
        self._last_remote_pod = remote_pod
        super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)

    def _refreshed(self, remote_pod: Any) -> Any:
        phase = getattr(getattr(remote_pod, "status", None), "phase", None)
        if remote_pod is None or phase in ("Succeeded", "Failed"):
            return remote_pod
        try:
            return self.pod_manager.read_pod(remote_pod)
        except Exception:  # best effort: classify what we have
            self.log.warning("Could not re-read pod %s", remote_pod.metadata.name, exc_info=True)
            return remote_pod

    def _attempt(self, context: Context, run: Any) -> Any:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
        from kubernetes.client.exceptions import ApiException

        from trainyard.train.pod_failures import api_refusal, classify

        self._last_remote_pod = None
        try:
            return run()
        except TaskDeferred:
            raise  # deferrable mode: the pod keeps running and the trigger watches it
        except ApiException as exc:
            refusal = api_refusal(exc)
            if refusal is None:
                raise
            # A refused pod never started; an unknown PriorityClass or an invalid spec will not fix itself.
            permanent = exc.status == 422 or "PriorityClass" in refusal
            error = AirflowFailException if permanent else AirflowException
            raise error(f"Kubernetes refused the training pod: {refusal}") from None
        except Exception as exc:
            interruption = _interruption(exc)
            if interruption is not None:
                # The pod operator's cleanup (a ``finally:``) raised "Pod ... returned a failure" for
                # the still-running pod over a timeout or kill: delete the pod, re-raise the real cause.
                self._delete_active_pod()
                raise interruption from None
            if self._last_remote_pod is None:
                raise
            failure = classify(self._last_remote_pod, self.base_container_name)
            relaunches = self._relaunch_count(context)
            if failure.is_disruption and relaunches < self.max_relaunches:
                self._store_relaunch_count(context, relaunches + 1)
                self.log.warning(
                    "%s. Relaunching (%d/%d, no Airflow retry used); the trainer resumes from its last "
                    "checkpoint.",
                    failure.message,
                    relaunches + 1,
                    self.max_relaunches,
                )
                self.pod = self.pod_request_obj = self.remote_pod = None
                return _RELAUNCH
            if failure.is_disruption:
                message = (
                    f"{failure.message}; gave up after {relaunches} relaunches (max_preemption_relaunches)"
                )
            else:
                message = failure.message
            # A bad spec or bad input fails the same way on every retry: do not spend them.
            error = AirflowFailException if failure.exit_code in PERMANENT_EXIT_CODES else AirflowException
            raise error(f"Training pod failed: {message}") from exc
        except BaseException:
            self._delete_active_pod()  # timeouts and kills: the pod never outlives its task
            raise

    def _delete_active_pod(self) -> None:
        pod = self.pod
        if pod is None:
            return
        try:
            remote = self.pod_manager.read_pod(pod)
            if remote.status and remote.status.phase in ("Pending", "Running"):
                self.log.warning("Deleting still-active pod %s", pod.metadata.name)
                self.pod_manager.delete_pod(remote)
        except Exception:  # best effort: on_kill and activeDeadlineSeconds back this up
            self.log.exception("Could not delete pod %s", pod.metadata.name)

    def _relaunch_count(self, context: Context) -> int:
        value = context["ti"].xcom_pull(task_ids=self.task_id, key=RELAUNCH_KEY)
        return int(value or 0)

    def _store_relaunch_count(self, context: Context, count: int) -> None:
        context["ti"].xcom_push(key=RELAUNCH_KEY, value=count)


RELAUNCH_KEY = "trainyard_relaunches"
_RELAUNCH = object()


def _interruption(exc: BaseException) -> BaseException | None:
    """The task timeout or kill (never an ``Exception``) that ``exc`` was raised while handling."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    seen: set[int] = set()
    current = exc.__context__
    while current is not None and id(current) not in seen:
        if isinstance(current, AirflowTaskTimeout | KeyboardInterrupt | SystemExit):
            return current
        seen.add(id(current))
        current = current.__context__
    return None
