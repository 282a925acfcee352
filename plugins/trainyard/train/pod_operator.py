"""The ``train`` task on Kubernetes: one DAG run trains in one pod, whatever the cluster does.

The pod itself is ``trainyard.train.pod`` (YAML only), what a failure means is
``trainyard.train.pod_failures`` and which pods a run owns is ``trainyard.train.one_pod``; this
module applies them to the provider's KubernetesPodOperator, at the points where the provider
alone would lose a pod (reattach, 404s, kills, timeouts) or count relaunches per try.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger
from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager, PodNotFoundException
from airflow.sdk import Context

from trainer.spec import TAG_CHECKPOINT_STEP
from trainyard.config.loading import ResolvedPipeline
from trainyard.cost import (
    XCOM_KEY,
    PodEnd,
    cost_line,
    find_training_run,
    log_cost,
    observed_times,
    progress_of,
    run_cost,
)
from trainyard.handoff import Approval, PipelineOperator
from trainyard.train.budget import BudgetSpent, deadline_for, seconds_left
from trainyard.train.one_pod import LAUNCH_ANNOTATION, RunPods, new_launch_id
from trainyard.train.pod import launch_argv, pod_kwargs, pod_labels
from trainyard.train.pod_failures import (
    Action,
    PodFailure,
    after_pod_failure,
    classify,
    classify_gone,
    has_run,
    refused_pod,
)
from trainyard.train.pod_trigger import (
    LAST_SEEN_KEY,
    QUEUE_TIMEOUT_KEY,
    QUEUE_WAIT_KEY,
    STARTED_KEY,
    TrainPodTrigger,
)
from trainyard.train.queue_wait import (
    QueueError,
    QueueFacts,
    QueueSettings,
    QueueWaitRecord,
    await_admission,
    queue_summary,
    queue_tags,
    read_facts_sync,
)
from trainyard.train.run_spec import run_spec
from trainyard.train.run_state import OwnedPod, RunState, StateStore, state_store

DEADLINE_MESSAGE = "execution_timeout deadline"
#: Events every pod gets (the kubelet's "Killing" follows whatever stopped it): not the cause.
ROUTINE_EVENTS = frozenset({"Scheduled", "Pulling", "Pulled", "Created", "Started", "Killing"})


class WatchedPodManager(PodManager):
    """The provider's PodManager, remembering what it last read of the pod and whether it ran.

    A deleted pod can no longer be read; what it showed before decides what its end means.
    """

    last_seen: Any = None
    ran = False
    #: Told of every read (the operator keeps each pod's start and end for its cost).
    observer: Any = None

    def read_pod(self, pod: Any) -> Any:
        remote = super().read_pod(pod)
        self.last_seen = remote
        self.ran = self.ran or has_run(remote)
        if self.observer is not None:
            self.observer(remote)
        return remote


class KubernetesTrainOperator(KubernetesPodOperator):
    """Runs the trainer in a GPU pod; a disruption relaunches it, anything else fails with its cause.

    * One run, one pod: before a pod is created every other pod of the DAG run is adopted (the
      one this run recorded, by UID) or deleted and waited for; a failing task deletes its
      still-active pod whatever ``on_finish_action`` says.
    * A disruption (preemption, drain, eviction, Kueue, a pod deleted while it ran) relaunches
      without spending a retry, up to ``max_preemption_relaunches`` per DAG run.
    * A kill is never a success, and each pod's ``activeDeadlineSeconds`` is what is left of the
      task's ``execution_timeout``.
    * Under Kueue a queued pod is a waiting run (``trainyard.train.queue_wait``): the task reports
      its place in the queue, the wait has its own bound and is recorded, and a Kueue preemption
      requeues the run without counting against the relaunch limit.
    * Every pod's times are kept in the run state and the run's GPU cost (``trainyard.cost``) is
      recorded when the task ends, however it ends: XCom ``cost`` and metrics on the MLflow run.
    """

    # Nothing is templated: every field comes from YAML or from the validated run spec, and Jinja in
    # a YAML value (an owner, say) must reach the pod as text, never as conf, variables or secrets.
    template_fields: Sequence[str] = ()
    template_ext: Sequence[str] = ()

    def __init__(self, *, pipeline: ResolvedPipeline, **kwargs: Any) -> None:
        queue = QueueSettings.for_pipeline(pipeline)
        #: The training part of execution_timeout (without the time a run may wait for quota).
        self.training_timeout: datetime.timedelta | None = kwargs.get("execution_timeout")
        if queue is not None and kwargs.get("execution_timeout") is not None:
            # Waiting for quota is not training: the task may also wait up to max_queue_wait_minutes,
            # while each pod's activeDeadlineSeconds (counted from its start) stays the training budget.
            kwargs["execution_timeout"] += datetime.timedelta(seconds=queue.max_wait_seconds)
        super().__init__(**pod_kwargs(pipeline), **kwargs)
        self.queue = queue
        self.pipeline = pipeline
        self.max_relaunches = pipeline.environment.kubernetes.max_preemption_relaunches  # type: ignore[union-attr]
        self._last_remote_pod: Any = None
        self._pod_gone = False
        self._stopped_by_airflow = False
        self._store: StateStore | None = None
        self._try_deadline: datetime.datetime | None = None
        self._costing = False
        self._times_saved: dict[str, tuple[Any, ...]] = {}

    @cached_property
    def pod_manager(self) -> PodManager:
        manager = WatchedPodManager(kube_client=self.client, callbacks=self.callbacks)
        manager.observer = self._note_pod
        return manager

    def prepare_run(self, context: Context, approved: Approval) -> None:
        """Fill in the command and labels of this DAG run (also used by ``trainyard render``)."""
        spec = run_spec(
            self.pipeline, approved, run_id=context["dag_run"].run_id, try_number=context["ti"].try_number
        )
        argv = launch_argv(self.pipeline, spec)
        self.cmds = [argv[0]]
        self.arguments = list(argv[1:])
        self.labels = {**self.labels, **pod_labels(self.pipeline, context["dag_run"].run_id)}

    # ------------------------------------------------------------------------------ the task's flow

    def execute(self, context: Context) -> Any:
        return self._costed(context, lambda: self._execute(context))

    def _execute(self, context: Context) -> Any:
        self.prepare_run(context, PipelineOperator.approval_to_train(context, self.log))
        while True:
            outcome = self._attempt(context, lambda: super(KubernetesTrainOperator, self).execute(context))
            if outcome is not _RELAUNCH:
                return outcome

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        return self._costed(context, lambda: self._trigger_reentry(context, event))

    def _trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        from airflow.sdk.exceptions import AirflowFailException

        if event.get(QUEUE_WAIT_KEY):
            self._note_queue_wait(context, QueueWaitRecord.model_validate(event[QUEUE_WAIT_KEY]))
        if event.get(QUEUE_TIMEOUT_KEY):
            self._stop_run_pods(context)
            self._publish_queue_waits(context)
            raise AirflowFailException(str(event.get("message")))
        if event.get("status") == "timeout" and DEADLINE_MESSAGE in str(event.get("message")):
            # The provider would follow the still-running pod's log until the pod's own deadline.
            self._stop_run_pods(context)
            raise _task_timeout(self.execution_timeout)
        outcome = self._attempt(
            context, lambda: super(KubernetesTrainOperator, self).trigger_reentry(context, event), event
        )
        if outcome is _RELAUNCH:
            return self.execute(context)  # defers again with a fresh pod
        return outcome

    def on_kill(self) -> None:
        # SIGTERM or "mark failed": the provider deletes the pod, and its wait then ends normally,
        # which would let execute return as if training had finished.
        self._stopped_by_airflow = True
        super().on_kill()

    # ------------------------------------------------------------------- the provider's hooks, owned

    def await_pod_start(self, pod: Any) -> None:
        """Under Kueue, wait for admission first: queue time is not startup time."""
        settings = self.queue
        if settings is not None:

            async def read_pod() -> Any:
                return self.pod_manager.read_pod(pod)

            async def read_facts(remote: Any) -> QueueFacts:
                return read_facts_sync(self.client.api_client, settings, remote)

            try:
                record = asyncio.run(
                    await_admission(settings, read_pod=read_pod, read_facts=read_facts, log=self.log)
                )
            except QueueError as exc:
                if exc.record is not None:
                    self._note_queue_wait(None, exc.record)
                raise
            if record is not None:
                self._note_queue_wait(None, record)
        super().await_pod_start(pod)

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> Any:
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        deadline = self._deadline(context) if context and not dry_run else None
        now = _now()
        left = seconds_left(deadline, now)
        if left is not None:
            assert context is not None and deadline is not None
            training = seconds_left(self._training_deadline(context, deadline), now)
            pod.spec.active_deadline_seconds = min(
                left, training or left, pod.spec.active_deadline_seconds or left
            )
        return pod

    def get_or_create_pod(self, pod_request_obj: Any, context: Context) -> Any:
        store = self._state_store(context)
        state = RunState.load(store)
        pods = self._run_pods(context)
        kept = pods.settle(state.pod.uid if state.pod else None)
        if kept is not None:
            self._note_pod(kept)
            return kept
        pod_request_obj.metadata.annotations = {
            **(pod_request_obj.metadata.annotations or {}),
            LAUNCH_ANNOTATION: new_launch_id(),
        }
        created = pods.create(pod_request_obj)
        meta = created.metadata
        owned = OwnedPod(namespace=meta.namespace, name=meta.name, uid=meta.uid)
        state = state.model_copy(update={"pod": owned})
        state.with_pod_time(
            uid=meta.uid, name=meta.name, times={"created_at": _now(), **observed_times(created)}
        ).save(store)
        return created

    def defer(
        self, *, trigger: Any, method_name: str, kwargs: dict | None = None, timeout: Any = None
    ) -> Any:
        if type(trigger) is KubernetesPodTrigger:
            queue = self.queue.model_dump(mode="json") if self.queue is not None else None
            trigger = TrainPodTrigger(queue=queue, **trigger.serialize()[1])
        deadline = self._try_deadline  # set when this pod's request was built
        if deadline is not None:
            # The provider anchors the trigger's deadline on the task instance's start date, which a
            # resumed (and relaunching) task does not always keep: use the try's own deadline.
            kwargs_ = {**(trigger.trigger_kwargs or {}), "_execution_deadline": int(deadline.timestamp())}
            trigger.trigger_kwargs = kwargs_
            timeout = deadline - _now() + datetime.timedelta(seconds=max(60, int(self.poll_interval * 2)))
        return super().defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def cleanup(
        self, pod: Any, remote_pod: Any, xcom_result: dict | None = None, context: Any = None
    ) -> None:
        # When the wait for the pod ended early (launch failure, timeout, a 404) ``remote_pod`` is
        # the copy read right after creation, still Pending: read the pod again so that the failure
        # is classified (and the pod kept or deleted) by its real state.
        remote_pod = self._refreshed(remote_pod)
        self._last_remote_pod = remote_pod
        if remote_pod is not None:
            self._note_pod(remote_pod)
        super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)

    # ------------------------------------------------------------------------------------- helpers

    def _refreshed(self, remote_pod: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        self._pod_gone = False
        phase = getattr(getattr(remote_pod, "status", None), "phase", None)
        if remote_pod is None or phase in ("Succeeded", "Failed"):
            return remote_pod
        try:
            return self.pod_manager.read_pod(remote_pod)
        except Exception as exc:  # best effort: classify what we have
            self._pod_gone = isinstance(exc, ApiException) and exc.status == 404
            if not self._pod_gone:
                self.log.warning("Could not re-read pod %s", remote_pod.metadata.name, exc_info=True)
            return remote_pod

    def _attempt(self, context: Context, run: Any, event: dict[str, Any] | None = None) -> Any:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
        from kubernetes.client.exceptions import ApiException

        self._last_remote_pod = None
        try:
            outcome = run()
        except TaskDeferred:
            raise  # deferrable mode: the pod keeps running and the trigger watches it
        except BudgetSpent as exc:
            raise _task_timeout(self.execution_timeout, str(exc)) from None
        except ApiException as exc:
            refusal = refused_pod(exc)
            if refusal is None or self._stopped_by_airflow:
                self._stop_run_pods(context)
                raise
            return self._after_failure(context, refusal, cause=None)
        except Exception as exc:
            queue_error = _in_chain(exc, QueueError, include_self=True)
            if queue_error is not None:
                self._stop_run_pods(context)
                self._publish_queue_waits(context)
                raise AirflowFailException(str(queue_error)) from None
            interruption = _interruption(exc)
            if interruption is not None or self._stopped_by_airflow:
                # A timeout or kill, under the provider's own "Pod ... returned a failure" from its
                # cleanup: stop the pod, re-raise the real cause.
                self._stop_run_pods(context)
                if interruption is not None:
                    raise interruption from None
                raise AirflowException(_STOPPED) from None
            failure = self._failure(exc, event)
            if failure is None:
                self._stop_run_pods(context)
                raise
            self._note_pod_end(context, self._ended_pod(event), failure)
            return self._after_failure(context, failure, cause=exc)
        except BaseException:
            self._stop_run_pods(context)  # timeouts and kills: the pod never outlives its task
            raise
        if self._stopped_by_airflow:
            raise AirflowException(_STOPPED)
        if self._last_remote_pod is not None:
            self._note_pod(self._last_remote_pod, end="succeeded", ended=True)
        self._publish_queue_waits(context)
        return outcome

    def _failure(self, exc: Exception, event: dict[str, Any] | None) -> PodFailure | None:
        """What ended the pod: its last state, or what was last seen of it if it is gone."""
        manager = self.pod_manager
        if self._last_remote_pod is not None:
            name = self._last_remote_pod.metadata.name
            if self._pod_gone:
                return classify_gone(
                    manager.last_seen, manager.ran, name, self.base_container_name, self._last_event(name)
                )
            return classify(self._last_remote_pod, self.base_container_name)
        if event is not None and isinstance(exc, PodNotFoundException):
            name = event["name"]
            return classify_gone(
                event.get(LAST_SEEN_KEY),
                bool(event.get(STARTED_KEY)),
                name,
                self.base_container_name,
                self._last_event(name),
            )
        return None

    def _last_event(self, name: str) -> str | None:
        """The newest telling event about a pod that is gone (events outlive it): who deleted it."""
        try:
            events = self.client.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={name}"
            ).items
        except Exception:  # best effort: the message is only less specific
            self.log.warning("Could not read the events of pod %s", name, exc_info=True)
            return None
        telling = [e for e in events if e.reason not in ROUTINE_EVENTS]
        if not telling:
            return None
        last = max(telling, key=lambda e: int(e.metadata.resource_version or 0))
        return f"{last.reason}: {last.message}"

    def _after_failure(self, context: Context, failure: PodFailure, cause: BaseException | None) -> Any:
        """Apply ``after_pod_failure``: return ``_RELAUNCH``, or stop the run's pod and raise."""
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        store = self._state_store(context)
        state = RunState.load(store)
        step = after_pod_failure(failure, state.relaunches, self.max_relaunches)
        if step.action is Action.RELAUNCH:
            if step.counted:
                state = state.model_copy(update={"relaunches": state.relaunches + 1})
            else:
                state = state.model_copy(update={"requeues": state.requeues + 1})
            state.save(store)
            self.log.warning("%s", step.message)
            self.pod = self.pod_request_obj = self.remote_pod = None
            self.pod_manager.last_seen, self.pod_manager.ran = None, False
            return _RELAUNCH
        self._stop_run_pods(context)
        error = AirflowFailException if step.action is Action.FAIL_PERMANENTLY else AirflowException
        raise error(step.message) from cause

    def _note_queue_wait(self, context: Context | None, record: QueueWaitRecord) -> None:
        """Keep the wait in the run state: it outlives relaunches (which queue again) and tries."""
        store = self._store if context is None else self._state_store(context)
        if store is None:
            return
        RunState.load(store).with_wait(record).save(store)

    def _publish_queue_waits(self, context: Context) -> None:
        """The run's waits for quota as XCom ``queue_waits`` and tags on its MLflow run (best effort)."""
        if self.queue is None:
            return
        waits = RunState.load(self._state_store(context)).queue_waits
        summary = queue_summary(waits)
        context["ti"].xcom_push(key="queue_waits", value=summary)
        try:
            from mlflow.tracking import MlflowClient

            from trainyard.promote.registry import find_candidate_run

            client = MlflowClient(tracking_uri=self.pipeline.environment.mlflow.tracking_uri)
            run = find_candidate_run(client, self.pipeline, context["dag_run"].run_id)
            for key, value in queue_tags(summary).items():
                client.set_tag(run.info.run_id, key, value)
        except Exception:  # the wait is in the XCom and the log; the MLflow run only lacks the tags
            self.log.warning("Could not record the queue wait on the MLflow run", exc_info=True)

    # ------------------------------------------------------------------------------- GPU cost

    def _note_pod(
        self, pod: Any, *, end: PodEnd | None = None, checkpoint_step: int | None = None, ended: bool = False
    ) -> None:
        """Keep what a read of one of the run's pods says of its times (and, at its end, how it ended).

        Pods are read every few seconds: the state is written only when something new was seen.
        ``ended``: the pod is over, and without a reported end it ended now (when the task saw it).
        Called from inside the provider's reads: it never raises (the run only loses a cost figure).
        """
        try:
            self._keep_pod_times(pod, end=end, checkpoint_step=checkpoint_step, ended=ended)
        except Exception:
            self.log.warning("Could not keep the times of a pod for the run's cost", exc_info=True)

    def _keep_pod_times(
        self, pod: Any, *, end: PodEnd | None, checkpoint_step: int | None, ended: bool
    ) -> None:
        store = self._store
        meta = pod.get("metadata") if isinstance(pod, dict) else getattr(pod, "metadata", None)
        name = (meta or {}).get("name") if isinstance(meta, dict) else getattr(meta, "name", None)
        uid = None if isinstance(meta, dict) else getattr(meta, "uid", None)
        if store is None or name is None:
            return
        times = observed_times(pod, self.base_container_name)
        key = (uid or name, tuple(sorted(times.items())), end, checkpoint_step, ended)
        if self._times_saved.get(uid or name) == key:
            return
        state = RunState.load(store)
        known = state.pod_time(uid=uid, name=name)
        if uid is None:
            if known is None:
                return  # a pod this run never recorded creating
            uid = known.uid
        if end == "stopped" and known is not None and known.end is not None:
            end = None  # deleted after its end was known: that end stands
        update: dict[str, Any] = {}
        if end is not None:
            update["end"] = end
        if checkpoint_step is not None:
            update["checkpoint_step"] = checkpoint_step
        new = state.with_pod_time(uid=uid, name=name, times=times, **update)
        record = new.pod_time(uid=uid)
        assert record is not None
        if ended and record.started_at is None and end in ("disrupted", "failed"):
            started = self._started_from_events(name)
            if started is not None:
                new = new.with_pod_time(uid=uid, name=name, started_at=started)
        if ended and record.ended_at is None:
            new = new.with_pod_time(uid=uid, name=name, ended_at=_now())
        if new != state:
            new.save(store)
        self._times_saved[uid or name] = key

    def _ended_pod(self, event: dict[str, Any] | None) -> Any:
        """The best read of the pod that just ended: its last state, or the last seen of a gone pod."""
        if self._last_remote_pod is not None:
            if self._pod_gone and self.pod_manager.last_seen is not None:
                return self.pod_manager.last_seen
            return self._last_remote_pod
        if event is not None:
            return event.get(LAST_SEEN_KEY) or {"metadata": {"name": event.get("name")}}
        return None

    def _note_pod_end(self, context: Context, pod: Any, failure: PodFailure) -> None:
        """A pod ended badly: keep its end; after a disruption also the step the trainer saved at."""
        if pod is None:
            return
        end: PodEnd = "disrupted" if failure.is_disruption else "failed"
        saved = self._checkpoint_step(context) if failure.is_disruption else None
        self._note_pod(pod, end=end, checkpoint_step=saved, ended=True)

    def _started_from_events(self, name: str) -> datetime.datetime | None:
        """When a pod that is gone started its container: its kubelet's "Started" event (best effort)."""
        try:
            events = self.client.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={name}"
            ).items
        except Exception:
            self.log.warning("Could not read the events of pod %s", name, exc_info=True)
            return None
        stamps = [
            e.first_timestamp or e.event_time or e.metadata.creation_timestamp
            for e in events
            if e.reason == "Started"
        ]
        stamps = [s for s in stamps if isinstance(s, datetime.datetime)]
        return min(stamps) if stamps else None

    def _mlflow_run(self, context: Context) -> tuple[Any, Any]:
        """(client, this DAG run's MLflow run or None)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.pipeline.environment.mlflow.tracking_uri)
        run = find_training_run(
            client,
            self.pipeline.experiment_name,
            pipeline=self.pipeline.name,
            environment=self.pipeline.environment.name,
            dag_run_id=context["dag_run"].run_id,
        )
        return client, run

    def _checkpoint_step(self, context: Context) -> int | None:
        """The step the trainer tagged as saved when its pod stopped (absent after a hard kill)."""
        try:
            _, run = self._mlflow_run(context)
        except Exception:
            self.log.warning("Could not read the checkpoint step from MLflow", exc_info=True)
            return None
        value = run.data.tags.get(TAG_CHECKPOINT_STEP) if run is not None else None
        return int(value) if value and value.isdigit() else None

    def _costed(self, context: Context, body: Any) -> Any:
        """Run ``body``; when the task ends (not when it defers), record the run's cost."""
        from airflow.sdk.exceptions import AirflowSkipException, TaskDeferred

        if self._costing:
            return body()  # a relaunch from trigger_reentry: the outer call records it
        self._state_store(context)  # a resumed task is a fresh operator: pod reads are kept from now on
        self._costing = True
        try:
            outcome = body()
        except (TaskDeferred, AirflowSkipException):
            raise
        except BaseException:
            self._publish_cost(context)
            raise
        finally:
            self._costing = False
        self._publish_cost(context)
        return outcome

    def _publish_cost(self, context: Context) -> None:
        """The run's GPU cost as XCom ``cost`` and on its MLflow run; never fails the task."""
        try:
            state = RunState.load(self._state_store(context))
            if not state.pods:
                return  # no pod was created: nothing was queued or ran
            env, resources = self.pipeline.environment, self.pipeline.config.resources
            client = run = history = resumed = None
            try:
                client, run = self._mlflow_run(context)
                if run is not None:
                    history, resumed = progress_of(client, run)
            except Exception:
                self.log.warning("Could not read the MLflow run for its cost", exc_info=True)
            cost = run_cost(
                state.pods,
                gpus=resources.gpus,
                gpu_type=resources.gpu_type,
                price_per_gpu_hour=env.price_per_gpu_hour(resources.gpu_type),
                currency=env.currency,
                now=_now(),
                queue_waits={w.pod: w.seconds for w in state.queue_waits},
                history=history,
                last_resumed_from=resumed,
            )
            context["ti"].xcom_push(key=XCOM_KEY, value=cost.model_dump(mode="json"))
            self.log.info("%s", cost_line(cost))
            if client is not None and run is not None:
                log_cost(client, run.info.run_id, cost)
            elif client is not None:
                self.log.warning("No MLflow run of this DAG run: its cost is only in the XCom")
        except Exception:
            self.log.warning("Could not record the cost of this run", exc_info=True)

    def _run_pods(self, context: Context) -> RunPods:
        labels = pod_labels(self.pipeline, context["dag_run"].run_id)
        self._state_store(context)
        return RunPods(
            client=self.client,
            namespace=self.namespace,
            selector=",".join(f"{k}={v}" for k, v in sorted(labels.items())),
            grace_seconds=int(self.termination_grace_period or 30),
            on_removed=lambda pod: self._note_pod(pod, end="stopped", ended=True),
        )

    def _stop_run_pods(self, context: Context) -> None:
        """Delete the run's Pending or Running pods and wait for them: none outlives a failed task."""
        try:
            self._run_pods(context).stop_active()
        except Exception:  # best effort: on_kill and activeDeadlineSeconds back this up
            self.log.exception("Could not stop the pods of this run")

    def _deadline(self, context: Context) -> datetime.datetime | None:
        """When this try's ``execution_timeout`` ends, fixed at the first look and kept in the run state."""
        if self.execution_timeout is None:
            return None
        store = self._state_store(context)
        state = RunState.load(store)
        try_number = context["ti"].try_number
        if state.try_number != try_number or state.deadline is None:
            deadline = deadline_for(
                getattr(context["ti"], "start_date", None), self.execution_timeout, _now()
            )
            state = state.model_copy(update={"try_number": try_number, "deadline": deadline})
            state.save(store)
        self._try_deadline = state.deadline
        return state.deadline

    def _training_deadline(self, context: Context, deadline: datetime.datetime) -> datetime.datetime | None:
        """When this try's training budget ends: its start, plus the training timeout, plus its queue waits.

        The task's timeout also covers waiting for quota; a pod relaunched after a preemption must
        not get that allowance as training time, only what is left of the training budget.
        """
        if self.queue is None or self.training_timeout is None or self.execution_timeout is None:
            return None
        started = deadline - self.execution_timeout
        waits = RunState.load(self._state_store(context)).queue_waits
        queued = sum(w.seconds for w in waits if w.started_at >= started)
        return started + self.training_timeout + datetime.timedelta(seconds=queued)

    def _state_store(self, context: Context) -> StateStore:
        if self._store is None:
            self._store = state_store(context)
        return self._store


_RELAUNCH = object()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


_STOPPED = (
    "train was stopped (SIGTERM, or marked failed) while its pod was training; the pod was deleted and "
    "a retry resumes from the last checkpoint"
)


def _task_timeout(timeout: datetime.timedelta | None, detail: str | None = None) -> BaseException:
    from airflow.sdk.exceptions import AirflowTaskTimeout

    return AirflowTaskTimeout(
        f"train ran past its execution_timeout ({timeout}); its pod was deleted"
        + (f": {detail}" if detail else "")
    )


def _interruption(exc: BaseException) -> BaseException | None:
    """The task timeout or kill (never an ``Exception``) that ``exc`` was raised while handling."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    return _in_chain(exc, (AirflowTaskTimeout, KeyboardInterrupt, SystemExit))


def _in_chain(
    exc: BaseException, kinds: type | tuple[type, ...], *, include_self: bool = False
) -> BaseException | None:
    """The first exception of ``kinds`` that ``exc`` is, or was raised while handling.

    The provider's cleanup raises its own "Pod ... returned a failure" from a ``finally``, on top
    of what really stopped the wait.
    """
    seen: set[int] = set()
    current = exc if include_self else exc.__context__
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__context__
    return None
