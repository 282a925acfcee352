"""Step metrics sent to MLflow from a background thread: a tracking-server outage during training
costs log lines, never the run.

MLflow's client retries a failing request for minutes (7 tries with backoff) and then raises. Done
inline on rank 0 every logging step, that would stall all ranks (they wait for rank 0 in the next
gradient all-reduce) and then kill a multi-GPU run for a metrics hiccup. Here the training loop
only appends to a queue; a daemon thread sends batches with ``MlflowClient.log_batch``, keeps a
batch that failed and sends it again later with backoff, and ``close`` reconciles at the end: it
sends what is still pending (bounded in time) and says what could not be sent. What the run's
outcome depends on (its start, the final metrics, the model, its end) stays synchronous.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Pending metrics kept at most while the server is unreachable: about a day of logging steps.
MAX_PENDING = 100_000
#: log_batch takes at most 1000 metrics per call.
BATCH_SIZE = 1000


class MetricsQueue:
    """Send ``(key, value, step, timestamp_ms)`` entries through ``send`` (one ``log_batch`` call),
    never blocking the caller; ``close`` waits up to ``timeout`` seconds for the rest."""

    def __init__(
        self,
        send: Callable[[list[tuple[str, float, int, int]]], None],
        *,
        retry_delays: tuple[float, ...] = (1, 2, 5, 10, 30, 60),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._delays = retry_delays
        self._clock = clock
        self._pending: deque[tuple[str, float, int, int]] = deque(maxlen=MAX_PENDING)
        self._dropped = 0
        self._failures = 0  # consecutive failed sends
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def put(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if len(self._pending) == self._pending.maxlen:
                    self._dropped += 1  # the oldest goes: recent progress matters more
                self._pending.append((key, float(value), step, timestamp))
        self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _take(self) -> list[tuple[str, float, int, int]]:
        with self._lock:
            return [self._pending[i] for i in range(min(BATCH_SIZE, len(self._pending)))]

    def _done(self, count: int) -> None:
        with self._lock:
            for _ in range(count):
                self._pending.popleft()

    def _flush_once(self) -> bool:
        """Send one batch; False when the send failed (the batch stays pending)."""
        batch = self._take()
        if not batch:
            return True
        try:
            self._send(batch)
        except Exception as error:  # any client or server error: keep the batch, retry later
            self._failures += 1
            delay = self._delays[min(self._failures - 1, len(self._delays) - 1)]
            self._retry_at = self._clock() + delay
            if self._failures == 1 or self._failures % 10 == 0:
                logger.warning(
                    "MLflow metrics not sent (%d pending, attempt %d, next in %.0f s): %s",
                    self.pending,
                    self._failures,
                    delay,
                    error,
                )
            return False
        if self._failures:
            logger.info("MLflow metrics sent again after %d failed attempts", self._failures)
        self._failures = 0
        self._done(len(batch))
        return True

    def _loop(self) -> None:
        while not self._closing:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._clock() < self._retry_at:
                continue
            while self.pending and not self._closing and self._flush_once():
                pass

    def close(self, timeout: float = 60.0) -> int:
        """Wait up to ``timeout`` seconds for the thread to send what is pending (retrying every few
        seconds now), then stop it; the number of metrics that could not be sent (0 = complete).
        A send stuck in the client's own retries is left to the daemon thread, not waited for."""
        deadline = self._clock() + timeout
        self._delays = tuple(min(d, 5.0) for d in self._delays)
        self._retry_at = min(self._retry_at, self._clock() + 5.0)
        while self.pending and self._clock() < deadline and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.1)
        self._closing = True
        self._wake.set()
        lost = self.pending + self._dropped
        if lost:
            logger.warning(
                "%d step metrics could not be sent to MLflow (server unreachable); training was not "
                "affected, the run's final metrics and model are logged separately",
                lost,
            )
        return lost
