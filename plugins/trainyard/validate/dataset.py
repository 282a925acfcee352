"""``validate_dataset``: the entry point of the ``validate_data`` task's data checks.

It lives apart from :mod:`~trainyard.validate.checks` so that each module has one job: scanning reads
(pyarrow, I/O), checks judge (no I/O, no pyarrow), and this module only wires them together and
assembles the :class:`~trainyard.validate.report.DataReport`. Importing it imports pyarrow: do so only
inside the task, never at DAG parse time.
"""

from __future__ import annotations

import time

from trainer.spec import DataSpec
from trainyard.config.pipeline_schema import DataChecks
from trainyard.validate.checks import check_splits, class_share_warnings
from trainyard.validate.hashing import fingerprint
from trainyard.validate.report import DataReport
from trainyard.validate.scanning import scan_dataset

__all__ = ["validate_dataset"]


def validate_dataset(
    data: DataSpec,
    checks: DataChecks,
    s3_endpoint_url: str | None = None,
    block_size: int = 4 << 20,
    class_weights: str = "none",
) -> DataReport:
    """Validate ``data`` against ``checks`` in one streaming pass per split; never raises for bad data.

    Use :func:`~trainyard.validate.report.require_valid` on the result to stop a run.
    """
    started = time.perf_counter()
    train, validation = scan_dataset(data, s3_endpoint_url, block_size)
    results = check_splits(train, validation, data, checks)
    return DataReport(
        passed=all(r.passed for r in results),
        fingerprint=fingerprint(train.sha256, validation.sha256),
        format=data.format,
        train=train.stats(),
        validation=validation.stats(),
        overlap_rows=validation.overlap_rows or 0,
        checks=results,
        seconds=time.perf_counter() - started,
        warnings=class_share_warnings(train, data, checks, class_weights),
    )
