"""Notifications through Airflow's real SMTP and Slack-webhook notifiers, against real local servers.

Mail goes to aiosmtpd on 127.0.0.1 (tests/support/smtp.py), Slack to an http.server standing in for
the webhook endpoint; connections come from ``AIRFLOW_CONN_<ID>`` variables, as in a deployment.
"""

from __future__ import annotations

import html
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.support.paths import DAGS, ROOT
from tests.support.pipelines import tiny_pipeline
from tests.support.smtp import SilentServer, SmtpSink, free_port, smtp_connection
from tests.support.synthetic_data import write_splits
from trainyard import notify as notify_module
from trainyard.config.environment_schema import NOTIFICATION_EVENTS, EnvironmentConfig
from trainyard.config.loading import ResolvedPipeline
from trainyard.config.pipeline_schema import PipelineConfig
from trainyard.notify import Event, email_recipients, notify, one_line, run_failed_callback

SMTP_CONN = "trainyard_smtp"
SLACK_CONN = "trainyard_slack"
SLACK_TOKEN = "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"


def _pipeline(channels: dict[str, Any] | None, **sections: Any) -> ResolvedPipeline:
    environment = EnvironmentConfig.model_validate(
        {
            "name": "prod",
            "launcher": "local",
            "mlflow": {"tracking_uri": "sqlite:////tmp/unused-mlflow.db"},
            "storage": {"data_root": "/data", "models_root": "/models", "checkpoint_root": "/checkpoints"},
            "notifications": channels,
        }
    )
    document = tiny_pipeline("tweet-sentiment", "tiny-bert", description="Tweets.", **sections)
    config = PipelineConfig.model_validate(document)
    return ResolvedPipeline(config=config, environment=environment, source=Path("tweet-sentiment.yaml"))


def _email(**channel: Any) -> dict[str, Any]:
    return {"connection_id": SMTP_CONN, "from_email": "trainyard@example.com", **channel}


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", sink.connection())
        yield sink


class _Webhook(ThreadingHTTPServer):
    status = 200
    requests: list[tuple[str, dict[str, Any]]]


class _WebhookHandler(BaseHTTPRequestHandler):
    server: _Webhook

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, json.loads(body)))
        reply = b"ok" if self.server.status == 200 else b"internal_error"
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slack(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Webhook]:
    """A stand-in for hooks.slack.com: the connection's host is its URL, the password the token."""
    server = _Webhook(("127.0.0.1", 0), _WebhookHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    connection = {"conn_type": "slackwebhook", "host": f"http://{host}:{port}", "password": SLACK_TOKEN}
    monkeypatch.setenv(f"AIRFLOW_CONN_{SLACK_CONN.upper()}", json.dumps(connection))
    yield server
    server.shutdown()
    server.server_close()


def _promoted(pipeline: ResolvedPipeline) -> Event:
    return Event.model_promoted(
        pipeline,
        4,
        "champion",
        context={"dag_run": SimpleNamespace(run_id="scheduled__2026-05-01T00:00:00+00:00")},
        details="eval_f1_macro 0.912 (champion v3: 0.884)\nmin_improvement 0.01: met",
        links={"MLflow run": "http://mlflow.example.com/#/experiments/1/runs/abc123"},
    )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------ email


def test_the_mail_arrives_with_its_recipients_subject_and_body(smtp):
    pipeline = _pipeline(
        {"email": _email(to=["ml-platform@example.com", "oncall@example.com"])},
        owner="alice@example.com",
        notifications={"email": ["bob@example.com", "ONCALL@example.com"]},
    )
    assert notify(pipeline, _promoted(pipeline)) == ["email"]
    (mail,) = smtp.wait_for(1)
    recipients = ["ml-platform@example.com", "oncall@example.com", "alice@example.com", "bob@example.com"]
    assert mail.mail_from == "trainyard@example.com"
    assert list(mail.rcpt_tos) == recipients
    assert mail.message["From"] == "trainyard@example.com"
    assert [a.strip() for a in mail.message["To"].split(",")] == recipients
    assert mail.message["Subject"] == "[trainyard prod] tweet-sentiment: model promoted (v4)"
    body = mail.body
    assert "tweet-sentiment v4 promoted to &#x27;champion&#x27;" in body
    assert "eval_f1_macro 0.912 (champion v3: 0.884)\nmin_improvement 0.01: met" in body
    assert 'href="http://mlflow.example.com/#/experiments/1/runs/abc123"' in body
    run_url = "http://localhost:8080/dags/tweet-sentiment/runs/scheduled__2026-05-01T00%3A00%3A00%2B00%3A00"
    assert f'href="{run_url}"' in body and ">Airflow run</a>" in body
    assert "scheduled__2026-05-01T00:00:00+00:00" in body


def test_an_owner_who_is_not_an_address_is_not_mailed():
    pipeline = _pipeline({"email": _email(to=["ml-platform@example.com"])}, owner="NLP team")
    assert email_recipients(pipeline) == ["ml-platform@example.com"]


def test_no_recipients_sends_no_mail(smtp):
    pipeline = _pipeline({"email": _email()}, owner="NLP team")
    assert notify(pipeline, _promoted(pipeline)) == []
    assert smtp.messages == []


def test_an_event_the_environment_does_not_take_sends_nothing(smtp, slack):
    pipeline = _pipeline(
        {
            "email": _email(to=["ml-platform@example.com"]),
            "slack": {"connection_id": SLACK_CONN},
            "events": ["run_failed"],
        }
    )
    assert notify(pipeline, _promoted(pipeline)) == []
    assert smtp.messages == [] and slack.requests == []


def test_without_notifications_nothing_is_sent(smtp):
    pipeline = _pipeline(None)
    assert notify(pipeline, _promoted(pipeline)) == []
    assert smtp.messages == []


def test_a_dead_smtp_port_is_a_warning_not_an_error(monkeypatch, caplog):
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", smtp_connection(free_port()))
    pipeline = _pipeline({"email": _email(to=["ml-platform@example.com"])})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert notify(pipeline, _promoted(pipeline)) == []
    assert time.monotonic() - started < 10
    (warning,) = _warnings(caplog)
    assert "Notification 'model_promoted' by email failed" in warning
    assert "ConnectionRefusedError" in warning


def test_an_unknown_connection_is_a_warning_not_an_error(monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_SMTP", raising=False)
    pipeline = _pipeline({"email": _email(to=["ml-platform@example.com"], connection_id="no_such_smtp")})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert notify(pipeline, _promoted(pipeline)) == []
    assert time.monotonic() - started < 10
    (warning,) = _warnings(caplog)
    assert "Notification 'model_promoted' by email failed" in warning


def test_a_hung_smtp_server_is_given_up_on_after_the_send_timeout(monkeypatch, caplog):
    """The connection allows 30 s per socket read and 5 retries; notify waits SEND_TIMEOUT_SECONDS."""
    monkeypatch.setattr(notify_module, "SEND_TIMEOUT_SECONDS", 1.0)
    pipeline = _pipeline({"email": _email(to=["ml-platform@example.com"])})
    with SilentServer() as port:
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{SMTP_CONN.upper()}", smtp_connection(port, timeout=30, retry_limit=5)
        )
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert notify(pipeline, _promoted(pipeline)) == []
        assert time.monotonic() - started < 5
    (warning,) = _warnings(caplog)
    assert "by email did not finish within 1 s" in warning


# ------------------------------------------------------------------------------------------ slack


def test_slack_receives_the_payload(slack):
    pipeline = _pipeline({"slack": {"connection_id": SLACK_CONN}})
    assert notify(pipeline, _promoted(pipeline)) == ["slack"]
    ((path, payload),) = slack.requests
    assert path == f"/{SLACK_TOKEN}"
    text = payload["text"]
    assert text.startswith("*[trainyard prod] tweet-sentiment: model promoted (v4)*\n")
    assert "tweet-sentiment v4 promoted to 'champion'" in text
    assert "eval_f1_macro 0.912 (champion v3: 0.884)" in text
    assert "<http://mlflow.example.com/#/experiments/1/runs/abc123|MLflow run>" in text


def test_a_slack_500_is_a_warning_and_mail_still_goes(smtp, slack, caplog):
    slack.status = 500
    pipeline = _pipeline(
        {"email": _email(to=["ml-platform@example.com"]), "slack": {"connection_id": SLACK_CONN}}
    )
    with caplog.at_level(logging.WARNING):
        assert notify(pipeline, _promoted(pipeline)) == ["email"]
    assert len(slack.requests) == 1
    smtp.wait_for(1)
    (warning,) = _warnings(caplog)
    assert "Notification 'model_promoted' by slack failed" in warning and "500" in warning


# ------------------------------------------------------------------------------------ run_failed


def test_the_failure_callback_mails_the_cause_in_one_line(smtp):
    pipeline = _pipeline({"email": _email(to=["ml-platform@example.com"])})
    long_first_line = "CUDA out of memory. Tried to allocate 20.00 GiB " + "x" * 500
    context = {
        "ti": SimpleNamespace(
            task_id="train", try_number=2, log_url="http://airflow.example.com/dags/x/runs/y/tasks/train"
        ),
        "dag_run": SimpleNamespace(run_id="manual__1"),
        "exception": RuntimeError(f"{long_first_line}\n  at line 2\n  at line 3"),
    }
    run_failed_callback(pipeline)(context)
    (mail,) = smtp.wait_for(1)
    assert mail.message["Subject"] == "[trainyard prod] tweet-sentiment: run failed (train)"
    headline = one_line(f"train failed: RuntimeError: {long_first_line}", limit=500)
    assert "train failed: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB xxx" in mail.body
    assert headline not in mail.body, "the cause is cut to one short line"
    assert "…" in mail.body.split("\n")[0] and "at line 2" not in mail.body.split("\n")[0]
    assert "at line 2" in mail.body, "the whole message is in the details"
    assert "http://airflow.example.com/dags/x/runs/y/tasks/train" in mail.body


def test_the_failure_callback_never_raises_even_on_a_broken_context(monkeypatch, caplog):
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", smtp_connection(free_port()))
    pipeline = _pipeline({"email": _email(to=["ml-platform@example.com"])})
    with caplog.at_level(logging.WARNING):
        run_failed_callback(pipeline)({"ti": None, "exception": None})
        run_failed_callback(pipeline)({})
    assert len(_warnings(caplog)) == 2


def test_events_and_their_helpers():
    pipeline = _pipeline(None)
    assert set(notify_module.KIND_TITLES) == set(NOTIFICATION_EVENTS)
    with pytest.raises(ValueError, match="unknown event kind 'exploded'"):
        Event("exploded", "p", "prod", None, "boom")
    assert Event.of(pipeline, "run_failed", "a\nb").headline == "a"
    rejected = Event.candidate_rejected(pipeline, 5, "eval_f1_macro 0.80 < champion 0.88\nmore")
    assert rejected.headline == "tweet-sentiment v5 not promoted: eval_f1_macro 0.80 < champion 0.88"
    assert rejected.subject == "[trainyard prod] tweet-sentiment: candidate rejected (v5)"
    waiting = Event.approval_waiting(pipeline, 6, "champion", links={"Approve": "http://a/b"})
    assert waiting.headline == "tweet-sentiment v6 waits for approval to become 'champion'"
    assert dict(waiting.links) == {"Approve": "http://a/b"}
    skipped = Event.run_skipped(pipeline, "same inputs as run manual__3")
    assert skipped.subject == "[trainyard prod] tweet-sentiment: run skipped"
    assert one_line("  \n  spaced   out \n two") == "spaced out"
    assert one_line("y" * 400) == "y" * 299 + "…"


def test_the_dag_gets_the_failure_callback_only_with_notifications():
    from trainyard.dag import build_dag

    with_notifications = build_dag(_pipeline({"email": _email(to=["ml-platform@example.com"])}))
    assert callable(with_notifications.default_args["on_failure_callback"])
    assert all(task.on_failure_callback for task in with_notifications.tasks)
    without = build_dag(_pipeline(None))
    assert "on_failure_callback" not in without.default_args
    assert not any(task.on_failure_callback for task in without.tasks)


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_a_failed_run_mails_its_cause(smtp, tmp_path, airflow_db):
    """`airflow dags test` of a pipeline whose data fails validation: the failure mail arrives."""
    home = tmp_path / "home"
    write_splits(home / "data" / "tiny", train_rows=120, validation_rows=30)
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    name = "tiny-notify"
    document = tiny_pipeline(name, "tiny-bert", description="Asks for more rows than the data has.")
    document["dataset"]["checks"] = {"min_rows": 100_000, "min_validation_rows": 20}
    document["notifications"] = {"email": ["data-owner@example.com"]}
    (pipelines / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    environments = tmp_path / "environments"
    environments.mkdir()
    for source in (DAGS / "environments").glob("*.yaml"):
        (environments / source.name).write_text(source.read_text())
    local = yaml.safe_load((environments / "local.yaml").read_text())
    local["notifications"] = {"email": _email(to=["ml-platform@example.com"]), "events": ["run_failed"]}
    (environments / "local.yaml").write_text(yaml.safe_dump(local, sort_keys=False))
    env = {
        **os.environ,
        "TRAINYARD_ENV": "local",
        "TRAINYARD_HOME": str(home),
        "TRAINYARD_PIPELINES_DIR": str(pipelines),
        "TRAINYARD_ENVIRONMENTS_DIR": str(environments),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
    }
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", name],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "Dataset validation failed" in output, output[-4000:]
    (mail,) = smtp.wait_for(1, timeout=30)
    assert mail.message["Subject"] == f"[trainyard local] {name}: run failed (validate_data)"
    assert list(mail.rcpt_tos) == ["ml-platform@example.com", "tests@example.com", "data-owner@example.com"]
    headline = html.unescape(mail.body.split("\n")[0])
    cause = f"Pipeline '{name}': Dataset validation failed: 1 of 17 checks failed."
    assert headline == f"<p><b>validate_data failed: {cause}</b></p>", "the cause, in one line"
    assert "min_rows [train]" in mail.body, "the full report is in the details"
    assert f"/dags/{name}/runs/" in mail.body, "a link to the Airflow run"
    assert "Starting trainer" not in output
    assert "Notification 'run_failed' sent by email to ml-platform@example.com" in output, "in the task log"
