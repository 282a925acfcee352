"""The content key: equal exactly when training again would change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainyard.config.loading import available_environments, load_environment, load_pipeline
from trainyard.validate.content_key import base_model_identity, content_key, key_inputs, trainer_identity

FP = "sha256:" + "a" * 64


def _pipeline(config_dirs, environment: str, model_dir: Path | None = None, **training):
    pipelines, environments = config_dirs
    path = pipelines / "tweet-sentiment.yaml"
    if model_dir is not None or training:
        import yaml

        document = yaml.safe_load(path.read_text())
        if model_dir is not None:
            document["model"]["base"] = str(model_dir)
        document["training"].update(training)
        path.write_text(yaml.safe_dump(document))
    return load_pipeline(
        path, load_environment(environment, environments), available_environments(environments)
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models" / "bert"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"hidden_size": 64}))
    return directory


def _key(pipeline, fingerprint: str = FP) -> str:
    return content_key(key_inputs(pipeline, fingerprint, pipeline.config.training))


def test_the_same_inputs_give_the_same_key_and_each_input_changes_it(config_dirs, model_dir):
    pipeline = _pipeline(config_dirs, "local", model_dir)
    key = _key(pipeline)
    assert key.startswith("sha256:") and key == _key(_pipeline(config_dirs, "local", model_dir))

    assert _key(pipeline, "sha256:" + "b" * 64) != key, "other data bytes"
    assert _key(_pipeline(config_dirs, "local", model_dir, learning_rate=1e-4)) != key, (
        "another training section"
    )
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 128}))
    assert _key(pipeline) != key, "another base model at the same path"


def test_the_trainer_build_is_part_of_the_key(config_dirs):
    assert trainer_identity(_pipeline(config_dirs, "prod")) == "image ghcr.io/trainyard/trainer:0.2.0"
    local = trainer_identity(_pipeline(config_dirs, "local"))
    assert local.startswith("trainer ") and " source:" in local


def test_a_base_model_is_named_by_location_and_config_hash(model_dir, tmp_path):
    identity = base_model_identity(str(model_dir), None)
    assert identity.startswith(f"{model_dir} config:") and len(identity.rsplit(":", 1)[1]) == 64
    assert base_model_identity(str(tmp_path / "missing"), None).endswith("config:missing")
    assert base_model_identity("hf://org/name", None) == "hf://org/name"
