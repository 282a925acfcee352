"""Safe, bounded YAML loading that can say on which line a field was written.

Anyone who can commit a pipeline file can make the DAG processor parse it, so what one file may
cost is bounded before it is parsed (its size) and before it is turned into Python objects (the
node count after expanding aliases, and the nesting depth). A nine-line "billion laughs" file of
nested aliases expands to tens of millions of nodes: it is refused in microseconds instead of
taking minutes and gigabytes in validation, and past the import timeout every other DAG.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from trainer.spec import StrictModel
from trainyard.config.errors import ConfigError, Loc, Problem, clip
from trainyard.config.parse_cache import ParseCache

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MiB = 1024 * 1024


class YamlLimits(StrictModel):
    """What one YAML file may cost; an environment sets them for its pipeline files."""

    max_bytes: int = Field(
        1 * MiB, ge=1024, le=64 * MiB, description="Largest file size in bytes (default 1 MiB)."
    )
    max_nodes: int = Field(
        20_000,
        ge=100,
        le=2_000_000,
        description="Most YAML nodes after expanding aliases (each use of an alias counts in full).",
    )
    max_depth: int = Field(32, ge=3, le=200, description="Deepest nesting of mappings and lists.")


DEFAULT_LIMITS = YamlLimits()


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
                    f"duplicate key '{clip(str(key), 80)}' (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / MiB:.1f} MiB" if n_bytes >= MiB // 10 else f"{n_bytes:,} bytes"


class _LimitBroken(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


def measure(root: yaml.Node, limits: YamlLimits) -> Problem | None:
    """The first limit the composed document breaks, or None.

    Counts what the document expands to (an alias counts its anchor's whole subtree, every time it
    is used) while visiting each distinct node once, so a bomb is measured in time linear in the
    file. The recursion is bounded by ``max_depth``; a recursive alias is refused.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    budget = [limits.max_nodes]

    def spend(node: yaml.Node, count: int) -> None:
        budget[0] -= count
        if budget[0] < 0:
            raise _LimitBroken(
                _problem(
                    node,
                    f"the document expands to more than {limits.max_nodes:,} YAML nodes (each use of "
                    "an alias (*name) counts its anchor's whole content)",
                    "write the values out instead of nesting aliases, or ask the platform team to "
                    "raise pipeline_files.max_nodes in the environment file",
                )
            )

    def size_of(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:  # an alias: its whole subtree is expanded again
            spend(node, sizes[key])
            return sizes[key]
        spend(node, 1)
        if isinstance(node, yaml.ScalarNode):
            return 1
        if key in active:
            raise _LimitBroken(_problem(node, "an alias refers to the structure it is part of", "remove it"))
        if depth >= limits.max_depth:
            raise _LimitBroken(
                _problem(node, f"nested more than {limits.max_depth} levels deep", "flatten the structure")
            )
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(size_of(k, depth + 1) + size_of(v, depth + 1) for k, v in node.value)
        else:
            size = 1 + sum(size_of(item, depth + 1) for item in node.value)
        active.discard(key)
        sizes[key] = size
        return size

    try:
        size_of(root, 0)
    except _LimitBroken as broken:
        return broken.problem
    return None


def _problem(node: yaml.Node, message: str, fix: str) -> Problem:
    return Problem("", message, node.start_mark.line + 1, fix)


def read_text(path: Path, limits: YamlLimits = DEFAULT_LIMITS) -> str:
    """The file's text, refused before reading when it is not a regular file or is too large."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(path, [Problem("", "not a regular file (a device, pipe or directory?)")])
        if info.st_size > limits.max_bytes:
            raise ConfigError(path, [_too_large(info.st_size, limits)])
        # Read at most one byte past the limit: the file may grow between stat and read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise ConfigError(path, [Problem("", "file not found")]) from None
    except OSError as exc:
        raise ConfigError(path, [Problem("", f"cannot read file: {exc}")]) from None
    if len(data) > limits.max_bytes:
        raise ConfigError(path, [_too_large(len(data), limits)])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [Problem("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None


def _too_large(n_bytes: int, limits: YamlLimits) -> Problem:
    return Problem(
        "",
        f"file is {_size(n_bytes)}, over the limit of {_size(limits.max_bytes)} for one YAML file",
        None,
        "a pipeline file holds settings, not data: move data to the dataset files, or ask the "
        "platform team to raise pipeline_files.max_bytes in the environment file",
    )


def parse(text: str, path: Path, limits: YamlLimits = DEFAULT_LIMITS) -> Any:
    """Parse YAML text within ``limits``; every failure is a ConfigError naming ``path``."""
    loader = SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = measure(node, limits)
        if problem is not None:
            raise ConfigError(path, [problem])
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            path,
            [Problem("", f"invalid YAML: {clip(reason, 300)}", line, "check indentation and quoting")],
        ) from None
    except RecursionError:
        raise ConfigError(
            path, [Problem("", "nested too deeply to parse", None, "flatten the structure")]
        ) from None
    finally:
        loader.dispose()


def as_mapping(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(path, [Problem("", f"expected a mapping of fields, the file is {kind}")])
    return data


def read_mapping(
    path: Path, limits: YamlLimits = DEFAULT_LIMITS, cache: ParseCache | None = None
) -> tuple[dict[str, Any], str]:
    """Parse a YAML file that must hold a mapping; returns (data, text).

    With a ``cache``, a file whose exact text was parsed before is not parsed again.
    """
    text = read_text(path, limits)
    if cache is None:
        return as_mapping(parse(text, path, limits), path), text
    key = cache.key(f"{limits.model_dump_json()}\n{text}")
    found, data = cache.get(key)
    if not found:
        data = parse(text, path, limits)
        cache.put(key, data)
    return as_mapping(data, path), text


def line_index(text: str) -> dict[Loc, int]:
    """1-based line of every mapping key and sequence item; computed only when reporting errors.

    Only called on text that passed ``parse``'s limits; an aliased subtree is indexed where its
    anchor is written, once.
    """
    index: dict[Loc, int] = {}
    root = yaml.compose(text, Loader=SafeLoader)
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())] if root is not None else []
    while stack:
        node, loc = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*loc, str(key_node.value))
                index.setdefault(child, key_node.start_mark.line + 1)
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index.setdefault((*loc, i), item.start_mark.line + 1)
                stack.append((item, (*loc, i)))
    return index


def nearest_line(index: dict[Loc, int], loc: Loc) -> int | None:
    """The line of ``loc`` or of its closest written ancestor (a missing field has none itself)."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in index:
            return index[loc[:end]]
    return None
