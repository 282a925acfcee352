"""Label and field selectors, parsed like the API server: a malformed one is a 400, not ignored.

The pod operator finds its pods by label (``dag_id=...,task_id=...,already_checked!=True``) and a
pod's events by field (``involvedObject.name=...``); a selector the server would refuse must fail
here too, or a test could pass on a query that breaks on a real cluster.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .status import ApiError

_LABEL_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<val>[-A-Za-z0-9_.]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<vals>[^)]*)\)"
    r")?\s*$"
)
_FIELD_TERM = re.compile(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$")

# The fields each resource can be selected by (the real server's lists); others are a 400.
FIELD_SELECTABLE = {
    "pods": {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
    },
    "events": {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "type",
    },
}


def _terms(selector: str) -> list[str]:
    """Split on the commas that are not inside ``in (...)``."""
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term for term in terms if term.strip()]


def label_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """``=``, ``==``, ``!=``, ``key``, ``!key``, ``in``, ``notin``, comma-joined (all must hold)."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _terms(selector or ""):
        match = _LABEL_TERM.match(term)
        if not match or (match.group("neg") and (match.group("op") or match.group("setop"))):
            raise ApiError(400, f"unable to parse requirement: found '{term.strip()}', invalid selector")
        key, op, val = match.group("key"), match.group("op"), match.group("val")
        if match.group("neg"):
            checks.append(lambda labels, k=key: k not in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=val: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=val: labels.get(k) != v)
        elif match.group("setop"):
            values = {item.strip() for item in match.group("vals").split(",") if item.strip()}
            wanted = match.group("setop") == "in"
            checks.append(lambda labels, k=key, vs=values, w=wanted: (labels.get(k) in vs) == w)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels or {}) for check in checks)


def field_selector(selector: str, resource: str) -> Callable[[dict], bool]:
    """``field=value``, ``field==value``, ``field!=value`` over the resource's selectable fields."""
    checks: list[Callable[[dict], bool]] = []
    for term in _terms(selector or ""):
        match = _FIELD_TERM.match(term)
        if not match:
            raise ApiError(400, f"invalid selector: '{selector}'; can't understand '{term}'")
        field, op, value = match.groups()
        if field not in FIELD_SELECTABLE.get(resource, set()):
            raise ApiError(400, f"field label not supported: {field}")
        equal = op != "!="
        checks.append(lambda obj, f=field, v=value, e=equal: (_field(obj, f) == v) == e)
    return lambda obj: all(check(obj) for check in checks)


def _field(obj: dict, path: str) -> str:
    current: Any = obj
    for part in path.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    return "" if current is None else str(current)
