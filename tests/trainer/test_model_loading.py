"""How the base model is loaded for training, and what the logged model asks a serving
environment to install."""

from __future__ import annotations

import pytest
import torch

from tests.support.trainer_runs import make_spec
from trainer import tracking
from trainer.spec import RunSpec
from trainer.train import Start, load_model

FINGERPRINT = "sha256:" + "0" * 64  # the data is never read here


@pytest.fixture
def half_precision_base(tmp_path, tiny_model):
    """The tiny BERT stored in float16, as many Hub checkpoints are stored (bf16/fp16)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_model).half()
    model.save_pretrained(tmp_path / "fp16-base")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "fp16-base")
    assert AutoModel.from_pretrained(tmp_path / "fp16-base").dtype == torch.float16, "stored dtype is kept"
    return tmp_path / "fp16-base"


def test_a_half_precision_base_loads_in_float32_with_sdpa_attention(tmp_path, half_precision_base):
    spec = RunSpec.model_validate(
        make_spec(tmp_path, str(half_precision_base), "t.csv", "v.csv", FINGERPRINT)
    )
    model, _ = load_model(spec, Start(str(half_precision_base)))
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "autocast needs float32 master weights"
    assert model.config._attn_implementation == "sdpa"


def test_the_attention_kernel_follows_the_training_section(tmp_path, tiny_model):
    spec = RunSpec.model_validate(
        make_spec(tmp_path, str(tiny_model), "t.csv", "v.csv", FINGERPRINT, attention="eager")
    )
    model, _ = load_model(spec, Start(str(tiny_model)))
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    ("installed", "required"),
    [
        ("2.13.0+cpu", "2.13.0"),
        ("2.13.0+cu128", "2.13.0"),
        ("2.7.0a0+79aa17489c.nv25.04", "2.7.0"),  # NVIDIA's build: no index has the pre-release
        ("5.24.0", "5.24.0"),
    ],
)
def test_the_logged_model_requires_versions_a_serving_environment_can_install(
    monkeypatch, installed, required
):
    monkeypatch.setattr(tracking, "version", lambda name: installed)
    assert set(tracking.pip_requirements()) == {f"{name}=={required}" for name in tracking.MODEL_REQUIREMENTS}
