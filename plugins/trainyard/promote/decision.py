"""The promotion rule, as pure functions: whether a candidate replaces the champion, and why.

Nothing here touches MLflow (not even lazily), so the rule is tested as a table of numbers and
the reason a person reads in the registry is exactly the sentence the rule produced.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainyard.config.pipeline_schema import Promotion

#: Absolute slack for threshold comparisons, so 0.862 - 0.860 (= 0.00199999...) meets 0.002.
TOLERANCE = 1e-9


class PromotionRefused(Exception):
    """This run must never be registered or promoted; the task should fail without retrying."""


@dataclass(frozen=True)
class Decision:
    """The outcome of one ``promote``: what was compared, the verdict, and who decided when."""

    promoted: bool
    reason: str
    metric: str
    candidate_value: float
    champion_version: str | None
    champion_value: float | None
    version: str | None
    model_name: str
    alias: str
    run_id: str
    decided_at: str
    decided_by: str
    champion_fingerprint: str | None = None
    #: Where ``champion_value`` comes from: "rescored" (the trainer scored the champion on this
    #: run's validation split), "recorded" (the champion's own run, on its data), None (no champion).
    champion_value_source: str | None = None
    champion_recorded_value: float | None = None
    #: The dataset fingerprint both values were computed on (rescored comparisons only).
    compared_on: str | None = None
    champion_unscorable: str | None = None
    #: Where people look: the candidate run's evaluation artifacts (per-class metrics, confusion
    #: matrices) and its page in the MLflow UI when the tracking server has one.
    evaluation_uri: str | None = None
    run_url: str | None = None
    #: The rule said "better" but promotion.approval requires a person's sign-off first.
    awaiting_approval: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (the ``promote`` task returns it as its XCom)."""
        return asdict(self)


def _fmt(value: float) -> str:
    """A metric value as people read it in reasons: six significant digits."""
    return f"{value:.6g}"


def _better_by(direction: str, candidate: float, champion: float) -> float:
    return candidate - champion if direction == "max" else champion - candidate


def _must_reach_problem(rule: Promotion, value: float) -> str | None:
    """Why ``value`` misses the rule's absolute bar, or None when it passes (or there is none)."""
    if rule.must_reach is None:
        return None
    if rule.direction == "max" and value < rule.must_reach - TOLERANCE:
        return f"{rule.metric} {_fmt(value)} is below the required minimum {_fmt(rule.must_reach)}"
    if rule.direction == "min" and value > rule.must_reach + TOLERANCE:
        return f"{rule.metric} {_fmt(value)} is above the allowed maximum {_fmt(rule.must_reach)}"
    return None


def _bar(rule: Promotion) -> str:
    if rule.must_reach is None:
        return ""
    word = "minimum" if rule.direction == "max" else "maximum"
    return f" and meets the {word} {_fmt(rule.must_reach)}"


def describe_rule(rule: Promotion) -> str:
    """The rule in one line, recorded with every decision so a later change of YAML stays visible."""
    parts = [f"{rule.metric} ({'higher' if rule.direction == 'max' else 'lower'} is better)"]
    if rule.must_reach is not None:
        bound = "at least" if rule.direction == "max" else "at most"
        parts.append(f"must_reach={_fmt(rule.must_reach)} ({bound})")
    parts.append(f"min_improvement={_fmt(rule.min_improvement)}")
    return ", ".join(parts)


def decide(
    rule: Promotion,
    candidate_value: float,
    champion_value: float | None,
    *,
    champion_version: str | None = None,
    champion_has_metric: bool = True,
) -> tuple[bool, str]:
    """Whether the candidate replaces the champion, and why, as a sentence with the numbers.

    ``rule.direction`` says which way is better ("max": accuracy, F1; "min": loss). For "min",
    ``rule.must_reach`` is the largest acceptable value. With a champion, the candidate must be
    strictly better (a tie never replaces the champion) by at least ``rule.min_improvement``.
    ``champion_version`` only names the champion in the reason. ``champion_has_metric=False``
    means an alias holder exists but has no (finite) value of the metric: the candidate then
    replaces it only if it passes ``must_reach``.
    """
    metric = rule.metric
    name = f"champion v{champion_version}" if champion_version else "champion"
    if not math.isfinite(candidate_value):
        return False, f"{metric} of the candidate is {candidate_value}, not a number that can be compared"
    problem = _must_reach_problem(rule, candidate_value)
    if problem:
        return False, problem
    if champion_value is not None and not math.isfinite(champion_value):
        champion_value, champion_has_metric = None, False

    if champion_value is None:
        if not champion_has_metric:
            bar = _bar(rule) or "; no must_reach is set, so nothing else is required"
            return True, (
                f"{name} has no {metric} to compare with; the candidate's {metric} "
                f"{_fmt(candidate_value)} replaces it{' because it' if _bar(rule) else ''}{bar}"
            )
        return True, f"no {name} yet; {metric} {_fmt(candidate_value)} becomes the first{_bar(rule)}"

    gain = _better_by(rule.direction, candidate_value, champion_value)
    verb = "beats" if rule.direction == "max" else "improves on"
    if gain <= 0:
        relation = "ties" if gain == 0 else "is worse than"
        return False, (
            f"{metric} {_fmt(candidate_value)} {relation} {name} ({_fmt(champion_value)}); "
            f"{'higher' if rule.direction == 'max' else 'lower'} is better and a tie keeps the champion"
        )
    if gain < rule.min_improvement - TOLERANCE:
        return False, (
            f"{metric} {_fmt(candidate_value)} {verb} {name} ({_fmt(champion_value)}) by only "
            f"{_fmt(gain)} < required {_fmt(rule.min_improvement)}"
        )
    return True, (
        f"{metric} {_fmt(candidate_value)} {verb} {name} ({_fmt(champion_value)}) by "
        f"{_fmt(gain)} >= required {_fmt(rule.min_improvement)}"
    )


def unscorable_reason(champion_version: str, scored_version: str | None, unscorable: str | None) -> str:
    """Why the trainer's re-score of the champion cannot be used, as a clause."""
    if unscorable:
        return unscorable
    if scored_version and scored_version != champion_version:
        return (
            f"the trainer scored v{scored_version}, but v{champion_version} has held the alias since "
            "the run was launched"
        )
    return f"the trainer did not score champion v{champion_version} on this run's validation data"


def decide_against_champion(
    rule: Promotion,
    candidate_value: float,
    *,
    champion_version: str,
    rescored_value: float | None,
    recorded_value: float | None,
    unscorable: str | None,
) -> tuple[bool, str, str]:
    """(promoted, reason, source of the champion's value): like for like when the champion was
    re-scored on the candidate's data, else as ``rule.if_champion_unscorable`` says."""
    if rescored_value is not None and math.isfinite(rescored_value):
        promoted, reason = decide(rule, candidate_value, rescored_value, champion_version=champion_version)
        return promoted, f"{reason}, both scored on this run's validation data", "rescored"
    why = unscorable or f"the trainer did not score champion v{champion_version}"
    if rule.if_champion_unscorable == "reject":
        return (
            False,
            (
                f"champion v{champion_version} could not be scored on this run's validation data ({why}); "
                "promotion.if_champion_unscorable is 'reject', so the candidate is not promoted"
            ),
            "none",
        )
    promoted, reason = decide(
        rule,
        candidate_value,
        recorded_value,
        champion_version=champion_version,
        champion_has_metric=recorded_value is not None,
    )
    return (
        promoted,
        (
            f"{reason} (compared with the champion's recorded {rule.metric}, measured on its own data: "
            f"{why}; promotion.if_champion_unscorable is 'compare_recorded')"
        ),
        "recorded",
    )
