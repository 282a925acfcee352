"""The ``train`` task on Kubernetes: a KubernetesPodOperator that relaunches preempted pods.

The pod itself is ``trainyard.train.pod`` (YAML only) and what to do after a failure is
``trainyard.train.pod_failures.after_pod_failure``; this module only applies them to Airflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Context

from trainyard.config.loading import ResolvedPipeline
from trainyard.handoff import Approval, PipelineOperator
from trainyard.train.pod import launch_argv, pod_kwargs, pod_labels
from trainyard.train.pod_failures import Action, PodFailure, after_pod_failure, classify, refused_pod
from trainyard.train.run_spec import run_spec


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
        spec = run_spec(
            self.pipeline, approved, run_id=context["dag_run"].run_id, try_number=context["ti"].try_number
        )
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
        from airflow.sdk.exceptions import TaskDeferred
        from kubernetes.client.exceptions import ApiException

        self._last_remote_pod = None
        try:
            return run()
        except TaskDeferred:
            raise  # deferrable mode: the pod keeps running and the trigger watches it
        except ApiException as exc:
            refusal = refused_pod(exc)
            if refusal is None:
                raise
            return self._after_failure(context, refusal, cause=None)
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
            return self._after_failure(context, failure, cause=exc)
        except BaseException:
            self._delete_active_pod()  # timeouts and kills: the pod never outlives its task
            raise

    def _after_failure(self, context: Context, failure: PodFailure, cause: BaseException | None) -> Any:
        """Apply ``after_pod_failure``: return ``_RELAUNCH``, or raise the error it chose."""
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        relaunches = self._relaunch_count(context)
        step = after_pod_failure(failure, relaunches, self.max_relaunches)
        if step.action is Action.RELAUNCH:
            self._store_relaunch_count(context, relaunches + 1)
            self.log.warning("%s", step.message)
            self.pod = self.pod_request_obj = self.remote_pod = None
            return _RELAUNCH
        error = AirflowFailException if step.action is Action.FAIL_PERMANENTLY else AirflowException
        raise error(step.message) from cause

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
