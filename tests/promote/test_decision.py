"""The promotion rule as a table of numbers: decide() is pure, so no MLflow is needed here."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.paths import ROOT
from trainyard.config.pipeline_schema import Promotion
from trainyard.promote.decision import decide, describe_rule

NAN = float("nan")


@dataclass(frozen=True)
class Row:
    """decide()'s inputs and what it must answer: the verdict, and the reason or words in it."""

    rule: dict[str, Any]
    candidate: float
    champion: float | None
    keywords: dict[str, Any]
    promoted: bool
    exact: str | None
    contains: tuple[str, ...]


def case(
    name: str,
    rule: dict[str, Any],
    candidate: float,
    champion: float | None,
    promoted: bool,
    *,
    exact: str | None = None,
    contains: tuple[str, ...] = (),
    **keywords: Any,
) -> Any:
    return pytest.param(Row(rule, candidate, champion, keywords, promoted, exact, contains), id=name)


LOSS = {"metric": "eval_loss"}

CASES = [
    case("no champion promotes", {}, 0.5, None, True, contains=("no champion", "0.5")),
    case(
        "no champion but below must_reach",
        {"must_reach": 0.7},
        0.69,
        None,
        False,
        contains=("0.69", "0.7", "below"),
    ),
    case("must_reach is inclusive", {"must_reach": 0.7}, 0.7, None, True),
    case("tie keeps champion", {}, 0.85, 0.85, False, contains=("ties champion v3",), champion_version="3"),
    case("tie keeps champion for min direction", LOSS, 0.3, 0.3, False),
    case(
        "better by enough",
        {"min_improvement": 0.002},
        0.861,
        0.850,
        True,
        exact="eval_f1_macro 0.861 beats champion v3 (0.85) by 0.011 >= required 0.002",
        champion_version="3",
    ),
    case(
        "better but not by enough",
        {"min_improvement": 0.01},
        0.855,
        0.850,
        False,
        contains=("by only 0.005 < required 0.01",),
        champion_version="3",
    ),
    # 0.3 - 0.1 is 0.19999999999999998 in floats: without the tolerance this gain misses 0.2.
    case(
        "improvement exactly at margin passes despite float error",
        {"min_improvement": 0.2},
        0.3,
        0.1,
        True,
        exact="eval_f1_macro 0.3 beats champion v1 (0.1) by 0.2 >= required 0.2",
        champion_version="1",
    ),
    case(
        "improvement exactly at margin passes despite float error (min direction)",
        {**LOSS, "min_improvement": 0.2},
        0.1,
        0.3,
        True,
        exact="eval_loss 0.1 improves on champion v1 (0.3) by 0.2 >= required 0.2",
        champion_version="1",
    ),
    # A gain of 0.1999999 misses 0.2 (6 digits shown).
    case(
        "the float tolerance does not forgive a real shortfall",
        {"min_improvement": 0.2},
        0.2999999,
        0.1,
        False,
        contains=("by only 0.2 < required 0.2",),
        champion_version="1",
    ),
    case(
        "the float tolerance does not forgive a real shortfall (min direction)",
        {**LOSS, "min_improvement": 0.2},
        0.1000001,
        0.3,
        False,
    ),
    case("worse rejected", {}, 0.80, 0.85, False, contains=("worse than champion v2",), champion_version="2"),
    case(
        "min direction: lower wins",
        {**LOSS, "min_improvement": 0.01},
        0.30,
        0.35,
        True,
        contains=("improves on champion v1 (0.35) by 0.05",),
        champion_version="1",
    ),
    case("min direction: higher loses", LOSS, 0.36, 0.35, False),
    case(
        "min direction: must_reach is a maximum",
        {**LOSS, "must_reach": 0.5},
        0.6,
        None,
        False,
        contains=("above the allowed maximum 0.5",),
    ),
    case("min direction: under the maximum passes", {**LOSS, "must_reach": 0.5}, 0.4, None, True),
    case("must_reach applies even when better than champion", {"must_reach": 0.9}, 0.85, 0.80, False),
    case(
        "champion without metric: replaced past must_reach",
        {"must_reach": 0.7},
        0.8,
        None,
        True,
        contains=("champion v4 has no eval_f1_macro",),
        champion_version="4",
        champion_has_metric=False,
    ),
    case(
        "champion without metric: kept below must_reach",
        {"must_reach": 0.7},
        0.6,
        None,
        False,
        champion_version="4",
        champion_has_metric=False,
    ),
    case("nan candidate never promoted (no champion)", {}, NAN, None, False),
    case("nan candidate never promoted (champion)", {}, NAN, 0.5, False),
    case(
        "nan champion counts as missing metric",
        {},
        0.5,
        NAN,
        True,
        contains=("has no eval_f1_macro",),
        champion_version="1",
    ),
]


@pytest.mark.parametrize("row", CASES)
def test_decide(row: Row):
    ok, reason = decide(Promotion(**row.rule), row.candidate, row.champion, **row.keywords)

    assert ok is row.promoted, reason
    if row.exact is not None:
        assert reason == row.exact
    for words in row.contains:
        assert words in reason, reason


def test_the_rule_in_one_line():
    assert (
        describe_rule(Promotion(must_reach=0.7, min_improvement=0.002))
        == "eval_f1_macro (higher is better), must_reach=0.7 (at least), min_improvement=0.002"
    )
    assert describe_rule(Promotion(metric="eval_loss", must_reach=0.5)) == (
        "eval_loss (lower is better), must_reach=0.5 (at most), min_improvement=0"
    )


def test_the_decision_module_has_no_mlflow_import_at_all():
    """Not even inside a function: the rule must stay testable, and readable, without MLflow."""
    tree = ast.parse((ROOT / "plugins/trainyard/promote/decision.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert [name for name in imported if name.split(".")[0] == "mlflow"] == []


def test_modules_import_without_mlflow():
    """The operator is imported while Airflow parses DAG files, and it imports the orchestration."""
    modules = [
        "trainyard.promote.decision",
        "trainyard.promote.audit",
        "trainyard.promote.registry",
        "trainyard.promote.promote",
        "trainyard.promote.operator",
        "trainyard.promote.approval_operator",
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'mlflow' not in sys.modules, f'mlflow imported by {name}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
