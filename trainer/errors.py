"""The two ways a run ends early on purpose, each with its own exit code (see ``trainer.__main__``)."""

from __future__ import annotations


class TrainerInputError(Exception):
    """The run cannot succeed as specified (bad labels, missing column, missing model): exit code 3.

    Retrying the same spec fails the same way, so the message must say what to fix.
    """


class Terminated(BaseException):
    """SIGTERM arrived: a checkpoint was saved where possible and the process exits with 143.

    A ``BaseException`` so that no ``except Exception`` on the way up swallows it.
    """
