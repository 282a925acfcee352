"""Safe YAML loading that can say on which line a field was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trainyard.config_errors import ConfigError, Loc, Problem

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SafeLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """yaml.safe_load semantics, but a key written twice is an error instead of a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = key_node.value
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_mapping(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a YAML file that must hold a mapping; returns (data, text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, [Problem("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [Problem("", f"cannot read file: {exc}")]) from None
    try:
        data = yaml.load(text, Loader=SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            path, [Problem("", f"invalid YAML: {reason}", line, "check indentation and quoting")]
        ) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(path, [Problem("", f"expected a mapping of fields, the file is {kind}")])
    return data, text


def line_index(text: str) -> dict[Loc, int]:
    """1-based line of every mapping key and sequence item; computed only when reporting errors."""
    index: dict[Loc, int] = {}

    def walk(node: yaml.Node, loc: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*loc, str(key_node.value))
                index[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[(*loc, i)] = item.start_mark.line + 1
                walk(item, (*loc, i))

    root = yaml.compose(text, Loader=SafeLoader)
    if root is not None:
        walk(root, ())
    return index


def nearest_line(index: dict[Loc, int], loc: Loc) -> int | None:
    """The line of ``loc`` or of its closest written ancestor (a missing field has none itself)."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in index:
            return index[loc[:end]]
    return None
