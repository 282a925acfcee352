"""Deadlines are budgets: every pod of a try gets only what is left of the task's timeout.

``activeDeadlineSeconds`` counts from each pod's own start, so a pod relaunched near the end of a
try would otherwise get the whole timeout again and train long after the task gave up on it. The
deadline is fixed once per try (and kept in the run state), because the task instance's start
date is not always kept when a task resumes from deferral.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta


class BudgetSpent(RuntimeError):
    """Nothing is left of the task's timeout: starting a pod now would only be killed."""


def deadline_for(started: datetime | None, timeout: timedelta | None, now: datetime) -> datetime | None:
    """When this try must end: ``timeout`` after it started (None: no timeout)."""
    if timeout is None:
        return None
    return (started or now) + timeout


def seconds_left(deadline: datetime | None, now: datetime) -> int | None:
    """Whole seconds until ``deadline`` (None: no deadline); raises when none is left."""
    if deadline is None:
        return None
    left = math.floor((deadline - now).total_seconds())
    if left < 1:
        raise BudgetSpent(f"the task's execution_timeout ended at {deadline.isoformat()}")
    return left
