"""The pod's size and plain env as the YAML gives them: sizes follow ``gpus`` unless written, and an
environment's extra variables are allow-listed knobs (NCCL, CUDA, ...), never the trainer's own."""

from __future__ import annotations

import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity
from pydantic import ValidationError

from tests.config.test_config import DEMO, _edit, _load
from trainyard.config.errors import ConfigError
from trainyard.config.loading import load_environment
from trainyard.config.pipeline_schema import Resources
from trainyard.validate.content_key import key_inputs


@pytest.mark.parametrize(
    ("gpus", "effective"),
    [
        (0, {"cpu": "4", "memory": "16Gi", "shm_size": "2Gi"}),  # a CPU-only pod: what one rank gets
        (1, {"cpu": "4", "memory": "16Gi", "shm_size": "2Gi"}),  # the fixed defaults of before
        (2, {"cpu": "8", "memory": "32Gi", "shm_size": "4Gi"}),
        (8, {"cpu": "32", "memory": "128Gi", "shm_size": "16Gi"}),
    ],
)
def test_cpu_memory_and_shm_follow_gpus_when_not_written(gpus, effective):
    resources = Resources(gpus=gpus)
    assert resources.effective == effective
    assert resources.cpu is resources.memory is resources.shm_size is None, "the YAML's own values stay"


def test_written_values_win_and_a_derived_shm_stays_a_quarter_of_memory():
    written = Resources(gpus=8, cpu=12, memory="64Gi", shm_size="1Gi")  # YAML may give cpu as a number
    assert written.effective == {"cpu": "12", "memory": "64Gi", "shm_size": "1Gi"}
    # /dev/shm is memory-backed and counts against the memory limit: 2Gi x 4 would be all of 8Gi.
    assert Resources(gpus=4, memory="8Gi").effective == {"cpu": "16", "memory": "8Gi", "shm_size": "2Gi"}
    odd = Resources(gpus=4, memory="1000M").resolved("shm_size")
    assert parse_quantity(odd) == parse_quantity("250M"), f"{odd} is a valid quantity of a quarter"


def test_shm_larger_than_memory_is_refused():
    with pytest.raises(ValidationError, match=r"shm_size 32Gi is more than memory 16Gi: /dev/shm is memory"):
        Resources(gpus=1, shm_size="32Gi")


def test_the_content_key_does_not_see_how_resources_were_written(config_dirs):
    """The demo pipeline dropped its explicit 4 / 16Gi / 2Gi for the same derived values: its
    unchanged runs must still be skipped as unchanged (the key covers what training computes)."""
    pipelines, environments = config_dirs
    derived = _load(pipelines, environments)
    _edit(
        pipelines / DEMO,
        "  gpu_type: a100\n",
        '  gpu_type: a100\n  cpu: "4"\n  memory: 16Gi\n  shm_size: 2Gi\n',
    )
    written = _load(pipelines, environments)
    assert derived.config.resources != written.config.resources
    assert derived.config.resources.effective == written.config.resources.effective
    hp = derived.config.training
    assert key_inputs(derived, "sha256:x", hp) == key_inputs(written, "sha256:x", hp)


def _set_kubernetes(environments, **fields) -> None:
    path = environments / "prod.yaml"
    data = yaml.safe_load(path.read_text())
    data["kubernetes"].update(fields)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_environment_env_takes_knobs_with_numbers_as_text_and_defaults_nccl_debug(config_dirs):
    _, environments = config_dirs
    assert load_environment("prod", environments).kubernetes.pod_env == {"NCCL_DEBUG": "WARN"}
    _set_kubernetes(
        environments,
        env={"NCCL_NVLS_ENABLE": 0, "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "OMP_NUM_THREADS": 4},
    )
    assert load_environment("prod", environments).kubernetes.pod_env == {
        "NCCL_DEBUG": "WARN",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "OMP_NUM_THREADS": "4",
    }
    _set_kubernetes(environments, env={"NCCL_DEBUG": "INFO"})
    assert load_environment("prod", environments).kubernetes.pod_env == {"NCCL_DEBUG": "INFO"}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("TRAINYARD_ENV", "training pods take only NCCL_*, TORCH_NCCL_*"),
        ("HF_HOME", "the trainer sets its own variables"),
        ("AWS_SECRET_ACCESS_KEY", "credentials go in kubernetes.secrets"),
        ("MLFLOW_TRACKING_URI", "training pods take only"),
        ("LD_PRELOAD", "training pods take only"),
        ("PYTHONPATH", "training pods take only"),
        ("nccl_debug", "training pods take only"),
        ("CUDA_VISIBLE_DEVICES", "the device plugin gives the pod its GPUs"),
    ],
)
def test_environment_env_refuses_everything_else_naming_the_variable_and_why(config_dirs, name, why):
    _, environments = config_dirs
    _set_kubernetes(environments, env={name: "x"})
    with pytest.raises(ConfigError) as info:
        load_environment("prod", environments)
    (problem,) = info.value.problems
    assert problem.path == "kubernetes.env"
    assert f"'{name}' cannot be set here: " in problem.message and why in problem.message


def test_environment_env_refuses_non_text_values_and_a_name_also_given_as_a_secret(config_dirs):
    _, environments = config_dirs
    _set_kubernetes(environments, env={"NCCL_NVLS_ENABLE": False})
    with pytest.raises(ConfigError, match=r"NCCL_NVLS_ENABLE: False is not a string or number; quote it"):
        load_environment("prod", environments)
    _set_kubernetes(
        environments,
        env={"NCCL_IB_HCA": "mlx5"},
        secrets={"env": {"NCCL_IB_HCA": {"secret": "nccl", "key": "hca"}}},
    )
    with pytest.raises(
        ConfigError, match=r"NCCL_IB_HCA set in both kubernetes.env and kubernetes.secrets.env"
    ):
        load_environment("prod", environments)
