"""What one training run costs in GPU time: queued, running, lost to preemption, and its price.

Everything here works on data (or on an MLflow client it is given, never one it builds), so the
arithmetic is tested as a table and the ``train`` task, ``trainyard report`` and the promote step
read and write the same names.

How each number is measured (docs/architecture.md, "What a run costs"):

* **Pods.** Every pod the DAG run created, over all relaunches and Airflow retries, is one
  :class:`PodTime` in the run state (``trainyard.train.run_state``): its creation, its container's
  start and end as the API server reports them, and how it ended. A local launcher's trainer
  process is one such record too.
* **Queued** (per pod): creation -> container start. Under Kueue that is the wait for admission
  plus scheduling and image pull; a pod that never started counts its Kueue wait
  (``QueueWaitRecord``) or, without one, creation -> its end.
* **Running** (per pod): container start -> container end (or, when the end was never read, the
  moment the task saw the pod gone). Summed over every pod, preempted ones and retries included.
* **Lost** (per disrupted pod that a later pod followed): the time it spent on steps the later pod
  did again, i.e. its end minus the moment it passed the step the later pod resumed from. That
  step is, in order of preference: the trainer's ``trainyard.checkpoint_step`` read right after the
  pod ended (the trainer saves on SIGTERM and tags the step: a graceful preemption loses only the
  save and the shutdown), the MLflow run's ``trainyard.resumed_from_step`` for the last pod, or
  else the newest step the disrupted pod logged below the first step a later pod logged (an
  over-estimate by at most one logging interval). The moment is read from the run's ``loss``
  metric history (step, timestamp): exactly at a logged step, interpolated between two, or
  extrapolated at the pod's own pace, never outside the pod's run. A pod that logged no step at
  all loses its whole running time (it was setting up, which the next pod did again). Lost time
  is part of running time, never added to it.
* **GPU-seconds** of each kind are seconds x GPUs per pod; **cost** prices what the cluster pays
  for, the GPU-hours running (lost included), at the environment's ``gpu_hour_price`` for the
  pod's GPU type; a gated or Pending pod holds no GPU, so queued time is recorded, not priced.
  No price set: cost is None.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import Field, computed_field

from trainer.spec import TAG_ENVIRONMENT, TAG_PIPELINE, TAG_RESUMED_FROM_STEP, TAG_RUN_ID, StrictModel

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

#: Metrics on the run's MLflow run (GPU-seconds, and the cost in ``TAG_CURRENCY``).
METRIC_GPU_SECONDS_QUEUED = "trainyard.gpu_seconds.queued"
METRIC_GPU_SECONDS_RUNNING = "trainyard.gpu_seconds.running"
METRIC_GPU_SECONDS_LOST = "trainyard.gpu_seconds.lost"
METRIC_COST = "trainyard.cost"
#: Wall-clock seconds of the same three (GPU-seconds divided by the GPUs of a pod, kept for 0 GPUs).
METRIC_SECONDS_QUEUED = "trainyard.seconds.queued"
METRIC_SECONDS_RUNNING = "trainyard.seconds.running"
METRIC_SECONDS_LOST = "trainyard.seconds.lost"
TAG_GPU_TYPE = "trainyard.gpu_type"
TAG_GPUS = "trainyard.gpus"
TAG_CURRENCY = "trainyard.currency"
TAG_PODS = "trainyard.pods"
TAG_PRICE = "trainyard.gpu_hour_price"
#: Model-version tags made by :func:`cost_tags`.
TAG_GPU_HOURS_QUEUED = "trainyard.gpu_hours.queued"
TAG_GPU_HOURS_RUNNING = "trainyard.gpu_hours.running"
TAG_GPU_HOURS_LOST = "trainyard.gpu_hours.lost"
#: The ``train`` task's XCom with the :class:`RunCost`.
XCOM_KEY = "cost"
#: The step metric whose history places the trainer's progress in time (``trainer.tracking``).
PROGRESS_METRIC = "loss"
#: What a GPU type without a name is called in tags and reports (the price key too).
DEFAULT_GPU_TYPE = "default"

PodEnd = Literal["succeeded", "disrupted", "failed", "stopped"]


class PodTime(StrictModel):
    """One pod of the run (or one local trainer process), as the task saw it; times are UTC."""

    pod: str
    uid: str
    created_at: datetime | None = None
    started_at: datetime | None = Field(None, description="Its container started (never, if None).")
    ended_at: datetime | None = Field(None, description="Its container ended, or when the task saw it end.")
    end: PodEnd | None = Field(None, description="None while it runs.")
    checkpoint_step: int | None = Field(
        None,
        description="The trainer's trainyard.checkpoint_step right after a disruption: the next pod's start.",
    )


class StepPoint(NamedTuple):
    """One logged training step: its number and when it was logged (seconds since the epoch)."""

    step: int
    at: float


class RunCost(StrictModel):
    """The GPU time of one DAG run's training, all pods and tries together, and its price."""

    gpus: int = Field(ge=0, description="GPUs per pod (0 for a local process).")
    gpu_type: str | None = None
    pods: int = Field(0, ge=0)
    queued_seconds: float = Field(ge=0)
    running_seconds: float = Field(ge=0)
    lost_seconds: float | None = Field(None, ge=0, description="None when the run's progress was unreadable.")
    price_per_gpu_hour: float | None = None
    currency: str = "USD"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_seconds_queued(self) -> float:
        return round(self.queued_seconds * self.gpus, 3)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_seconds_running(self) -> float:
        return round(self.running_seconds * self.gpus, 3)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpu_seconds_lost(self) -> float | None:
        return None if self.lost_seconds is None else round(self.lost_seconds * self.gpus, 3)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cost(self) -> float | None:
        """GPU-hours running (lost included) x the price; queued GPUs are not billed."""
        if self.price_per_gpu_hour is None:
            return None
        return round(self.gpu_seconds_running / 3600 * self.price_per_gpu_hour, 6)


# ----------------------------------------------------------------------------------- arithmetic


def _seconds(start: datetime | None, end: datetime | None) -> float:
    if start is None or end is None:
        return 0.0
    return max((end - start).total_seconds(), 0.0)


def pod_seconds(pod: PodTime, now: datetime, queue_wait: float | None = None) -> tuple[float, float]:
    """(queued, running) seconds of one pod; one without an end ends ``now``."""
    end = pod.ended_at or now
    if pod.started_at is None:
        queued = queue_wait if queue_wait is not None else _seconds(pod.created_at, end)
        return queued, 0.0
    return _seconds(pod.created_at, pod.started_at), _seconds(pod.started_at, end)


def _owners(started: list[PodTime], history: Iterable[StepPoint]) -> list[list[StepPoint]]:
    """Each started pod's logged steps: a step belongs to the last pod started at or before it."""
    starts = [p.started_at.timestamp() for p in started if p.started_at is not None]
    points: list[list[StepPoint]] = [[] for _ in started]
    for point in sorted(history, key=lambda p: p.at):
        index = bisect.bisect_right(starts, point.at) - 1
        if index >= 0:
            points[index].append(point)
    return points


def _pace(points: list[StepPoint]) -> float | None:
    """Seconds per step over the pod's logged steps (None with fewer than two distinct steps)."""
    if len(points) < 2 or points[-1].step == points[0].step:
        return None
    return (points[-1].at - points[0].at) / (points[-1].step - points[0].step)


def passed_step(points: list[StepPoint], step: int, start: float, end: float) -> float:
    """When a pod (its logged ``points``, its run ``start``..``end``) passed ``step``."""
    if not points:
        return start
    pace = _pace(points)
    before = [p for p in points if p.step <= step]
    after = [p for p in points if p.step > step]
    if before and after:
        a, b = before[-1], after[0]
        at = a.at + (b.at - a.at) * (step - a.step) / (b.step - a.step)
    elif before:
        a = before[-1]
        at = a.at + (step - a.step) * pace if pace is not None else a.at
    else:
        b = after[0]
        at = b.at - (b.step - step) * pace if pace is not None else start
    return min(max(at, start), end)


def lost_seconds(
    pods: list[PodTime],
    history: list[StepPoint] | None,
    last_resumed_from: int | None,
    now: datetime,
) -> float | None:
    """Seconds of work that a later pod did again, over every disrupted pod (module docstring).

    ``last_resumed_from`` is the step the last started pod resumed from (0: it started afresh;
    None: not known). ``history`` None: the run's progress could not be read, and neither can this.
    """
    if history is None:
        return None
    started = [p for p in pods if p.started_at is not None]
    started.sort(key=lambda p: p.started_at or now)
    owned = _owners(started, history)
    total = 0.0
    for index, pod in enumerate(started):
        if pod.end != "disrupted" or index == len(started) - 1:
            continue  # nothing was done again (yet): a later try may still follow it
        assert pod.started_at is not None
        start, end = pod.started_at.timestamp(), (pod.ended_at or now).timestamp()
        points = owned[index]
        resumed = pod.checkpoint_step
        if resumed is None and index == len(started) - 2:
            resumed = last_resumed_from
        if resumed is None:
            later = [p.step for pts in owned[index + 1 :] for p in pts]
            if not later:
                continue  # no later pod logged a step: nothing known to be done again
            kept = [p.step for p in points if p.step < min(later)]
            resumed = max(kept) if kept else None
        at = start if resumed is None else passed_step(points, resumed, start, end)
        total += max(end - at, 0.0)
    return round(total, 3)


def run_cost(
    pods: list[PodTime],
    *,
    gpus: int,
    gpu_type: str | None,
    price_per_gpu_hour: float | None,
    currency: str,
    now: datetime,
    queue_waits: Mapping[str, float] | None = None,
    history: list[StepPoint] | None = None,
    last_resumed_from: int | None = None,
) -> RunCost:
    """The run's cost from its pods; ``queue_waits`` are Kueue's measured waits by pod name."""
    waits = queue_waits or {}
    queued = running = 0.0
    for pod in pods:
        q, r = pod_seconds(pod, now, waits.get(pod.pod))
        queued, running = queued + q, running + r
    return RunCost(
        gpus=gpus,
        gpu_type=gpu_type,
        pods=len(pods),
        queued_seconds=round(queued, 3),
        running_seconds=round(running, 3),
        lost_seconds=lost_seconds(pods, history, last_resumed_from, now),
        price_per_gpu_hour=price_per_gpu_hour,
        currency=currency,
    )


def _hm(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{seconds:.0f}s"


def cost_line(cost: RunCost) -> str:
    """The task log's account of a run's cost."""
    gpus = f"{cost.gpus} x {cost.gpu_type or DEFAULT_GPU_TYPE} GPU" if cost.gpus else "no GPU"
    lost = "unknown" if cost.lost_seconds is None else _hm(cost.lost_seconds)
    price = (
        f"{cost.cost:.2f} {cost.currency} at {cost.price_per_gpu_hour:g} per GPU-hour"
        if cost.cost is not None and cost.price_per_gpu_hour is not None
        else "no price set"
    )
    return (
        f"GPU time of this run ({cost.pods} pod(s), {gpus} each): queued {_hm(cost.queued_seconds)}, "
        f"running {_hm(cost.running_seconds)} (lost to preemption {lost}); cost {price}"
    )


# ---------------------------------------------------------------------------- pods as observed


def _get(obj: Any, *names: str) -> Any:
    """``obj.a.b`` of a V1Pod, or ``obj["a"]["b"]`` of its dict form (snake_case or camelCase)."""
    for name in names:
        if obj is None:
            return None
        if isinstance(obj, dict):
            camel = name.split("_")[0] + "".join(part.title() for part in name.split("_")[1:])
            obj = obj.get(name, obj.get(camel))
        else:
            obj = getattr(obj, name, None)
    return obj


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value and value != "None":
        try:
            return _time(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def observed_times(pod: Any, container: str = "base") -> dict[str, datetime]:
    """What a read of a pod says of its times: ``created_at``, ``started_at``, ``ended_at`` (if known)."""
    times: dict[str, datetime] = {}
    created = _time(_get(pod, "metadata", "creation_timestamp"))
    if created is not None:
        times["created_at"] = created
    statuses = _get(pod, "status", "container_statuses") or []
    state = next((_get(s, "state") for s in statuses if _get(s, "name") in (container, None)), None)
    started = _time(_get(state, "running", "started_at")) or _time(_get(state, "terminated", "started_at"))
    finished = _time(_get(state, "terminated", "finished_at"))
    if started is not None:
        times["started_at"] = started
    if finished is not None:
        times["ended_at"] = finished
    return times


def merge_times(record: PodTime, times: Mapping[str, datetime]) -> PodTime:
    """``record`` with what it did not know yet (a start is never moved, an end only by a real one)."""
    update = {k: v for k, v in times.items() if getattr(record, k) is None or k == "ended_at"}
    return record.model_copy(update=update) if update else record


# ---------------------------------------------------------------------------------- MLflow names


def metrics_of(cost: RunCost) -> dict[str, float]:
    """The cost's MLflow metrics (a cost without a price, or an unknown loss, is not logged)."""
    metrics = {
        METRIC_GPU_SECONDS_QUEUED: cost.gpu_seconds_queued,
        METRIC_GPU_SECONDS_RUNNING: cost.gpu_seconds_running,
        METRIC_SECONDS_QUEUED: cost.queued_seconds,
        METRIC_SECONDS_RUNNING: cost.running_seconds,
    }
    if cost.lost_seconds is not None and cost.gpu_seconds_lost is not None:
        metrics[METRIC_GPU_SECONDS_LOST] = cost.gpu_seconds_lost
        metrics[METRIC_SECONDS_LOST] = cost.lost_seconds
    if cost.cost is not None:
        metrics[METRIC_COST] = cost.cost
    return metrics


def tags_of(cost: RunCost) -> dict[str, str]:
    tags = {
        TAG_GPU_TYPE: cost.gpu_type or DEFAULT_GPU_TYPE,
        TAG_GPUS: str(cost.gpus),
        TAG_CURRENCY: cost.currency,
        TAG_PODS: str(cost.pods),
    }
    if cost.price_per_gpu_hour is not None:
        tags[TAG_PRICE] = f"{cost.price_per_gpu_hour:g}"
    return tags


def _hours(gpu_seconds: float) -> str:
    return f"{gpu_seconds / 3600:.4f}"


def cost_tags(run: Run) -> dict[str, str]:
    """Model-version tags of the cost a run recorded (``{}`` for a run that recorded none).

    ``trainyard.cost`` (absent without a price), ``trainyard.currency``, ``trainyard.gpu_hours.queued``,
    ``.running`` and ``.lost`` (4 decimals), ``trainyard.gpu_type`` and ``trainyard.gpus``.
    """
    metrics, tags = run.data.metrics, run.data.tags
    if METRIC_GPU_SECONDS_RUNNING not in metrics:
        return {}
    out = {
        TAG_GPU_HOURS_QUEUED: _hours(metrics.get(METRIC_GPU_SECONDS_QUEUED, 0.0)),
        TAG_GPU_HOURS_RUNNING: _hours(metrics[METRIC_GPU_SECONDS_RUNNING]),
    }
    if METRIC_GPU_SECONDS_LOST in metrics:
        out[TAG_GPU_HOURS_LOST] = _hours(metrics[METRIC_GPU_SECONDS_LOST])
    if METRIC_COST in metrics:
        out[METRIC_COST] = f"{metrics[METRIC_COST]:.2f}"
    for key in (TAG_CURRENCY, TAG_GPU_TYPE, TAG_GPUS):
        if key in tags:
            out[key] = tags[key]
    return out


# ------------------------------------------------------------------------ MLflow, client injected


def find_training_run(
    client: MlflowClient, experiment_name: str, *, pipeline: str, environment: str, dag_run_id: str
) -> Run | None:
    """The newest MLflow run of this DAG run, whatever its status (relaunches continue one run)."""
    from trainyard.promote.registry import runs_tagged

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    wanted = {TAG_RUN_ID: dag_run_id, TAG_PIPELINE: pipeline, TAG_ENVIRONMENT: environment}
    matching = runs_tagged(client, experiment.experiment_id, wanted)
    return matching[0] if matching else None


def progress_of(client: MlflowClient, run: Run) -> tuple[list[StepPoint], int]:
    """The run's logged steps in time, and the step its last pod resumed from (0: from scratch)."""
    history = client.get_metric_history(run.info.run_id, PROGRESS_METRIC)
    points = [StepPoint(int(m.step), m.timestamp / 1000) for m in history]
    resumed = run.data.tags.get(TAG_RESUMED_FROM_STEP)
    return points, int(resumed) if resumed and resumed.isdigit() else 0


def log_cost(client: MlflowClient, run_id: str, cost: RunCost) -> None:
    """Record the cost on the run: metrics at step 0 (a later try logs newer values), tags."""
    from mlflow.entities import Metric, RunTag

    stamp = int(datetime.now(UTC).timestamp() * 1000)
    metrics = [
        Metric(key, value, stamp, 0) for key, value in metrics_of(cost).items() if math.isfinite(value)
    ]
    tags = [RunTag(key, value) for key, value in tags_of(cost).items()]
    client.log_batch(run_id, metrics=metrics, tags=tags)
