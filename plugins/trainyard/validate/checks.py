"""The checks: turning a split's counts into pass/fail results with messages that say what to fix.

Pure policy over two :class:`~trainyard.validate.scanning.SplitScan` objects, no I/O and no pyarrow
import: the scanner counts, this module judges. The checks of the form "at most ``dataset.checks.max_*``
of the rows may have X" are the rows of :data:`FRACTION_CHECKS`, evaluated by one loop, so a new one is
one row, and all of them read, measure and word their failure the same way.

Fractions are of the split's rows; class shares are of the rows with a known label.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING

from trainer.spec import DataSpec
from trainyard.config.pipeline_schema import DataChecks
from trainyard.validate.report import CheckResult, Number

if TYPE_CHECKING:
    from trainyard.validate.scanning import SplitScan

__all__ = ["CHECK_NAMES", "FRACTION_CHECKS", "FractionCheck", "check_splits", "class_share_warnings"]

#: Every check name a report may hold, in report order (within each split).
CHECK_NAMES = (
    "readable",
    "required_columns",
    "min_rows",
    "null_fraction",
    "empty_text_fraction",
    "label_values",
    "min_class_share",
    "duplicate_fraction",
    "overlap_fraction",
)
_ORDER = {name: i for i, name in enumerate(CHECK_NAMES)}


@dataclass(frozen=True)
class FractionCheck:
    """``count(scan) / scan.rows`` must be at most the ``DataChecks`` field ``limit_field``.

    ``count`` returning ``None`` means the check does not apply to that split (the overlap is counted on
    validation only, and only when both splits have their columns). The message reads
    "<where>: <n> of <rows> rows (<pct>) <counted>; allowed <pct>", then, on failure,
    "<fix>, or raise dataset.checks.<limit_field>."; ``{train_uri}`` in ``counted`` is filled in.
    """

    name: str
    limit_field: str
    count: Callable[[SplitScan], int | None]
    counted: str
    fix: str


#: The "at most this fraction of rows" checks, in no particular order (the report sorts by CHECK_NAMES).
FRACTION_CHECKS: tuple[FractionCheck, ...] = (
    FractionCheck(
        "null_fraction",
        "max_null_fraction",
        attrgetter("null_rows"),
        "have a null (empty) text or label",
        "Drop or fill those rows",
    ),
    FractionCheck(
        "empty_text_fraction",
        "max_empty_text_fraction",
        attrgetter("empty_rows"),
        "have a blank text",
        "Drop those rows",
    ),
    FractionCheck(
        "duplicate_fraction",
        "max_duplicate_fraction",
        attrgetter("duplicate_rows"),
        "repeat an earlier text",
        "Deduplicate the split",
    ),
    FractionCheck(
        "overlap_fraction",
        "max_overlap_fraction",
        attrgetter("overlap_rows"),
        "have a text that is also in train file {train_uri}",
        "Remove those rows from one split (leakage inflates validation metrics)",
    ),
)


def check_splits(
    train: SplitScan, validation: SplitScan, data: DataSpec, checks: DataChecks
) -> list[CheckResult]:
    """Every check, in report order: train's, then validation's (the overlap last). Never raises."""
    return [
        *_split_checks(train, data, checks, train.uri),
        *_split_checks(validation, data, checks, train.uri),
    ]


def class_share_warnings(
    train: SplitScan, data: DataSpec, checks: DataChecks, class_weights: str
) -> list[str]:
    """A warning per label under ``warn_class_share`` of the training rows (above the failing floor
    ``min_class_share``): plain cross-entropy learns to ignore such a class, which macro F1 shows.
    The fix is named unless it is on already."""
    counts = [int(c) for c in train.label_counts] if train.columns_ok else []
    labelled = sum(counts)
    if not labelled:
        return []
    low = [
        (name, count)
        for name, count in zip(data.label_names, counts, strict=True)
        if checks.min_class_share <= _fraction(count, labelled) < checks.warn_class_share
    ]
    if not low:
        return []
    listing = ", ".join(f"{n!r} {c:,} rows ({_pct(_fraction(c, labelled))})" for n, c in low)
    advice = (
        "training.class_weights is auto, so the loss weights them up"
        if class_weights == "auto"
        else "set training.class_weights: auto to weight the loss by inverse class frequency"
    )
    return [
        f"{_where(train)}: skewed labels, under {_pct(checks.warn_class_share)} of the rows: {listing}; "
        f"{advice} (dataset.checks.warn_class_share sets this threshold)"
    ]


def _pct(value: float) -> str:
    return f"{value * 100:.2f}%"


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def _where(scan: SplitScan) -> str:
    return f"{scan.split} file {scan.uri}"


def _split_checks(scan: SplitScan, data: DataSpec, checks: DataChecks, train_uri: str) -> list[CheckResult]:
    """One split's checks; a file that cannot be read, or lacks its columns, gets no row checks."""
    results = _gate_checks(scan, data)
    if not scan.columns_ok:
        return results
    results += [
        _min_rows(scan, checks),
        _label_values(scan, data),
        _min_class_share(scan, data, checks),
        *_fraction_checks(scan, checks, train_uri),
    ]
    return sorted(results, key=lambda r: _ORDER[r.name])


def _fraction_checks(scan: SplitScan, checks: DataChecks, train_uri: str) -> list[CheckResult]:
    """The one loop over :data:`FRACTION_CHECKS`."""
    results = []
    for row in FRACTION_CHECKS:
        count = row.count(scan)
        if count is None:
            continue
        limit: float = getattr(checks, row.limit_field)
        value = _fraction(count, scan.rows)
        ok = value <= limit
        message = (
            f"{_where(scan)}: {count:,} of {scan.rows:,} rows ({_pct(value)}) "
            f"{row.counted.format(train_uri=train_uri)}; allowed {_pct(limit)}"
            + ("" if ok else f". {row.fix}, or raise dataset.checks.{row.limit_field}.")
        )
        results.append(CheckResult(row.name, scan.split, ok, value, limit, message))
    return results


def _gate_checks(scan: SplitScan, data: DataSpec) -> list[CheckResult]:
    """``readable`` and ``required_columns``: a failure here skips the split's other checks."""
    split, where, fmt = scan.split, _where(scan), data.format
    if not scan.readable:
        message = (
            f"{where} cannot be read: {scan.error}. Fix or re-export the file (dataset.{split} in the "
            f"pipeline YAML must point at a complete {fmt} file); the other checks of this file were "
            "skipped."
        )
        return [CheckResult("readable", split, False, None, None, message)]
    results = [
        CheckResult("readable", split, True, None, None, f"{where} read as {fmt} ({scan.bytes:,} bytes)")
    ]

    if scan.missing_columns or scan.label_type_error:
        found = ", ".join(scan.found_columns) if scan.found_columns else "(could not read the header)"
        value: Number
        if scan.missing_columns:
            missing = ", ".join(repr(c) for c in scan.missing_columns)
            message = (
                f"{where} has no column {missing}; columns found: {found}. Rename the column in the file "
                f"or set dataset.text_column / dataset.label_column in the pipeline YAML."
            )
            value = ", ".join(scan.missing_columns)
        else:
            message = f"{where}: {scan.label_type_error}. Store label names (strings) or class ids (ints)."
            value = data.label_column
        message += " The other checks of this file were skipped."
        return [*results, CheckResult("required_columns", split, False, value, None, message)]
    message = f"{where} has text column {data.text_column!r} and label column {data.label_column!r}"
    return [*results, CheckResult("required_columns", split, True, None, None, message)]


def _min_rows(scan: SplitScan, checks: DataChecks) -> CheckResult:
    rows = scan.rows
    train = scan.split == "train"
    minimum = checks.min_rows if train else checks.min_validation_rows
    knob = "min_rows" if train else "min_validation_rows"
    message = f"{_where(scan)} has {rows:,} rows; at least {minimum:,} required" + (
        "" if rows >= minimum else f". Add data or lower dataset.checks.{knob}."
    )
    return CheckResult("min_rows", scan.split, rows >= minimum, rows, minimum, message)


def _label_values(scan: SplitScan, data: DataSpec) -> CheckResult:
    names = data.label_names
    declared = f"label_names [{', '.join(names)}] or class ids 0..{len(names) - 1}"
    if scan.unknown_rows:
        suggestions = []
        for shown in scan.unknown_examples:
            close = difflib.get_close_matches(shown.strip("'\""), names, n=1)
            suggestions.append(f"{shown} (did you mean {close[0]!r}?)" if close else shown)
        message = (
            f"{_where(scan)}: {scan.unknown_rows:,} rows have a label outside {declared}, e.g. "
            f"{', '.join(suggestions)}. Relabel or drop those rows, or add the label to dataset.label_names."
        )
    else:
        message = f"{_where(scan)}: every non-null label is one of {declared}"
    return CheckResult("label_values", scan.split, scan.unknown_rows == 0, scan.unknown_rows, 0, message)


def _min_class_share(scan: SplitScan, data: DataSpec, checks: DataChecks) -> CheckResult:
    names, where, minimum = data.label_names, _where(scan), checks.min_class_share
    counts = [int(c) for c in scan.label_counts]
    labelled = sum(counts)
    shares = {name: _fraction(c, labelled) for name, c in zip(names, counts, strict=True)}
    low = {name: s for name, s in shares.items() if s < minimum}
    smallest = min(shares.values()) if labelled else 0.0
    listing = ", ".join(f"{n} {c:,} ({_pct(shares[n])})" for n, c in zip(names, counts, strict=True))
    if not labelled:
        message = f"{where} has no row with a known label, so every class is missing"
    elif low:
        message = (
            f"{where}: class share below {_pct(minimum)} for "
            f"{', '.join(f'{n!r} ({_pct(s)})' for n, s in low.items())}; counts: {listing}. Add examples of "
            f"those classes, or lower dataset.checks.min_class_share."
        )
    else:
        message = f"{where}: every class has at least {_pct(minimum)}; counts: {listing}"
    return CheckResult("min_class_share", scan.split, labelled > 0 and not low, smallest, minimum, message)
