"""``python -m trainer`` refuses an invalid run spec with exit code 2 and the validation message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.trainer_runs import child_env, make_spec


@pytest.mark.parametrize(
    ("spec_text", "expected"),
    [
        ('{"identity": {}}', "identity.pipeline"),
        ("{not json", "Invalid JSON"),
    ],
)
def test_invalid_spec_exits_2_with_the_validation_message(tmp_path, spec_text, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--spec", spec_text],
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid run spec" in proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_invalid_spec_file_field_is_named(tmp_path, tiny_model, splits):
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    spec["hyperparameters"]["learning_rte"] = 0.1
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--spec-file", str(path)],
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "hyperparameters.learning_rte" in proc.stderr
    assert "Traceback" not in proc.stderr
