"""Email and Slack notifications of a pipeline's events, sent by Airflow's own notifiers.

The environment chooses the channels (``notifications.email`` through the smtp provider's
``SmtpNotifier``, ``notifications.slack`` through the slack provider's ``SlackWebhookNotifier``)
and which events go out (``notifications.events``); a pipeline adds mail recipients (its owner
when that is an address, and ``notifications.email``).

A notification never changes a run's outcome: a notifier that raises (server down, unknown
connection, timeout) is logged as a warning, and each send runs in a worker thread that is given
at most ``SEND_TIMEOUT_SECONDS``, so a hung server cannot stall a task. The providers are
imported only when something is sent: DAG files that import this module stay cheap to parse.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from trainyard.config.environment_schema import NOTIFICATION_EVENTS
from trainyard.config.pipeline_schema import EMAIL

if TYPE_CHECKING:
    from trainyard.config.loading import ResolvedPipeline

#: The longest a call to ``notify`` waits for its channels (they are sent in parallel).
SEND_TIMEOUT_SECONDS = 60.0
#: The Slack notifier's HTTP timeout. SMTP reads ``timeout`` (and ``retry_limit``) from the
#: connection's extras; ``SEND_TIMEOUT_SECONDS`` bounds it whatever they say.
SLACK_TIMEOUT_SECONDS = 10
#: How much of an exception's first line a failure's headline keeps.
CAUSE_CHARS = 300

#: The subject's wording of each event kind.
KIND_TITLES: Mapping[str, str] = MappingProxyType(
    {
        "run_failed": "run failed",
        "model_promoted": "model promoted",
        "candidate_rejected": "candidate rejected",
        "approval_waiting": "approval waiting",
        "run_skipped": "run skipped",
    }
)
_log = logging.getLogger(__name__)


def one_line(text: object, limit: int = CAUSE_CHARS) -> str:
    """The first non-blank line of ``text``, whitespace collapsed, cut to ``limit`` characters."""
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    first = next((line for line in lines if line), "")
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def exception_cause(exception: BaseException | str | None) -> str:
    """An exception in one line: its message, named by its type unless Airflow raised it on purpose."""
    if exception is None:
        return "no exception recorded"
    if isinstance(exception, str):
        return one_line(exception) or "no message"
    message = one_line(exception)
    name = type(exception).__name__
    if not message:
        return name
    return message if name.startswith("Airflow") else one_line(f"{name}: {message}")


def _run_id(context: Mapping[str, Any] | None) -> str | None:
    if not context:
        return None
    dag_run = context.get("dag_run")
    return getattr(dag_run, "run_id", None) or context.get("run_id")


def airflow_run_url(dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow UI (``[api] base_url``)."""
    from airflow.sdk.configuration import conf

    base = conf.get("api", "base_url", fallback="http://localhost:8080/").rstrip("/")
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


@dataclass(frozen=True)
class Event:
    """Something to tell people about one run of one pipeline in one environment."""

    kind: str  # one of NOTIFICATION_EVENTS
    pipeline: str
    environment: str
    dag_run_id: str | None
    headline: str  # one line: "tweet-sentiment v4 promoted to 'champion'"
    details: str = ""  # plain text / markdown, several lines: numbers, reasons
    links: Mapping[str, str] = field(default_factory=dict)  # name -> URL
    tag: str | None = None  # short qualifier at the end of the subject: "v4", "train"

    def __post_init__(self) -> None:
        if self.kind not in NOTIFICATION_EVENTS:
            raise ValueError(f"unknown event kind '{self.kind}'; one of {', '.join(NOTIFICATION_EVENTS)}")
        object.__setattr__(self, "headline", one_line(self.headline, limit=500))
        object.__setattr__(self, "links", dict(self.links))  # a copy: the caller's may change

    @property
    def subject(self) -> str:
        """``[trainyard prod] tweet-sentiment: model promoted (v4)``."""
        tag = f" ({self.tag})" if self.tag else ""
        return f"[trainyard {self.environment}] {self.pipeline}: {KIND_TITLES[self.kind]}{tag}"

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def of(
        cls,
        pipeline: ResolvedPipeline,
        kind: str,
        headline: str,
        *,
        context: Mapping[str, Any] | None = None,
        details: str = "",
        links: Mapping[str, str] | None = None,
        tag: str | None = None,
    ) -> Event:
        """An event of ``pipeline``; with a task ``context``, its run id and an "Airflow run" link."""
        run_id = _run_id(context)
        all_links = dict(links or {})
        if run_id:
            all_links.setdefault("Airflow run", airflow_run_url(pipeline.name, run_id))
        return cls(
            kind=kind,
            pipeline=pipeline.name,
            environment=pipeline.environment.name,
            dag_run_id=run_id,
            headline=headline,
            details=details,
            links=all_links,
            tag=tag,
        )

    @classmethod
    def run_failed(cls, pipeline: ResolvedPipeline, context: Mapping[str, Any]) -> Event:
        """From an ``on_failure_callback`` context: "<task> failed: <cause in one line>"."""
        ti = context.get("ti")
        task_id = getattr(ti, "task_id", None) or "a task"
        exception = context.get("exception")
        lines = [f"Task: {task_id}"]
        if getattr(ti, "try_number", None):
            lines.append(f"Try: {ti.try_number}")  # type: ignore[union-attr]
        if exception is not None:
            lines += ["", str(exception).strip()[:4000]]
        links = {}
        log_url = getattr(ti, "log_url", None)
        if isinstance(log_url, str):
            links["Task log"] = log_url
        return cls.of(
            pipeline,
            "run_failed",
            f"{task_id} failed: {exception_cause(exception)}",
            context=context,
            details="\n".join(lines),
            links=links,
            tag=task_id if ti is not None else None,
        )

    @classmethod
    def model_promoted(
        cls, pipeline: ResolvedPipeline, version: str | int, alias: str, **kwargs: Any
    ) -> Event:
        """``kwargs``: context, details, links (as ``Event.of``)."""
        headline = f"{pipeline.name} v{version} promoted to '{alias}'"
        return cls.of(pipeline, "model_promoted", headline, tag=f"v{version}", **kwargs)

    @classmethod
    def candidate_rejected(
        cls, pipeline: ResolvedPipeline, version: str | int | None, reason: str, **kwargs: Any
    ) -> Event:
        candidate = f"{pipeline.name} v{version}" if version is not None else f"{pipeline.name} candidate"
        headline = f"{candidate} not promoted: {one_line(reason)}"
        tag = f"v{version}" if version is not None else None
        return cls.of(pipeline, "candidate_rejected", headline, tag=tag, **kwargs)

    @classmethod
    def approval_waiting(
        cls, pipeline: ResolvedPipeline, version: str | int, alias: str, **kwargs: Any
    ) -> Event:
        headline = f"{pipeline.name} v{version} waits for approval to become '{alias}'"
        return cls.of(pipeline, "approval_waiting", headline, tag=f"v{version}", **kwargs)

    @classmethod
    def run_skipped(cls, pipeline: ResolvedPipeline, reason: str, **kwargs: Any) -> Event:
        return cls.of(pipeline, "run_skipped", f"run skipped: {one_line(reason)}", **kwargs)


# --------------------------------------------------------------------------------- rendering


def email_recipients(pipeline: ResolvedPipeline) -> list[str]:
    """The environment's ``to``, the owner when an address, the pipeline's extras; each once."""
    channel = pipeline.environment.notifications and pipeline.environment.notifications.email
    candidates = [*(channel.to if channel else ())]
    if EMAIL.match(pipeline.config.owner.strip()):
        candidates.append(pipeline.config.owner.strip())
    candidates += pipeline.config.notifications.email
    unique: dict[str, str] = {}
    for address in candidates:
        unique.setdefault(address.lower(), address)
    return list(unique.values())


def email_html(event: Event) -> str:
    escape = html.escape
    parts = [f"<p><b>{escape(event.headline)}</b></p>"]
    if event.details.strip():
        parts.append(f'<pre style="white-space: pre-wrap">{escape(event.details.strip())}</pre>')
    if event.links:
        items = "".join(
            f'<li><a href="{escape(url)}">{escape(name)}</a>: {escape(url)}</li>'
            for name, url in event.links.items()
        )
        parts.append(f"<ul>{items}</ul>")
    run = f" · run <code>{escape(event.dag_run_id)}</code>" if event.dag_run_id else ""
    parts.append(
        f"<p>Pipeline <code>{escape(event.pipeline)}</code> · environment "
        f"<code>{escape(event.environment)}</code>{run}</p>"
    )
    return "\n".join(parts)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(event: Event) -> str:
    lines = [f"*{_slack_escape(event.subject)}*", _slack_escape(event.headline)]
    if event.details.strip():
        lines.append("```" + _slack_escape(event.details.strip()[:2500]) + "```")
    if event.links:
        lines.append(" · ".join(f"<{url}|{_slack_escape(name)}>" for name, url in event.links.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- sending


def notify(
    pipeline: ResolvedPipeline,
    event: Event,
    context: Mapping[str, Any] | None = None,
    *,
    log: Any = None,
) -> list[str]:
    """Send ``event`` on every channel of the environment that takes its kind; never raises.

    Returns the channels that sent it ("email", "slack"); a failed or slow channel is a warning.
    """
    log = log or _log
    try:
        sends = _sends(pipeline, event, dict(context or {}), log)
    except Exception as exc:
        log.warning(f"Notification '{event.kind}' not sent: {exception_cause(exc)}")
        return []
    return _send_all(sends, event, log) if sends else []


def _sends(
    pipeline: ResolvedPipeline, event: Event, context: dict[str, Any], log: Any
) -> dict[str, Callable[[], str]]:
    """channel -> a call that sends on it and says where it went."""
    settings = pipeline.environment.notifications
    if settings is None or event.kind not in settings.events:
        return {}
    sends: dict[str, Callable[[], str]] = {}
    if settings.email is not None:
        channel = settings.email
        recipients = email_recipients(pipeline)
        if recipients:

            def send_email() -> str:
                from airflow.providers.smtp.notifications.smtp import SmtpNotifier

                # notify(), not __call__: our text is not a Jinja template ("{{" in an error stays).
                SmtpNotifier(
                    to=recipients,
                    from_email=channel.from_email,
                    subject=event.subject,
                    html_content=email_html(event),
                    smtp_conn_id=channel.connection_id,
                ).notify(context)
                return f"to {', '.join(recipients)}"

            sends["email"] = send_email
        else:
            log.info(f"Notification '{event.kind}': no email recipients (notifications.email.to)")
    if settings.slack is not None:
        slack = settings.slack

        def send_slack() -> str:
            from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

            SlackWebhookNotifier(
                slack_webhook_conn_id=slack.connection_id,
                text=slack_text(event),
                timeout=SLACK_TIMEOUT_SECONDS,
            ).notify(context)
            return f"through connection '{slack.connection_id}'"

        sends["slack"] = send_slack
    return sends


def _send_all(sends: dict[str, Callable[[], str]], event: Event, log: Any) -> list[str]:
    """Run each send in its own daemon thread; wait for all of them at most SEND_TIMEOUT_SECONDS."""
    outcomes: dict[str, tuple[bool, str]] = {}

    def run(channel: str, send: Callable[[], str]) -> None:
        try:
            outcomes[channel] = (True, send())
        except Exception as exc:
            outcomes[channel] = (False, exception_cause(exc))

    threads = {
        channel: threading.Thread(
            target=run, args=(channel, send), name=f"trainyard-notify-{channel}", daemon=True
        )
        for channel, send in sends.items()
    }
    deadline = time.monotonic() + SEND_TIMEOUT_SECONDS
    for thread in threads.values():
        thread.start()
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    sent = []
    for channel in threads:
        outcome = outcomes.get(channel)
        if outcome is None:
            log.warning(
                f"Notification '{event.kind}' by {channel} did not finish within "
                f"{SEND_TIMEOUT_SECONDS:g} s; not waiting for it"
            )
        elif outcome[0]:
            sent.append(channel)
            log.info(f"Notification '{event.kind}' sent by {channel} {outcome[1]}: {event.subject}")
        else:
            log.warning(f"Notification '{event.kind}' by {channel} failed: {outcome[1]}")
    return sent


def run_failed_callback(pipeline: ResolvedPipeline) -> Callable[[Mapping[str, Any]], None]:
    """An ``on_failure_callback`` that sends ``run_failed`` (Airflow calls it after the last try)."""

    def on_failure(context: Mapping[str, Any]) -> None:
        try:
            event = Event.run_failed(pipeline, context)
        except Exception as exc:
            _log.warning(f"Notification 'run_failed' not sent: {exception_cause(exc)}")
            return
        notify(pipeline, event, context)

    on_failure.__qualname__ = f"run_failed_callback({pipeline.name})"
    return on_failure
