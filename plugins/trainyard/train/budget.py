"""Deadlines are budgets: every pod of a try gets only what is left of the task's timeout.

``activeDeadlineSeconds`` counts from each pod's own start, so a pod relaunched near the end of a
try would otherwise get the whole timeout again and train long after the task gave up on it.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta


class BudgetSpent(RuntimeError):
    """Nothing is left of the task's timeout: starting a pod now would only be killed."""


def seconds_left(started: datetime | None, timeout: timedelta | None, now: datetime) -> int | None:
    """Whole seconds left of ``timeout`` since ``started`` (None: no timeout); raises when spent."""
    if timeout is None:
        return None
    if started is None:
        return max(1, math.floor(timeout.total_seconds()))
    left = math.floor((started + timeout - now).total_seconds())
    if left < 1:
        raise BudgetSpent(f"the task's execution_timeout of {timeout} since {started.isoformat()} is spent")
    return left
