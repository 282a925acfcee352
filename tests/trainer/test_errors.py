"""``trainer.errors``: the one-line error description and the exit code of every way a run ends."""

from __future__ import annotations


def test_error_description_is_one_bounded_line():
    from trainer.errors import Terminated, TrainerInputError, describe, exit_code_for

    text = describe(RuntimeError("The size of tensor a (587)\n must match " + "x" * 5000), limit=80)
    assert (
        len(text) == 80
        and "\n" not in text
        and text.startswith("RuntimeError: The size of tensor a (587) must")
    )
    assert describe(Terminated()) == "Terminated"
    assert [
        exit_code_for(e) for e in (RuntimeError(), TrainerInputError(), Terminated(), KeyboardInterrupt())
    ] == [
        1,
        3,
        143,
        130,
    ]
