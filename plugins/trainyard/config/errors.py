"""Readable configuration errors: file, line, field path, what is wrong, and how to fix it."""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]

#: An error report stays readable and cheap whatever the input: long texts are clipped and at most
#: this many problems are listed (the count of the rest is given).
MAX_PROBLEMS = 25
MAX_MESSAGE_CHARS = 400

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 120
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def short_repr(value: object) -> str:
    """repr() whose cost and length are bounded, for quoting what a user wrote."""
    return _repr.repr(value)


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None
    suggestion: str | None = None

    def render(self) -> str:
        where = f"line {self.line}, " if self.line else ""
        field = clip(self.path or "(top level)", 200)
        text = f"{where}{field}: {clip(self.message)}"
        return f"{text}; {clip(self.suggestion)}" if self.suggestion else text


class ConfigError(ValueError):
    """One file's problems, all of them, so a user fixes everything in one go."""

    def __init__(self, file: Path | str, problems: Sequence[Problem]) -> None:
        self.file = Path(file)
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.problems)
        header = f"{self.file}: {count} problem{'s' if count != 1 else ''}"
        lines = [header, *(f"  - {p.render()}" for p in self.problems[:MAX_PROBLEMS])]
        if count > MAX_PROBLEMS:
            lines.append(f"  ... and {count - MAX_PROBLEMS} more")
        return "\n".join(lines)


def dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc``, for listing its valid keys."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return None
        current = _as_model(current.model_fields[part].annotation)
    return current


def _as_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if found := _as_model(arg):
                return found
    return None


def suggest_key(key: str, valid: Iterable[str]) -> str | None:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) if len(key) <= 100 else []
    if close:
        return f"did you mean '{close[0]}'?"
    return f"valid keys here: {', '.join(valid)}" if valid else None


def problems_from_validation(
    exc: ValidationError,
    model: type[BaseModel],
    locate: typing.Callable[[Loc], tuple[Loc, int | None]],
) -> list[Problem]:
    """Turn pydantic errors into problems; ``locate`` maps a field path to (reported path, line)."""
    problems = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        kind = error["type"]
        message = error["msg"].removeprefix("Value error, ")
        suggestion = None
        if kind == "extra_forbidden":
            message = "unknown field"
            owner = _model_at(model, loc[:-1])
            if owner is not None and isinstance(loc[-1], str):
                suggestion = suggest_key(loc[-1], owner.model_fields)
        elif kind == "missing":
            message = "required field is missing"
            owner = _model_at(model, loc[:-1])
            field = owner.model_fields.get(str(loc[-1])) if owner else None
            if field is not None and field.description:
                suggestion = f"add it: {field.description}"
        elif "input" in error and kind not in ("model_type", "dict_type") and not kind.startswith("value_"):
            message = f"{clip(message)} (got {short_repr(error['input'])})"
            if kind == "string_type" and isinstance(error["input"], bool):
                suggestion = "YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value"
        reported, line = locate(loc)
        problems.append(Problem(dotted(reported), message, line, suggestion))
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))
