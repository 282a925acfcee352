"""``trainyard summary``: why a training run failed, and what to do about it, from its MLflow tags."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            {
                "trainyard.error_stage": "training",
                "trainyard.exit_code": "1",
                "trainyard.checkpoint_step": "40",
            },
            "the retry resumes from the checkpoint at step 40",
        ),
        ({"trainyard.error_stage": "training", "trainyard.exit_code": "1"}, "the retry starts afresh"),
        ({"trainyard.error_stage": "setup", "trainyard.exit_code": "1"}, "before training started"),
        (
            {"trainyard.error_stage": "setup", "trainyard.exit_code": "3"},
            "retrying the same run fails the same",
        ),
        (
            {
                "trainyard.error_stage": "training",
                "trainyard.exit_code": "143",
                "trainyard.checkpoint_step": "7",
            },
            "clear the train task; it resumes from the checkpoint at step 7",
        ),
        (
            {
                "trainyard.error_stage": "evaluation",
                "trainyard.exit_code": "1",
                "trainyard.checkpoint_step": "9",
            },
            "repeats only evaluation and what follows",
        ),
    ],
)
def test_summary_says_why_a_run_failed_and_what_to_do(tags, expected):
    from trainyard.cli.summary import failure_lines

    lines = failure_lines("FAILED", {"trainyard.error": "RuntimeError: boom", **tags})
    assert lines[0].startswith(f"Failed in {tags['trainyard.error_stage']} (trainer exit code ")
    assert lines[0].endswith(": RuntimeError: boom")
    assert expected in lines[1], lines
    assert failure_lines("FINISHED", {"trainyard.error": "stale"}) == []


def test_summary_names_a_known_cause_and_a_run_without_an_error_record():
    from trainyard.cli.summary import failure_lines

    oom = failure_lines(
        "FAILED", {"trainyard.error": "OutOfMemoryError: CUDA out of memory. Tried to allocate"}
    )
    assert any("lower training.batch_size" in line for line in oom)
    (line,) = failure_lines("FAILED", {})
    assert "recorded no error" in line and "OOMKilled" in line


def test_summary_shows_the_champion_as_scored_on_this_run_s_data_or_why_not():
    from trainyard.cli.summary import champion_lines

    metrics = {"champion_eval_accuracy": 0.8, "champion_eval_f1_macro": 0.75, "eval_accuracy": 0.9}
    (line,) = champion_lines(metrics, {"trainyard.champion.version": "3"})
    assert line == "Champion v3 on this run's validation data: eval_accuracy=0.8000, eval_f1_macro=0.7500"
    (line,) = champion_lines({}, {"trainyard.champion.unscorable": "champion v3 predicts other labels"})
    assert line == "Champion on this data: not scored (champion v3 predicts other labels)"
    assert champion_lines({"eval_accuracy": 0.9}, {}) == [], "no champion: nothing to say"
