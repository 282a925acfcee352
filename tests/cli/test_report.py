"""``trainyard report`` against a real MLflow store (SQLite): runs logged as the trainer and train do."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from trainyard.cost import PodTime, StepPoint, log_cost, run_cost

SINCE = datetime(2026, 11, 1, tzinfo=UTC)
PRICE = 3.6  # per GPU-hour: 0.001 per GPU-second


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with the runs of environment ``prod``; the tracking URI and gpu_hour_price in its YAML."""
    from mlflow.tracking import MlflowClient

    from trainyard.config.loading import load_environment

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    envs = root / "environments"
    envs.mkdir()
    (envs / "prod.yaml").write_text(
        yaml.safe_dump(
            {
                "launcher": "local",
                "mlflow": {
                    "tracking_uri": uri,
                    "artifact_location": str(root / "artifacts"),
                    "experiment_name": "{pipeline}-{environment}",
                    "registered_model_name": "{team}.{pipeline}",
                },
                "storage": {"data_root": str(root), "models_root": str(root), "checkpoint_root": str(root)},
                "gpu_hour_price": {"a100": PRICE, "default": 1.8},
                "currency": "EUR",
            }
        )
    )
    client = MlflowClient(tracking_uri=uri)
    log = RunLog(client)
    # nlp/sentiment: preempted once and promoted; a clean one; a failed one; one skipped as unchanged.
    promoted = log.run("nlp", "sentiment", "FINISHED", running=3600, queued=600, lost=120)
    log.run("nlp", "sentiment", "FINISHED", running=1800, queued=0)
    log.run("nlp", "sentiment", "FAILED", running=900, queued=300)
    log.run("nlp", "sentiment", "FINISHED", skipped=True)
    # nlp/topics: one killed run, one older run from before costs were recorded.
    log.run("nlp", "topics", "KILLED", running=360, queued=36)
    log.run("nlp", "topics", "FINISHED", running=None)
    # vision/detect: one run; others outside the report (another environment, before --since).
    log.run("vision", "detect", "FINISHED", running=7200, queued=7200)
    log.run("vision", "detect", "FINISHED", running=100, environment="dev")
    log.run("vision", "detect", "FINISHED", running=100, started=SINCE - timedelta(hours=1))
    log.promote(promoted)
    yield {"client": client, "env": load_environment("prod", envs), "envs": envs, "log": log}


class RunLog:
    """Runs as the trainer logs them (tags) and train records their cost (``log_cost``)."""

    def __init__(self, client):
        self.client = client
        self.count = 0
        self.costs: dict[str, float] = {}

    def run(
        self,
        team,
        pipeline,
        status,
        *,
        running=0,
        queued=0,
        lost=0,
        skipped=False,
        environment="prod",
        started=None,
    ) -> str:
        self.count += 1
        name = f"{pipeline}-{environment}"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {
            "trainyard.team": team,
            "trainyard.pipeline": pipeline,
            "trainyard.environment": environment,
            "airflow.dag_id": pipeline,
            "airflow.run_id": f"scheduled__{self.count}",
        }
        if skipped:
            tags["trainyard.outcome"] = "skipped"
        start = started or SINCE + timedelta(days=1, minutes=self.count)
        run = self.client.create_run(experiment_id, start_time=int(start.timestamp() * 1000), tags=tags)
        run_id = run.info.run_id
        if running is not None and not skipped:
            # Two pods of 2 x a100; the first preempted: its last ``lost`` seconds were done again.
            t0 = start
            first = PodTime(
                pod="p1",
                uid="u1",
                created_at=t0,
                started_at=t0 + timedelta(seconds=queued),
                ended_at=t0 + timedelta(seconds=queued + running / 2),
                end="disrupted",
            )
            second_start = first.ended_at + timedelta(seconds=10)
            second = PodTime(
                pod="p2",
                uid="u2",
                created_at=second_start,
                started_at=second_start,
                ended_at=second_start + timedelta(seconds=running / 2),
                end="succeeded",
            )
            kept = (first.ended_at - timedelta(seconds=lost)).timestamp()
            history = [StepPoint(10, kept), StepPoint(20, second_start.timestamp() + 1)]
            cost = run_cost(
                [first, second],
                gpus=2,
                gpu_type="a100",
                price_per_gpu_hour=PRICE,
                currency="EUR",
                now=second.ended_at,
                history=history,
                last_resumed_from=10,
            )
            log_cost(self.client, run_id, cost)
            self.costs[run_id] = cost.cost
        self.client.set_terminated(run_id, status=status)
        return run_id

    def promote(self, run_id: str) -> None:
        """A model version of the run with the promotion audit's decision, as promote leaves it."""
        name = "nlp.sentiment"
        self.client.create_registered_model(name)
        version = self.client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
        self.client.set_model_version_tag(name, version.version, "trainyard.decision", "promoted")
        rejected = self.client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
        self.client.set_model_version_tag(name, rejected.version, "trainyard.decision", "rejected")


def _row(report, team, pipeline):
    return next(r for r in report["rows"] if (r["team"], r["pipeline"]) == (team, pipeline))


def test_the_report_sums_what_the_runs_recorded_per_team_and_pipeline(store):
    from trainyard.cli.report import build_report

    report = build_report(store["client"], store["env"], SINCE)
    assert [(r["team"], r["pipeline"]) for r in report["rows"]] == [
        ("nlp", "sentiment"),
        ("nlp", "topics"),
        ("vision", "detect"),
    ]
    sentiment = _row(report, "nlp", "sentiment")
    assert {k: sentiment[k] for k in ("runs", "succeeded", "failed", "skipped", "promoted")} == {
        "runs": 4,
        "succeeded": 2,
        "failed": 1,
        "skipped": 1,
        "promoted": 1,
    }
    # 2 GPUs: GPU-hours are 2 x seconds / 3600; priced at 3.6 per GPU-hour (running only).
    assert sentiment["gpu_hours_running"] == pytest.approx(2 * (3600 + 1800 + 900) / 3600)
    assert sentiment["gpu_hours_queued"] == pytest.approx(2 * (600 + 300) / 3600, abs=1e-4)
    assert sentiment["gpu_hours_lost"] == pytest.approx(2 * 120 / 3600, abs=1e-4)
    assert sentiment["cost"] == pytest.approx(2 * 6300 * 0.001)
    topics = _row(report, "nlp", "topics")
    assert (topics["runs"], topics["failed"], topics["runs_without_cost"]) == (2, 1, 1)
    assert topics["cost"] == pytest.approx(0.72)
    nlp = next(t for t in report["teams"] if t["team"] == "nlp")
    assert nlp["runs"] == 6 and nlp["cost"] == pytest.approx(12.6 + 0.72)
    total = report["total"]
    assert total["runs"] == 7 and total["cost"] == pytest.approx(12.6 + 0.72 + 14.4)
    expected = sum(store["log"].costs[r] for r in store["log"].costs) - 2 * 0.2  # dev and before --since
    assert total["cost"] == pytest.approx(expected)
    assert report["currency"] == "EUR"


def test_filters_by_team_pipeline_and_time(store):
    from trainyard.cli.report import build_report

    vision = build_report(store["client"], store["env"], SINCE, team="vision")
    assert [r["pipeline"] for r in vision["rows"]] == ["detect"] and vision["total"]["runs"] == 1
    topics = build_report(store["client"], store["env"], SINCE, pipeline="topics")
    assert topics["total"]["runs"] == 2
    earlier = build_report(store["client"], store["env"], SINCE - timedelta(days=1))
    assert earlier["total"]["runs"] == 8
    none = build_report(store["client"], store["env"], SINCE, SINCE + timedelta(hours=1))
    assert none["rows"] == [] and none["total"]["runs"] == 0 and none["total"]["cost"] is None


def _main(store, monkeypatch, *argv):
    from trainyard.cli.main import main

    monkeypatch.setenv("TRAINYARD_ENVIRONMENTS_DIR", str(store["envs"]))
    return main(["report", "--env", "prod", *argv])


def test_json_is_one_document_on_stdout(store, monkeypatch, capsys):
    assert (
        _main(store, monkeypatch, "--since", "2026-11-01", "--until", "2026-11-30", "--format", "json") == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert set(document) == {
        "environment",
        "since",
        "until",
        "team",
        "pipeline",
        "currency",
        "rows",
        "teams",
        "total",
    }
    assert document["until"] == "2026-12-01T00:00:00+00:00", "--until is inclusive of its day"
    assert set(document["rows"][0]) == {
        "team",
        "pipeline",
        "runs",
        "succeeded",
        "failed",
        "skipped",
        "promoted",
        "gpu_hours_queued",
        "gpu_hours_running",
        "gpu_hours_lost",
        "cost",
        "runs_without_cost",
    }


def test_the_table_is_aligned_with_totals_and_the_currency(store, monkeypatch, capsys):
    assert _main(store, monkeypatch, "--since", "2026-11-01") == 0
    out = capsys.readouterr().out.splitlines()
    header = next(line for line in out if line.startswith("TEAM"))
    assert "COST (EUR)" in header
    rows = [line for line in out if line.startswith(("nlp", "vision", "(all)"))]
    assert len({len(line.rstrip()) for line in [*rows, header]}) == 1, "\n".join(out)
    assert rows[-1].split()[:3] == ["(all)", "(all)", "7"] and rows[-1].endswith("27.72")
    assert next(line.split()[:3] for line in rows if line.split()[1] == "(all)") == ["nlp", "(all)", "6"]
    assert "1 run(s) recorded no GPU time" in out[-1]


def test_no_runs_and_bad_dates(store, monkeypatch, capsys):
    assert _main(store, monkeypatch, "--since", "2030-01-01") == 0
    assert "No training runs." in capsys.readouterr().out
    assert _main(store, monkeypatch, "--since", "01/11/2026") == 2
    error = capsys.readouterr().err
    assert "--since '01/11/2026' is not a date; expected YYYY-MM-DD" in error
    assert _main(store, monkeypatch, "--since", "2026-11-01", "--until", "2026-13-01") == 2
    assert "--until '2026-13-01'" in capsys.readouterr().err
