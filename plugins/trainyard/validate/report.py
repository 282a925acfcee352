"""The validation report: what :func:`~trainyard.validate.dataset.validate_dataset` found, and the error
that stops a run.

Plain dataclasses, no pyarrow or numpy: the report travels through XCom and into MLflow as
``to_dict()``, and whoever reads it back (``from_dict``) need not load the validator's libraries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CheckResult", "DataReport", "DataValidationError", "Number", "SplitStats", "require_valid"]

#: A check's measured value or threshold, as it appears in the JSON report.
Number = int | float | str | None


@dataclass(frozen=True)
class CheckResult:
    """One check on one split (``split`` is ``"validation"`` for the train/validation overlap)."""

    name: str
    split: str
    passed: bool
    value: Number
    threshold: Number
    message: str

    def line(self) -> str:
        mark = "✔ PASS" if self.passed else "✘ FAIL"
        return f"{mark}  {self.name:<20} {self.split:<10} {self.message}"


@dataclass(frozen=True)
class SplitStats:
    """What one pass over a split found. Counts are 0 for a file that could not be read."""

    uri: str
    readable: bool = False
    columns_present: bool = False
    rows: int = 0
    bytes: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    unknown_label_rows: int = 0
    unknown_label_examples: list[str] = field(default_factory=list)
    null_rows: int = 0
    empty_text_rows: int = 0
    duplicate_rows: int = 0
    sha256: str | None = None


@dataclass(frozen=True)
class DataReport:
    """The outcome of ``validate_dataset``; ``to_dict()`` travels through XCom and into MLflow."""

    passed: bool
    fingerprint: str
    """``sha256:<hex>`` as :func:`trainer.storage.dataset_fingerprint`; "" when a file could not be read."""
    format: str
    train: SplitStats
    validation: SplitStats
    overlap_rows: int
    checks: list[CheckResult]
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    """Not failures: what the owner should know before training (skewed labels, say)."""

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def split(self, name: str) -> SplitStats:
        return {"train": self.train, "validation": self.validation}[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "fingerprint": self.fingerprint,
            "format": self.format,
            "splits": {"train": asdict(self.train), "validation": asdict(self.validation)},
            "overlap_rows": self.overlap_rows,
            "checks": [asdict(c) for c in self.checks],
            "failed": [f"{c.name}[{c.split}]" for c in self.failures],
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        splits = data["splits"]
        return cls(
            passed=data["passed"],
            fingerprint=data["fingerprint"],
            format=data["format"],
            train=SplitStats(**splits["train"]),
            validation=SplitStats(**splits["validation"]),
            overlap_rows=data["overlap_rows"],
            checks=[CheckResult(**c) for c in data["checks"]],
            seconds=data.get("seconds", 0.0),
            warnings=list(data.get("warnings", [])),
        )

    def summary(self) -> str:
        failed = len(self.failures)
        head = (
            f"Dataset {'PASSED' if self.passed else 'FAILED'}: "
            f"{len(self.checks) - failed} of {len(self.checks)} checks passed; "
            f"train {self.train.rows:,} rows, validation {self.validation.rows:,} rows; "
            f"fingerprint {self.fingerprint or '(unavailable)'}"
        )
        warnings = [f"⚠ WARN  {w}" for w in self.warnings]
        return "\n".join([head, *(c.line() for c in self.checks), *warnings])


class DataValidationError(Exception):
    """The dataset breached at least one check; ``report`` holds everything that was found."""

    def __init__(self, report: DataReport) -> None:
        self.report = report
        failures = report.failures
        lines = [f"Dataset validation failed: {len(failures)} of {len(report.checks)} checks failed."]
        lines += [f"  ✘ {c.name} [{c.split}]: {c.message}" for c in failures]
        lines.append(
            "Fix the data files above (or, where the data is right, relax dataset.checks in the pipeline "
            "YAML) and trigger the run again. No training was started."
        )
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type, tuple[DataReport]]:
        return (type(self), (self.report,))  # picklable although __init__ takes the report


def require_valid(report: DataReport) -> DataReport:
    """Return ``report`` if it passed; raise :class:`DataValidationError` naming every failure if not."""
    if not report.passed:
        raise DataValidationError(report)
    return report
