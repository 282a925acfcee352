"""``trainer.preemption``: SIGTERM stops a run at once outside training, and cannot undo a complete one."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.support.trainer_runs import child_env, make_spec, trainer_command


def test_sigterm_before_training_exits_promptly(tmp_path, tiny_model, splits):
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    with subprocess.Popen(
        trainer_command(spec),
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        seen = []
        for line in proc.stderr:  # wait for the data to load: the model and training are still ahead
            seen.append(line)
            if "Data: " in line:
                break
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)
        stderr = "".join(seen) + stderr
    assert "Data: " in stderr, stderr[-4000:]
    assert "step " not in stderr, "interrupted before training started"
    assert proc.returncode == 143, stderr[-4000:]
    assert time.monotonic() - started < 10
    assert stdout == ""
    assert not any((tmp_path / "checkpoints").glob("checkpoint-*"))


def test_sigterm_after_the_run_is_complete_does_not_undo_it():
    """Recording FINISHED and removing checkpoints run shielded: SIGTERM is remembered, not raised."""
    from trainer.errors import Terminated
    from trainer.preemption import Preemption

    previous = signal.getsignal(signal.SIGTERM)
    preemption = Preemption()
    preemption.install()
    try:
        with preemption.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert preemption.requested
        with pytest.raises(Terminated):  # outside any shield, SIGTERM stops the process at once
            preemption.check()
    finally:
        signal.signal(signal.SIGTERM, previous)
