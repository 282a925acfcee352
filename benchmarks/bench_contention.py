"""GPU contention: more training runs than GPUs, from several teams, in dev and prod, under Kueue.

    .venv/bin/python benchmarks/bench_contention.py --quick      # 12 runs over ~20 s (< 3 min, 2 cores)
    .venv/bin/python benchmarks/bench_contention.py              # 30 runs over ~60 s
    .venv/bin/python benchmarks/bench_contention.py --runs 20 --seed 3

A seeded arrival schedule: ``--runs`` DAG runs (half dev, half prod, as many of each of the teams
a, b and c, 1 GPU each, fake training of a few seconds) arrive at random over a time window, more
than the cohort's 4 GPUs can take at once. Each run's ``train`` task is the real
``KubernetesTrainOperator`` (sync mode), executed in a thread of this process; the same schedule is
played twice, each time on a fresh cluster:

* **kueue** (what is measured): ``kubernetes.scheduling: kueue``. The ClusterQueues (one per
  environment and team, one cohort: prod's teams own the GPUs, nominal a=2, b=1, c=1; dev's teams
  own none and borrow any idle one), LocalQueues, ResourceFlavors, PriorityClasses and
  WorkloadPriorityClasses are rendered by our chart ``helm-values/trainyard-cluster`` from this
  benchmark's environment files, with the shipped dev and prod values (so preemption is the
  chart's: prod reclaims lent GPUs, dev never evicts anything).
* **baseline** (today's behaviour without Kueue, measured in the same run): ``kubernetes.scheduling:
  priority`` and a namespace ResourceQuota of each environment's GPUs (the same GPUs split
  statically, half dev, half prod). A pod over its quota is refused at creation and its task fails.

Reported for each, side by side: runs that succeeded and failed, that had to wait for quota
(``queued``) and that Kueue preempted at least once (``preempted``); the fraction of the GPU
capacity in use during the time some run was waiting for quota (``gpu_busy_fraction``; none
without Kueue: nothing waits there) and over the whole run (``gpu_busy_fraction_overall``); the
95th percentile of each environment's queue wait per run (``p95_wait_s``: the waits the operator
records in its run state, relaunches included; ``p95_wait_until_admitted_s``: the same waits on
Kueue's clock, from the pod's creation to its Workload's admission, without the operator's
polling); and per team its share of the GPU-seconds used against its nominal share (its
guaranteed GPUs over the cohort's) and its share of the GPU-seconds asked for. Targets, for the
kueue side: no run fails, prod's p95 wait below dev's, GPUs busy at least 90% of the time work is
waiting; the exit status is 1 if one is missed. The table ends with one JSON line (kueue's
numbers, the baseline's under ``baseline``).

Real: the operator (its relaunch loop, its wait for Kueue admission with status reports, its run
state), the ``kubernetes`` client over HTTP, the provider's KubernetesPodOperator, pipelines and
environments loaded from YAML by ``trainyard.config.loading``, the chart-rendered Kueue objects.
Emulated (``tests/support/k8s_emulator``, see its docstring): the API server, the kubelet (each pod
is a local ``python -c "time.sleep(...)"`` process) and Kueue's controller (admission, cohort
borrowing, preemption). Not under test: Airflow's scheduler, workers and metadata DB (each task
gets a minimal hand-built context, and ``validate_data``'s approval is a stub), the trainer (a
preempted run sleeps its full time again; the real trainer resumes from its last checkpoint), and
node capacity (Kueue's quota is the only GPU limit). GPU-seconds are Kueue's admissions
(``admission_log``: a workload holds its GPUs from ``admitted`` to ``preempted``/``finished``)
under Kueue, and the containers' running time (``container_runs``) in the baseline, where quota is
held while the pod exists. The operators' logs go to ``benchmarks/.out/bench_contention-<mode>.log``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / ".out"
sys.path.insert(0, str(ROOT))  # tests.support: the emulator and the chart renderer
os.environ.setdefault("AIRFLOW_HOME", str(OUT / "airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ENVIRONMENTS = ("dev", "prod")
PRIORITY_CLASSES = {"dev": "trainyard-dev-low", "prod": "trainyard-prod-high"}
BUSY_TARGET = 0.90
#: The arrival schedules: runs, window (s), training seconds (min, max), prod teams' nominal GPUs.
QUICK = {"runs": 12, "window": 20.0, "train": (6.0, 12.0), "nominal": {"a": 2, "b": 1, "c": 1}}
FULL = {"runs": 30, "window": 60.0, "train": (8.0, 20.0), "nominal": {"a": 2, "b": 1, "c": 1}}


@dataclass(frozen=True)
class Submission:
    index: int
    at: float  # seconds after the schedule starts
    environment: str
    team: str
    train_seconds: float
    gpus: int = 1

    @property
    def run_id(self) -> str:
        return f"bench__{self.index:03d}_{self.environment}_{self.team}"


@dataclass
class Outcome:
    submission: Submission
    submitted: float = 0.0  # time.monotonic()
    ended: float | None = None
    error: str | None = None
    waits: list[Any] = field(default_factory=list)  # QueueWaitRecord
    requeues: int = 0
    #: Each wait on Kueue's clock: from the pod's creation to its Workload's admission.
    windows: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.ended is not None and self.error is None

    @property
    def waited(self) -> float:
        """What the operator recorded (its run state, the XCom, the MLflow tags)."""
        return sum(w.seconds for w in self.waits)

    @property
    def waited_until_admitted(self) -> float:
        return sum(end - start for start, end in self.windows)


@dataclass(frozen=True)
class Held:
    """GPUs held by one pod or workload of an environment's team, between two monotonic times."""

    start: float
    end: float
    environment: str
    team: str
    gpus: int


def schedule(
    runs: int, window: float, train: tuple[float, float], teams: list[str], seed: int
) -> list[Submission]:
    """Arrivals uniform over ``window``; every (environment, team) pair submits as many runs (+-1)."""
    rng = random.Random(seed)
    pairs = [(env, team) for env in ENVIRONMENTS for team in teams]
    chosen = [pairs[i % len(pairs)] for i in range(runs)]
    rng.shuffle(chosen)
    times = sorted(rng.uniform(0, window) for _ in range(runs))
    return [
        Submission(i, round(at, 2), env, team, round(rng.uniform(*train), 1))
        for i, (at, (env, team)) in enumerate(zip(times, chosen, strict=True))
    ]


# ----------------------------------------------------------------------------------- the cluster


def environment_document(home: Path, env: str, nominal: dict[str, int], kueue: bool) -> dict[str, Any]:
    from tests.support.k8s_cluster import KUEUE_GPU_TYPES, environment_yaml

    storage = {"data": ["s3://trainyard-k8s/data/"], "models": ["s3://trainyard-k8s/models/"]}
    teams = {
        team: {"gpus": gpus if env == "prod" else 0, "cpu": "16", "memory": "64Gi", "storage": storage}
        for team, gpus in nominal.items()
    }
    extra: dict[str, Any] = {
        "priority_class": PRIORITY_CLASSES[env],
        "scheduling": "kueue" if kueue else "priority",
        "startup_timeout_seconds": 30,
        "on_finish_action": "delete_succeeded_pod",
        "in_cluster": False,
    }
    if kueue:
        extra.update(gpu_types=KUEUE_GPU_TYPES, kueue={"status_interval_seconds": 1})
    # The teams' ServiceAccount and credentials Secret, and the MLflow token, are the e2e tests'.
    return environment_yaml(home, f"bench-{env}", "http://127.0.0.1:9", teams=teams, **extra)


def pipeline_document(team: str) -> dict[str, Any]:
    from tests.support.pipelines import tiny_pipeline

    document = tiny_pipeline(
        f"bench-{team}",
        "tiny-bert",
        description=f"Team {team}'s run in the contention benchmark (fake training).",
        resources={"gpus": 1, "cpu": "1", "memory": "1Gi", "shm_size": "64Mi"},
    )
    document["team"] = team
    return document


def mlflow_ready(tracking_uri: str) -> None:
    """Create the MLflow store once, before the runs (its tag step would race to migrate it)."""
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "Creating initial tables" lines
    MlflowClient(tracking_uri=tracking_uri).search_experiments()


# --------------------------------------------------------------------------------------- one run


def fake_operator_class() -> type:
    from trainyard.train.pod import pod_labels
    from trainyard.train.pod_operator import KubernetesTrainOperator

    class FakeTrainOperator(KubernetesTrainOperator):
        """The real training operator; only the pod's command is a sleep instead of the trainer."""

        def __init__(self, *, train_seconds: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.train_seconds = train_seconds

        def prepare_run(self, context: Any, approved: Any) -> None:
            self.cmds = ["python"]
            self.arguments = ["-c", f"import time; time.sleep({self.train_seconds})"]
            self.labels = {**self.labels, **pod_labels(self.pipeline, context["dag_run"].run_id)}

    return FakeTrainOperator


class TaskInstance:
    """What the operator and the provider read of ``context["ti"]``; XComs in a dict.

    ``validate_data``'s XCom (the approval ``execute`` pulls) is a stub: the sleeping pod uses none of it.
    """

    def __init__(self, dag_id: str, run_id: str, approval: dict[str, Any]) -> None:
        self.dag_id, self.task_id, self.run_id = dag_id, "train", run_id
        self.try_number, self.map_index = 1, -1
        self.start_date = datetime.now(UTC)
        self.xcoms: dict[str, Any] = {}
        self._approval = approval

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value", **_: Any) -> Any:
        if task_ids == "validate_data" and key == "return_value":
            return self._approval
        return self.xcoms.get(key)


def task_context(dag_id: str, run_id: str, approval: dict[str, Any]) -> dict[str, Any]:
    """A minimal task context: Airflow's scheduler and task runner are not under test."""
    from trainyard.train.run_state import MemoryStore

    ti = TaskInstance(dag_id, run_id, approval)
    return {
        "ti": ti,
        "task_instance": ti,
        "run_id": run_id,
        "dag_run": SimpleNamespace(run_id=run_id, dag_id=ti.dag_id, conf={}),
        "dag": SimpleNamespace(dag_id=ti.dag_id),
        "task_state_store": MemoryStore(),  # kept across the relaunches of the one try
    }


def run_one(operator: Any, context: dict[str, Any], outcome: Outcome, start: float) -> None:
    from trainyard.train.run_state import RunState

    time.sleep(max(0.0, start + outcome.submission.at - time.monotonic()))
    outcome.submitted = time.monotonic()
    try:
        operator.execute(context)
    except BaseException as exc:  # a failed task: its message is what Airflow would show
        outcome.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        state = RunState.load(context["task_state_store"])
        outcome.waits, outcome.requeues = list(state.queue_waits), state.requeues
        outcome.ended = time.monotonic()


# -------------------------------------------------------------------------------------- one mode


def play(mode: str, submissions: list[Submission], nominal: dict[str, int], home: Path) -> dict[str, Any]:
    """Play the schedule on a fresh cluster: ``kueue`` or ``baseline``; returns the measurements."""
    from tests.support.k8s_cluster import MLFLOW_SECRET, S3_SECRET
    from tests.support.k8s_emulator import KubernetesEmulator
    from tests.support.kueue_cluster import install, render_cluster
    from trainer.spec import Hyperparameters
    from trainyard.config.loading import available_environments, load_environment, load_pipeline

    kueue = mode == "kueue"
    capacity = sum(nominal.values())
    with tempfile.TemporaryDirectory(prefix=f"{mode}-", dir=home) as tmp:
        folder = Path(tmp)
        environments_dir, pipelines_dir = folder / "environments", folder / "pipelines"
        environments_dir.mkdir()
        pipelines_dir.mkdir()
        texts = {}
        for env in ENVIRONMENTS:
            texts[env] = yaml.safe_dump(environment_document(home, env, nominal, kueue), sort_keys=False)
            (environments_dir / f"{env}.yaml").write_text(texts[env])
        for team in nominal:
            text = yaml.safe_dump(pipeline_document(team), sort_keys=False)
            (pipelines_dir / f"bench-{team}.yaml").write_text(text)
        known = available_environments(environments_dir)
        configs = {env: load_environment(env, environments_dir) for env in ENVIRONMENTS}
        pipelines = {
            (env, team): load_pipeline(pipelines_dir / f"bench-{team}.yaml", configs[env], known)
            for env in ENVIRONMENTS
            for team in nominal
        }
        with KubernetesEmulator() as emulator:
            install(emulator, render_cluster({env: (texts[env], env) for env in ENVIRONMENTS}))
            for env in ENVIRONMENTS:
                namespace = f"bench-{env}"
                emulator.add_secret(namespace, S3_SECRET, {"AWS_ACCESS_KEY_ID": "bench"})
                emulator.add_secret(namespace, MLFLOW_SECRET, {"token": "bench"})
                if not kueue:  # today: each environment's share of the GPUs as a namespace quota
                    gpus = capacity // 2 if env == "dev" else capacity - capacity // 2
                    emulator.add_resource_quota(
                        namespace, "trainyard-training", {"requests.nvidia.com/gpu": str(gpus)}
                    )
            kubeconfig = emulator.write_kubeconfig(folder / "kubeconfig")
            connection = {
                "conn_type": "kubernetes",
                "extra": {"kube_config_path": str(kubeconfig), "in_cluster": False},
            }
            os.environ["AIRFLOW_CONN_KUBERNETES_DEFAULT"] = json.dumps(connection)

            operator_class = fake_operator_class()
            outcomes, threads = [], []
            start = time.monotonic() + 1.0
            for sub in submissions:
                pipeline = pipelines[sub.environment, sub.team]
                hyperparameters = Hyperparameters.model_validate(pipeline.config.training.model_dump())
                approval = {
                    "fingerprint": "sha256:" + "0" * 64,
                    "hyperparameters": hyperparameters.model_dump(mode="json"),
                }
                operator = operator_class(
                    task_id="train",
                    pipeline=pipeline,
                    train_seconds=sub.train_seconds,
                    execution_timeout=timedelta(
                        minutes=pipeline.environment.airflow.execution_timeout_minutes
                    ),
                )
                outcome = Outcome(sub)
                thread = threading.Thread(
                    target=run_one,
                    args=(operator, task_context(pipeline.name, sub.run_id, approval), outcome, start),
                    name=f"run-{sub.index}",
                    daemon=True,
                )
                outcomes.append(outcome)
                threads.append(thread)
            offset = time.time() - time.monotonic()  # wall clock -> monotonic, for the runs' wait records
            for thread in threads:
                thread.start()
            demand = sum(s.train_seconds * s.gpus for s in submissions)
            deadline = start + max(s.at for s in submissions) + 3 * demand / capacity + 60
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            end = time.monotonic()
            for outcome in outcomes:
                if outcome.ended is None:
                    outcome.error = "did not finish before the benchmark's deadline"
            if kueue:
                held = held_from_admissions(emulator.admission_log(), end)
                admitted_at = admissions_by_pod(
                    emulator.workloads(include_deleted=True), emulator.admission_log()
                )
            else:
                held = held_from_containers(emulator.container_runs(), submissions, end)
                admitted_at = {}
    for o in outcomes:
        for w in o.waits:
            # The wait starts at the pod's creation (whole seconds, as Kubernetes stamps it).
            began = max(w.started_at.timestamp() - offset, o.submitted)
            o.windows.append((began, admitted_at.get(w.pod, began + w.seconds)))
    log = logging.getLogger("bench_contention")
    for o in outcomes:
        sub = o.submission
        log.info(
            "%s %s: arrived %.1f s, trained %.1f s, waited %.1f s (admitted after %.1f s), requeues %d, %s",
            mode,
            sub.run_id,
            sub.at,
            sub.train_seconds,
            o.waited,
            o.waited_until_admitted,
            o.requeues,
            o.error or "succeeded",
        )
    waiting = [window for o in outcomes for window in o.windows]
    return measure(mode, outcomes=outcomes, held=held, waiting=waiting, nominal=nominal, start=start, end=end)


def held_from_admissions(log: list[tuple[float, str, str, str, int]], end: float) -> list[Held]:
    """Each admission's GPUs, from ``admitted`` to the workload's next ``preempted``/``finished``."""
    held, open_ = [], {}
    for at, workload, cluster_queue, what, gpus in log:
        if what == "admitted":
            open_[workload] = (at, cluster_queue, gpus)
        elif workload in open_:
            started, queue, count = open_.pop(workload)
            held.append(_held(started, at, queue, count))
    held.extend(_held(started, end, queue, count) for started, queue, count in open_.values())
    return held


def _held(start: float, end: float, cluster_queue: str, gpus: int) -> Held:
    _, env, team = cluster_queue.split("-", 2)  # trainyard-<env>-<team>
    return Held(start, end, env, team, gpus)


def admissions_by_pod(workloads: list[dict], log: list[tuple[float, str, str, str, int]]) -> dict[str, float]:
    """When Kueue admitted each pod's Workload (the end of its wait, without the operator's polling)."""
    owner = {}
    for workload in workloads:
        meta = workload["metadata"]
        for ref in meta.get("ownerReferences") or []:
            if ref.get("kind") == "Pod":
                owner[f"{meta['namespace']}/{meta['name']}"] = ref["name"]
    admitted: dict[str, float] = {}
    for at, workload, _, what, _ in log:
        if what == "admitted" and workload in owner:
            admitted.setdefault(owner[workload], at)
    return admitted


def held_from_containers(runs: list[dict], submissions: list[Submission], end: float) -> list[Held]:
    by_run = {s.run_id: s for s in submissions}
    held = []
    for run in runs:
        labels = run.get("labels") or {}
        sub = by_run.get(labels.get("trainyard.io/dag-run", ""))
        if sub is not None and run.get("started") is not None:
            ended = run.get("ended") or end
            held.append(Held(run["started"], ended, sub.environment, sub.team, sub.gpus))
    return held


# ------------------------------------------------------------------------------------ the numbers


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def busy_fraction(held: list[Held], windows: list[tuple[float, float]], capacity: int) -> float | None:
    """GPU-seconds in use over the capacity's GPU-seconds, within ``windows``; None if they are empty."""
    windows = merged(windows)
    total = sum(end - start for start, end in windows)
    if total <= 0:
        return None
    points = sorted({p for h in held for p in (h.start, h.end)} | {p for w in windows for p in w})
    used = 0.0
    for a, b in itertools.pairwise(points):
        mid = (a + b) / 2
        if any(start <= mid < end for start, end in windows):
            gpus = sum(h.gpus for h in held if h.start <= mid < h.end)
            used += min(gpus, capacity) * (b - a)
    return round(used / (capacity * total), 3)


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=20, method="inclusive")[18], 2)


def measure(
    mode: str,
    *,
    outcomes: list[Outcome],
    held: list[Held],
    waiting: list[tuple[float, float]],
    nominal: dict[str, int],
    start: float,
    end: float,
) -> dict[str, Any]:
    capacity = sum(nominal.values())
    used = {team: sum(h.gpus * (h.end - h.start) for h in held if h.team == team) for team in nominal}
    asked = {
        team: sum(
            o.submission.train_seconds * o.submission.gpus for o in outcomes if o.submission.team == team
        )
        for team in nominal
    }
    total_used, total_asked = sum(used.values()) or 1.0, sum(asked.values()) or 1.0
    last = max((o.ended for o in outcomes if o.ended is not None), default=end)
    return {
        "mode": mode,
        "runs": len(outcomes),
        "succeeded": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "queued": sum(bool(o.waits) for o in outcomes),
        "preempted": sum(o.requeues > 0 for o in outcomes),
        "gpu_busy_fraction": busy_fraction(held, waiting, capacity),
        "gpu_busy_fraction_overall": busy_fraction(held, [(start, last)], capacity),
        "p95_wait_s": {
            env: p95([o.waited for o in outcomes if o.submission.environment == env]) for env in ENVIRONMENTS
        },
        "p95_wait_until_admitted_s": {
            env: p95([o.waited_until_admitted for o in outcomes if o.submission.environment == env])
            for env in ENVIRONMENTS
        },
        "teams": {
            team: {
                "gpu_seconds": round(used[team], 1),
                "share": round(used[team] / total_used, 3),
                "nominal_share": round(nominal[team] / capacity, 3),
                "demand_share": round(asked[team] / total_asked, 3),
            }
            for team in nominal
        },
        "makespan_s": round(last - start, 1),
        "errors": sorted({o.error for o in outcomes if o.error}),
    }


# -------------------------------------------------------------------------------------- printing


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def targets(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    dev, prod = result["p95_wait_s"]["dev"], result["p95_wait_s"]["prod"]
    busy = result["gpu_busy_fraction"]
    return [
        ("failed == 0", result["failed"] == 0, str(result["failed"])),
        (
            "prod p95 wait < dev p95 wait",
            prod is not None and dev is not None and prod < dev,
            f"{_s(prod)} vs {_s(dev)} s",
        ),
        (
            f"GPUs busy >= {BUSY_TARGET:.0%} while work waits",
            busy is not None and busy >= BUSY_TARGET,
            _pct(busy),
        ),
    ]


def report(
    kueue: dict, base: dict, submissions: list[Submission], nominal: dict[str, int], seed: int
) -> None:
    counts = {env: sum(s.environment == env for s in submissions) for env in ENVIRONMENTS}
    print(
        f"GPU contention: {len(submissions)} runs ({counts['dev']} dev, {counts['prod']} prod) of teams "
        f"{', '.join(nominal)} over {max(s.at for s in submissions):.0f} s, {sum(nominal.values())} GPUs, "
        f"fake training {min(s.train_seconds for s in submissions):.0f}-"
        f"{max(s.train_seconds for s in submissions):.0f} s, seed {seed}"
    )
    rows: list[tuple[str, str, str]] = [
        (
            "succeeded / failed",
            f"{base['succeeded']} / {base['failed']}",
            f"{kueue['succeeded']} / {kueue['failed']}",
        ),
        ("queued (had to wait)", str(base["queued"]), str(kueue["queued"])),
        ("preempted by Kueue", str(base["preempted"]), str(kueue["preempted"])),
        ("GPUs busy while work waits", _pct(base["gpu_busy_fraction"]), _pct(kueue["gpu_busy_fraction"])),
        (
            "GPUs busy, whole run",
            _pct(base["gpu_busy_fraction_overall"]),
            _pct(kueue["gpu_busy_fraction_overall"]),
        ),
        ("p95 wait dev (s)", _s(base["p95_wait_s"]["dev"]), _s(kueue["p95_wait_s"]["dev"])),
        ("p95 wait prod (s)", _s(base["p95_wait_s"]["prod"]), _s(kueue["p95_wait_s"]["prod"])),
        (
            "p95 wait until admitted, dev / prod (s)",
            " / ".join(_s(base["p95_wait_until_admitted_s"][env]) for env in ENVIRONMENTS),
            " / ".join(_s(kueue["p95_wait_until_admitted_s"][env]) for env in ENVIRONMENTS),
        ),
        ("last run done after (s)", _s(base["makespan_s"]), _s(kueue["makespan_s"])),
    ]
    for team in nominal:
        b, k = base["teams"][team], kueue["teams"][team]
        label = f"team {team} GPU-s share (nominal {k['nominal_share']:.0%}, asked {k['demand_share']:.0%})"
        rows.append(
            (
                label,
                f"{b['share']:.0%} ({b['gpu_seconds']:.0f} GPU-s)",
                f"{k['share']:.0%} ({k['gpu_seconds']:.0f} GPU-s)",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"  {'':<{width}}  {'baseline (same run)':>22}  {'kueue':>18}")
    print(f"  {'':<{width}}  {'priority + quota':>22}  {'chart queues':>18}")
    for label, b, k in rows:
        print(f"  {label:<{width}}  {b:>22}  {k:>18}")
    for name, errors in (("baseline", base["errors"]), ("kueue", kueue["errors"])):
        for error in errors[:3]:
            print(f"  {name} failure: {error}")
    for label, met, value in targets(kueue):
        print(f"  target (kueue): {label} -> {'MET' if met else 'MISSED'} ({value})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 runs over ~20 s (under 3 min on 2 cores)")
    parser.add_argument("--runs", type=int, help="how many DAG runs (default 12 with --quick, else 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    runs = args.runs or shape["runs"]
    window = shape["window"] * runs / shape["runs"]  # the same pressure for any --runs
    nominal = dict(shape["nominal"])
    submissions = schedule(runs, window, shape["train"], list(nominal), args.seed)

    OUT.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory(prefix="trainyard-contention-") as tmp:
        home = Path(tmp)  # the environments' MLflow store, shared by both modes
        mlflow_ready(f"sqlite:///{home}/mlflow.db")
        for mode in ("baseline", "kueue"):
            with (OUT / f"bench_contention-{mode}.log").open("w") as log_file:
                from airflow.sdk.log import configure_logging

                configure_logging(output=log_file, colored_console_log=False, cache_logger_on_first_use=False)
                try:
                    results[mode] = play(mode, submissions, nominal, home)
                except Exception:
                    traceback.print_exc(file=log_file)
                    raise
    wall = time.monotonic() - began
    kueue, base = results["kueue"], results["baseline"]
    report(kueue, base, submissions, nominal, args.seed)
    print(f"  wall time {wall:.0f} s; operator logs in {OUT.relative_to(ROOT)}/bench_contention-*.log")
    checks = targets(kueue)
    summary = {k: v for k, v in kueue.items() if k not in ("mode", "errors")}
    summary.update(
        benchmark="contention",
        seed=args.seed,
        gpus=sum(nominal.values()),
        wall_s=round(wall, 1),
        targets={label: met for label, met, _ in checks},
        targets_met=all(met for _, met, _ in checks),
        baseline={k: v for k, v in base.items() if k not in ("mode", "errors")},
    )
    print(json.dumps(summary))
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
