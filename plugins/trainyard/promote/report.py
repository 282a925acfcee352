"""The decision as people read it: on the approval page and in notifications.

Candidate and champion side by side on the same validation data, per class where the trainer
logged it, the data report's summary, and links to MLflow. Pure: the inputs are the ``promote``
decision, the validation report from the hand-off and the per-class document of the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.spec import PER_CLASS_ARTIFACT

#: Classes shown per table; the per-class artifact has all of them.
MAX_CLASSES_SHOWN = 30


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def comparison_lines(decision: Mapping[str, Any]) -> list[str]:
    metric = decision["metric"]
    champion = decision.get("champion_version")
    source = decision.get("champion_value_source")
    lines = [f"**Decision:** {decision['reason']}", ""]
    if champion is None:
        lines.append(f"No champion yet: the candidate's {metric} is {_fmt(decision['candidate_value'])}.")
        return lines
    on = (
        f"both on the candidate's validation data ({str(decision.get('compared_on'))[:19]}…)"
        if source == "rescored"
        else "champion value as recorded on its own data"
    )
    lines += [
        f"| | {metric} |",
        "| --- | --- |",
        f"| candidate v{decision.get('version')} | {_fmt(decision['candidate_value'])} |",
        f"| champion v{champion} ({on}) | {_fmt(decision.get('champion_value'))} |",
    ]
    recorded = decision.get("champion_recorded_value")
    if recorded is not None and source == "rescored":
        lines.append(f"| champion v{champion} as recorded on its own data | {_fmt(recorded)} |")
    if decision.get("champion_unscorable"):
        lines += ["", f"The champion could not be scored on this data: {decision['champion_unscorable']}."]
    return lines


def per_class_lines(per_class: Mapping[str, Any] | None) -> list[str]:
    """F1 per class for both models, from the trainer's per-class document."""
    if not per_class or not per_class.get("candidate"):
        return []
    candidate, champion = per_class["candidate"], per_class.get("champion") or {}
    labels = list(per_class.get("labels") or candidate)
    lines = ["", "| class | support | candidate F1 | champion F1 |", "| --- | --- | --- | --- |"]
    for label in labels[:MAX_CLASSES_SHOWN]:
        mine = candidate.get(label, {})
        theirs = champion.get(label, {})
        lines.append(
            f"| {label} | {mine.get('support', '-')} | {_fmt(mine.get('f1'))} | {_fmt(theirs.get('f1'))} |"
        )
    if len(labels) > MAX_CLASSES_SHOWN:
        lines.append(f"| … {len(labels) - MAX_CLASSES_SHOWN} more in `{PER_CLASS_ARTIFACT}` | | | |")
    return lines


def data_lines(report: Mapping[str, Any] | None) -> list[str]:
    if not report:
        return []
    lines = ["", "**Data:** " + ("all checks passed" if report.get("passed") else "checks failed")]
    for split, stats in (report.get("splits") or {}).items():
        counts = ", ".join(f"{name} {count:,}" for name, count in (stats.get("label_counts") or {}).items())
        lines.append(f"- {split}: {stats.get('rows', 0):,} rows ({counts})")
    lines.append(f"- fingerprint `{report.get('fingerprint')}`")
    return lines


def link_lines(decision: Mapping[str, Any]) -> list[str]:
    lines = []
    if decision.get("run_url"):
        lines.append(f"- [MLflow run]({decision['run_url']})")
    else:
        lines.append(f"- MLflow run `{decision.get('run_id')}`")
    if decision.get("evaluation_uri"):
        lines.append(f"- Per-class metrics and confusion matrices: `{decision['evaluation_uri']}`")
    return ["", "**Look before you decide:**", *lines]


def decision_report(
    decision: Mapping[str, Any],
    *,
    validation_report: Mapping[str, Any] | None = None,
    per_class: Mapping[str, Any] | None = None,
) -> str:
    """Markdown: the comparison, per class, the data, the links."""
    return "\n".join(
        [
            *comparison_lines(decision),
            *per_class_lines(per_class),
            *data_lines(validation_report),
            *link_lines(decision),
        ]
    )


def decision_links(decision: Mapping[str, Any]) -> dict[str, str]:
    """Links for a notification (only those with a URL a mail client can open)."""
    return {"MLflow run": decision["run_url"]} if decision.get("run_url") else {}
