"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, keeping every message it receives."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any


def free_port() -> int:
    """A port nothing listens on (just now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def smtp_connection(port: int, **extra: Any) -> str:
    """``AIRFLOW_CONN_<ID>`` for a plain (no SSL, no STARTTLS) SMTP server on 127.0.0.1:``port``."""
    return json.dumps(
        {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": port,
            "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 5, "retry_limit": 0, **extra},
        }
    )


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage

    @property
    def body(self) -> str:
        part = self.message.get_body(("html", "plain"))
        return part.get_content() if part is not None else ""


class SmtpSink:
    """``with SmtpSink() as smtp:`` listens on ``smtp.port``; ``smtp.wait_for(1)`` gives the mail."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self._arrived = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd's hook
        received = Received(
            envelope.mail_from,
            tuple(envelope.rcpt_tos),
            message_from_bytes(envelope.original_content or envelope.content, policy=policy.default),  # type: ignore[arg-type]
        )
        with self._arrived:
            self.messages.append(received)
            self._arrived.notify_all()
        return "250 Message accepted for delivery"

    def __enter__(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def connection(self, **extra: Any) -> str:
        return smtp_connection(self.port, **extra)

    def wait_for(self, count: int = 1, timeout: float = 10) -> list[Received]:
        """The first ``count`` messages, once they are there (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.messages)} of {count} messages arrived within {timeout} s"
                self._arrived.wait(left)
            return list(self.messages[:count])


class SilentServer:
    """``with SilentServer() as port:`` accepts TCP connections and never says a word (a hung server)."""

    def __enter__(self) -> int:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(8)  # the kernel completes the handshake; nobody ever answers
        return self._socket.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self._socket.close()
