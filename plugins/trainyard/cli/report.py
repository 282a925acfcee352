"""``trainyard report``: what training cost, per team and pipeline, read back from MLflow.

Each DAG run is one MLflow run (relaunches and retries continue it), so runs are counted as
MLflow runs; the GPU time and cost are what the ``train`` task recorded on them
(``trainyard.cost``). Runs from before cost was recorded are counted, and said to lack it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from trainer.spec import OUTCOME_SKIPPED, TAG_ENVIRONMENT, TAG_OUTCOME, TAG_PIPELINE, TAG_TEAM
from trainyard.cost import (
    METRIC_COST,
    METRIC_GPU_SECONDS_LOST,
    METRIC_GPU_SECONDS_QUEUED,
    METRIC_GPU_SECONDS_RUNNING,
    TAG_CURRENCY,
)
from trainyard.promote.audit import TAG_DECISION

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from trainyard.config.environment_schema import EnvironmentConfig

log = logging.getLogger(__name__)

#: What a run without a team or pipeline tag is reported under, and the label of total rows.
UNKNOWN, ALL = "(none)", "(all)"
DATE_FORMAT = "YYYY-MM-DD (or an ISO 8601 time such as 2026-11-01T09:30:00Z)"
#: Run ids per ``run_id IN (...)`` search of model versions.
ID_CHUNK = 100
_QUOTABLE = re.compile(r"^[^'\\]*$")


class ReportError(ValueError):
    """A flag the report cannot use; the message names it and what it expects."""


def parse_time(flag: str, value: str, *, end_of_day: bool = False) -> datetime:
    """A ``--since``/``--until`` value as a UTC time; a bare date is its midnight (or the next one)."""
    text = value.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = date.fromisoformat(text)
            moment = datetime.combine(day, time(), tzinfo=UTC)
            return moment + timedelta(days=1) if end_of_day else moment
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"{flag} {value!r} is not a date; expected {DATE_FORMAT}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Figures:
    """The counts and sums of one row."""

    runs: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    promoted: int = 0
    gpu_hours_queued: float = 0.0
    gpu_hours_running: float = 0.0
    gpu_hours_lost: float = 0.0
    cost: float | None = None
    runs_without_cost: int = 0
    run_ids: set[str] = field(default_factory=set, repr=False)

    def add(self, other: Figures) -> None:
        for name in ("runs", "succeeded", "failed", "skipped", "promoted", "runs_without_cost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("gpu_hours_queued", "gpu_hours_running", "gpu_hours_lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
            "promoted": self.promoted,
            "gpu_hours_queued": round(self.gpu_hours_queued, 4),
            "gpu_hours_running": round(self.gpu_hours_running, 4),
            "gpu_hours_lost": round(self.gpu_hours_lost, 4),
            "cost": None if self.cost is None else round(self.cost, 2),
            "runs_without_cost": self.runs_without_cost,
        }


def _quoted(flag: str, value: str) -> str:
    if not _QUOTABLE.match(value):
        raise ReportError(f"{flag} {value!r}: a name has no quotes or backslashes")
    return f"'{value}'"


def _search_runs(client: MlflowClient, filter_string: str) -> Iterable[Any]:
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    for start in range(0, len(experiments), ID_CHUNK):
        page_token = None
        while True:
            page = client.search_runs(
                experiments[start : start + ID_CHUNK],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                page_token=page_token,
            )
            yield from page
            page_token = page.token
            if not page_token:
                break


def _promoted_run_ids(client: MlflowClient, run_ids: list[str]) -> set[str]:
    """The runs among ``run_ids`` with a model version whose promotion audit says promoted."""
    promoted: set[str] = set()
    for start in range(0, len(run_ids), ID_CHUNK):
        chunk = ", ".join(f"'{r}'" for r in run_ids[start : start + ID_CHUNK])
        for version in client.search_model_versions(f"run_id IN ({chunk})"):
            if (version.tags or {}).get(TAG_DECISION) == "promoted":
                promoted.add(version.run_id)
    return promoted


def _figures_of(run: Any, currency: str, promoted: set[str]) -> Figures:
    tags, metrics, status = run.data.tags, run.data.metrics, run.info.status
    skipped = tags.get(TAG_OUTCOME) == OUTCOME_SKIPPED
    figures = Figures(
        runs=1,
        succeeded=int(status == "FINISHED" and not skipped),
        failed=int(status in ("FAILED", "KILLED")),
        skipped=int(skipped),
        promoted=int(run.info.run_id in promoted),
        run_ids={run.info.run_id},
    )
    if METRIC_GPU_SECONDS_RUNNING not in metrics:
        figures.runs_without_cost = int(not skipped)  # a skipped run used no GPU
        return figures
    figures.gpu_hours_queued = metrics.get(METRIC_GPU_SECONDS_QUEUED, 0.0) / 3600
    figures.gpu_hours_running = metrics[METRIC_GPU_SECONDS_RUNNING] / 3600
    figures.gpu_hours_lost = metrics.get(METRIC_GPU_SECONDS_LOST, 0.0) / 3600
    if METRIC_COST in metrics:
        if tags.get(TAG_CURRENCY, currency) == currency:
            figures.cost = metrics[METRIC_COST]
        else:
            log.warning(
                "run %s cost %s %s, not %s: left out of the cost",
                run.info.run_id,
                metrics[METRIC_COST],
                tags.get(TAG_CURRENCY),
                currency,
            )
    return figures


def build_report(  # noqa: PLR0917  (the signature the CLI and its callers share)
    client: MlflowClient,
    environment: EnvironmentConfig,
    since: datetime,
    until: datetime | None = None,
    team: str | None = None,
    pipeline: str | None = None,
) -> dict[str, Any]:
    """One JSON-ready document: a row per team and pipeline, a total per team, and a grand total.

    Runs are those of ``environment`` started at or after ``since`` and before ``until``.
    """
    clauses = [
        f"tags.`{TAG_ENVIRONMENT}` = {_quoted('--env', environment.name)}",
        f"attributes.start_time >= {int(since.timestamp() * 1000)}",
    ]
    if until is not None:
        clauses.append(f"attributes.start_time < {int(until.timestamp() * 1000)}")
    if team is not None:
        clauses.append(f"tags.`{TAG_TEAM}` = {_quoted('--team', team)}")
    if pipeline is not None:
        clauses.append(f"tags.`{TAG_PIPELINE}` = {_quoted('--pipeline', pipeline)}")
    runs = list(_search_runs(client, " and ".join(clauses)))
    promoted = _promoted_run_ids(client, [r.info.run_id for r in runs])
    currency = environment.currency

    rows: dict[tuple[str, str], Figures] = {}
    for run in runs:
        key = (run.data.tags.get(TAG_TEAM) or UNKNOWN, run.data.tags.get(TAG_PIPELINE) or UNKNOWN)
        rows.setdefault(key, Figures()).add(_figures_of(run, currency, promoted))
    teams: dict[str, Figures] = {}
    total = Figures()
    for (team_name, _), figures in sorted(rows.items()):
        teams.setdefault(team_name, Figures()).add(figures)
        total.add(figures)
    return {
        "environment": environment.name,
        "since": since.isoformat(),
        "until": until.isoformat() if until is not None else None,
        "team": team,
        "pipeline": pipeline,
        "currency": currency,
        "rows": [{"team": t, "pipeline": p, **figures.as_dict()} for (t, p), figures in sorted(rows.items())],
        "teams": [{"team": t, **figures.as_dict()} for t, figures in sorted(teams.items())],
        "total": total.as_dict(),
    }


# -------------------------------------------------------------------------------------- the table

COLUMNS = (
    ("team", "TEAM"),
    ("pipeline", "PIPELINE"),
    ("runs", "RUNS"),
    ("succeeded", "SUCCEEDED"),
    ("failed", "FAILED"),
    ("skipped", "SKIPPED"),
    ("promoted", "PROMOTED"),
    ("gpu_hours_queued", "GPU-H QUEUED"),
    ("gpu_hours_running", "GPU-H RUNNING"),
    ("gpu_hours_lost", "GPU-H LOST"),
    ("cost", "COST"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.startswith("gpu_hours"):
        return f"{value:,.2f}" if value == 0 or value >= 0.005 else "<0.01"
    if key == "cost":
        return f"{value:,.2f}"
    return str(value)


def _moment(text: str) -> str:
    moment = datetime.fromisoformat(text)
    return str(moment.date()) if moment.time() == time() else str(moment)


def render_table(report: dict[str, Any]) -> str:
    """The report for people: aligned columns, GPU-hours and cost to two decimals, totals last."""
    period = f"from {_moment(report['since'])}"
    if report["until"]:
        until = datetime.fromisoformat(report["until"])
        midnight = until.time() == time() and until.utcoffset() == timedelta(0)
        period += f" to {(until - timedelta(days=1)).date()} inclusive" if midnight else f" until {until}"
    scope = "".join(
        f", {name} {report[name]}" for name in ("team", "pipeline") if report.get(name) is not None
    )
    title = f"Training cost in environment {report['environment']}{scope}, runs started {period}"
    if not report["rows"]:
        return f"{title}\nNo training runs."
    table: list[dict[str, Any]] = []
    for team_total in report["teams"]:
        rows = [r for r in report["rows"] if r["team"] == team_total["team"]]
        table += rows
        if len(rows) > 1:
            table.append({**team_total, "pipeline": ALL})
    table.append({**report["total"], "team": ALL, "pipeline": ALL})
    headers = [h if key != "cost" else f"COST ({report['currency']})" for key, h in COLUMNS]
    cells = [[_cell(key, row.get(key)) for key, _ in COLUMNS] for row in table]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    out = [title, line(headers), line(["-" * w for w in widths])]
    out += [line(c) for c in cells[:-1]]
    out += [line(["-" * w for w in widths]), line(cells[-1])]
    missing = report["total"]["runs_without_cost"]
    if missing:
        out.append(
            f"{missing} run(s) recorded no GPU time (trained before costs were recorded): not in the figures."
        )
    if report["total"]["cost"] is None and report["total"]["gpu_hours_running"]:
        out.append("No cost: the environment sets no gpu_hour_price for these GPUs.")
    return "\n".join(out)
