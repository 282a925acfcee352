"""SIGTERM as a clean stop: a preempted pod saves and exits. Standard library only, so it is
installed before the heavy imports.

Outside the training loop SIGTERM raises ``Terminated`` at once (the process exits 143 promptly);
inside it (``deferred``) it only sets a flag that ``trainer.checkpoints.PreemptionCallback`` turns
into "save a checkpoint at the end of this optimizer step, then stop".
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

from trainer.errors import Terminated

logger = logging.getLogger(__name__)


class Preemption:
    """Remembers SIGTERM; raises ``Terminated`` unless the training loop is running (``deferred``)."""

    def __init__(self) -> None:
        self.requested = False
        self._deferred = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        first = not self.requested
        self.requested = True
        if self._deferred:
            if first:
                logger.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")
            return
        if first:  # a repeated SIGTERM must not interrupt the clean-up the first one started
            raise Terminated("SIGTERM")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside this block SIGTERM only sets the flag; leaving it raises ``Terminated`` if one came."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
        self.check()

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """For work after the run is complete (recording it as FINISHED, removing checkpoints): a
        SIGTERM now is remembered but does not interrupt it, and the run still ends successfully."""
        deferred, self._deferred = self._deferred, True
        try:
            yield
        finally:
            self._deferred = deferred

    def check(self) -> None:
        if self.requested:
            raise Terminated("SIGTERM")
