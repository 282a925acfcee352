"""One way of timing training, the same in every process the trainer benchmark compares.

``install(warmup_steps, out)`` hooks every ``transformers.Trainer`` built afterwards in this process:
a callback takes the time at the end of optimizer step ``warmup_steps`` and of the last step (after
``torch.cuda.synchronize()``, so queued GPU work is counted), and ``training_step`` counts, from the
batches it is given, the examples, the real tokens (``attention_mask`` ones; every position of a
padding-free row, which has no mask) and the positions computed. Checkpoint saves inside the window
are timed and subtracted: the compared configurations checkpoint differently, and a save is not a
training step. The counts stay on the batch's device until the window closes, so the hook adds no
synchronisation to the steps it times. At the end of training it writes one JSON document to
``out``: steady-state samples/s and real tokens/s over steps ``warmup_steps+1 .. max_steps``, and the
padding fraction of those batches.

As a launcher it runs a module as ``python -m`` would, hooked:

    python benchmarks/step_timer.py --out timing.json --warmup 5 -m trainer --spec '{...}'
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def batch_counts(inputs: dict[str, Any]) -> tuple[Any, Any, int]:
    """(examples, real tokens, positions) of one batch; the first two may be device tensors.

    A padded batch has one example per row and an ``attention_mask``; a padding-free batch
    (``DataCollatorWithFlattening``) is one row of examples back to back, each starting at
    position id 0, with no mask and no padding.
    """
    input_ids = inputs["input_ids"]
    positions = int(input_ids.numel())
    mask = inputs.get("attention_mask")
    position_ids = inputs.get("position_ids")
    if mask is None and position_ids is not None and input_ids.shape[0] == 1:
        return (position_ids == 0).sum(), positions, positions
    real = mask.sum() if mask is not None else positions
    return int(input_ids.shape[0]), real, positions


class StepTimer(TrainerCallback):
    """Times steps ``warmup_steps+1 .. max_steps`` and counts their batches (see the module doc)."""

    def __init__(self, warmup_steps: int, out: Path) -> None:
        self.warmup_steps = warmup_steps
        self.out = Path(out)
        self.samples: Any = 0
        self.real_tokens: Any = 0
        self.positions = 0
        self.steps = 0
        self.save_s = 0.0
        self._window_start: float | None = None
        self._window_end: float | None = None
        self._last_step_end = 0.0
        self._train_begin = 0.0
        self._max_steps = 0

    def in_window(self, global_step: int) -> bool:
        """Whether the step now being computed (``global_step`` + 1) is one that is timed."""
        return (
            self._window_start is not None and self._window_end is None and global_step >= self.warmup_steps
        )

    def count(self, inputs: dict[str, Any], global_step: int) -> None:
        if not self.in_window(global_step):
            return
        samples, real, positions = batch_counts(inputs)
        self.samples = self.samples + samples
        self.real_tokens = self.real_tokens + real
        self.positions += positions

    def on_train_begin(self, args, state, control, **kwargs):
        self._train_begin = time.perf_counter()
        self._max_steps = state.max_steps
        if self.warmup_steps >= state.max_steps:
            raise ValueError(
                f"step timer: warmup {self.warmup_steps} steps leaves none of the {state.max_steps} to time; "
                "train for more steps or warm up for fewer"
            )
        if state.global_step >= self.warmup_steps:  # resumed past the warmup: time from here
            _sync()
            self._window_start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self.warmup_steps and self._window_start is None:
            _sync()
            self._window_start = time.perf_counter()
        elif self._window_start is not None and self._window_end is None:
            self.steps += 1
            if step >= state.max_steps or control.should_training_stop:
                _sync()
                self._window_end = time.perf_counter()
        self._last_step_end = time.perf_counter()
        return control

    def on_save(self, args, state, control, **kwargs):
        if self._window_start is not None and self._window_end is None:
            self.save_s += time.perf_counter() - self._last_step_end
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.report(), indent=2))
        return control

    def report(self) -> dict[str, Any]:
        if self._window_start is None or self._window_end is None:
            return {"error": "training ended before the timed window closed", "steps": self.steps}
        seconds = self._window_end - self._window_start - self.save_s
        samples, real = float(self.samples), float(self.real_tokens)
        return {
            "timed_steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "max_steps": self._max_steps,
            "seconds": seconds,
            "save_seconds_excluded": self.save_s,
            "warmup_seconds": self._window_start - self._train_begin,
            "samples": samples,
            "real_tokens": real,
            "positions": self.positions,
            "samples_per_s": samples / seconds,
            "tokens_per_s": real / seconds,
            "padding_fraction": 1 - real / self.positions if self.positions else 0.0,
        }


def attach(trainer: Any, warmup_steps: int, out: Path) -> StepTimer:
    """Time and count this ``Trainer``'s training steps (see the module doc)."""
    timer = StepTimer(warmup_steps, out)
    trainer.add_callback(timer)
    training_step = trainer.training_step

    def timed_training_step(model, inputs, *rest, **options):
        timer.count(inputs, trainer.state.global_step)
        return training_step(model, inputs, *rest, **options)

    trainer.training_step = timed_training_step
    return timer


def install(warmup_steps: int, out: Path) -> None:
    """``attach`` to every ``Trainer`` built from now on in this process."""
    from transformers import Trainer

    original_init = Trainer.__init__
    if getattr(original_init, "_step_timer", False):
        return

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        attach(self, warmup_steps, out)

    __init__._step_timer = True
    Trainer.__init__ = __init__


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
        raise SystemExit("usage: step_timer.py --out FILE --warmup N -m MODULE [ARGS...]")
    split = argv.index("-m")
    parser = argparse.ArgumentParser(
        description="Run `python -m MODULE ARGS...` with the step timer installed."
    )
    parser.add_argument("--out", type=Path, required=True, help="where the timing JSON is written")
    parser.add_argument("--warmup", type=int, required=True, help="steps not timed at the start")
    options = parser.parse_args(argv[:split])
    module, args = argv[split + 1], argv[split + 2 :]
    install(options.warmup, options.out)
    sys.argv = [module, *args]
    sys.path[0] = str(Path.cwd())  # as `python -m` would have it
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
