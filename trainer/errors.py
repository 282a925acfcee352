"""The two ways a run ends early on purpose, and the exit code of every way it ends (``trainer.__main__``)."""

from __future__ import annotations

from trainer.spec import (
    ERROR_TAG_CHARS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
)


class TrainerInputError(Exception):
    """The run cannot succeed as specified (bad labels, missing column, missing model): exit code 3.

    Retrying the same spec fails the same way, so the message must say what to fix.
    """


class Terminated(BaseException):
    """SIGTERM arrived: a checkpoint was saved where possible and the process exits with 143.

    A ``BaseException`` so that no ``except Exception`` on the way up swallows it.
    """


def exit_code_for(error: BaseException) -> int:
    """The exit code ``python -m trainer`` ends with after ``error``; also recorded on the MLflow run."""
    if isinstance(error, Terminated):
        return EXIT_TERMINATED
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, TrainerInputError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def describe(error: BaseException, limit: int = ERROR_TAG_CHARS) -> str:
    """``"<Type>: <first lines of the message>"`` cut to ``limit`` characters: fits an MLflow tag and a
    terminal line, and a huge message (a tensor dump, say) cannot bloat the run."""
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
