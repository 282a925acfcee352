"""SIGTERM as a clean stop: a preempted pod saves and exits. Standard library only, so it is
installed before the heavy imports.

Outside the training loop SIGTERM raises ``Terminated`` at once (the process exits 143 promptly);
inside it (``deferred``) it only sets a flag that ``trainer.checkpoints.PreemptionCallback`` turns
into "save a checkpoint at the end of this optimizer step, then stop". With several ranks they
enter the loop together or not at all (``start_together``), and agree on the step they stop at.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import time
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

    def start_together(self, world_size: int, poll_seconds: float = 0.05) -> None:
        """Called by every rank inside ``deferred()`` right before the training loop: all ranks enter
        it, or, when a rank got SIGTERM first, none does and each raises ``Terminated``.

        Without it a rank stopped by SIGTERM outside the loop (rank 0 starting the MLflow run, say)
        exits at once, while the ranks already in the loop wait in its first collective until the
        launcher kills them at the end of the grace period. The wait here polls the launcher's TCP
        store (``MASTER_ADDR``/``MASTER_PORT``, which outlives the ranks), so a waiting rank still sees
        SIGTERM, where a NCCL barrier would block. One decision is written, by ``compare_set``, and
        every rank follows it: "go" from the last rank to arrive, or "stop" from a rank that saw
        SIGTERM before that. A SIGTERM after "go" is the training loop's (a checkpoint at the end of
        the first step). A rank that dies before arriving leaves the decision to the others: the
        launcher sends them SIGTERM.
        """
        if world_size <= 1 or "MASTER_ADDR" not in os.environ:
            self.check()
            return
        import torch.distributed as dist

        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=60),
        )
        prefix = f"trainyard/start-training/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        decision = f"{prefix}/decision"
        if self.requested:
            store.compare_set(decision, "", "stop")
        elif store.add(f"{prefix}/arrived", 1) >= world_size:
            store.compare_set(decision, "", "go")
        while not store.check([decision]):
            if self.requested:
                store.compare_set(decision, "", "stop")
            else:
                time.sleep(poll_seconds)
        if store.get(decision) == b"stop":
            logger.warning("SIGTERM before training started: stopping on every rank, nothing to save")
            raise Terminated("SIGTERM")
