"""The run spec a ``train`` task hands the trainer: keyed checkpoints, and an argv-sized JSON."""

from __future__ import annotations

from trainyard.config.loading import available_environments, load_environment, load_pipeline
from trainyard.handoff import Approval
from trainyard.train.run_spec import MAX_SPEC_BYTES, run_spec

FINGERPRINT_A, FINGERPRINT_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def _pipeline(config_dirs, env: str):
    pipelines, environments = config_dirs
    return load_pipeline(
        pipelines / "tweet-sentiment.yaml",
        load_environment(env, environments),
        available_environments(environments),
    )


def test_the_spec_carries_the_approval_and_the_run(config_dirs):
    pipeline = _pipeline(config_dirs, "prod")
    hp = pipeline.config.training
    approval = Approval(fingerprint=FINGERPRINT_A, hyperparameters=hp, report={"rows": 10})
    spec = run_spec(pipeline, approval, run_id="manual__1", try_number=2)
    identity = spec.identity
    assert (identity.run_id, identity.try_number, identity.environment) == ("manual__1", 2, "prod")
    assert spec.dataset_fingerprint == FINGERPRINT_A and spec.hyperparameters == hp
    assert spec.validation_report == {"rows": 10}, "a report that fits travels to MLflow"
    assert spec.checkpoint_dir.startswith("s3://trainyard-prod-checkpoints/tweet-sentiment/manual__1-")


def test_checkpoints_are_keyed_by_run_and_inputs(config_dirs):
    pipeline = _pipeline(config_dirs, "prod")
    hp = pipeline.config.training

    def checkpoint_dir(run_id, fingerprint=FINGERPRINT_A, **changes):
        approval = Approval(fingerprint=fingerprint, hyperparameters=hp.model_copy(update=changes))
        return run_spec(pipeline, approval, run_id=run_id, try_number=1).checkpoint_dir

    same = checkpoint_dir("manual__1")
    assert checkpoint_dir("manual__1") == same, "a relaunch finds its checkpoints"
    assert checkpoint_dir("manual__1", FINGERPRINT_B) != same, "changed data never resumes old weights"
    assert checkpoint_dir("manual__1", learning_rate=1e-3) != same
    assert checkpoint_dir("exp:1") != checkpoint_dir("exp/1"), "odd characters do not collide"


def test_an_oversized_validation_report_stays_out_of_the_argv(config_dirs):
    pipeline = _pipeline(config_dirs, "prod")
    report = {"labels": {f"label-{i}": i for i in range(20_000)}}
    approval = Approval(fingerprint=FINGERPRINT_A, hyperparameters=pipeline.config.training, report=report)
    spec = run_spec(pipeline, approval, run_id="r", try_number=1)
    assert spec.validation_report is None
    assert len(spec.model_dump_json()) < MAX_SPEC_BYTES == 64 * 1024
