"""``trainer.runtime``: the precision a GPU gets (no GPU here: its capability probes are faked)."""

from __future__ import annotations

import pytest


def test_precision_auto_never_picks_emulated_bf16(monkeypatch):
    """No GPU exists here, so the CUDA capability probes are faked; the branching under test is ours."""
    import torch

    from trainer.errors import TrainerInputError
    from trainer.runtime import resolve_precision

    native = {"value": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or native["value"],
    )
    assert resolve_precision("auto") == "fp16", "a V100 emulates bf16: use fp16"
    with pytest.raises(TrainerInputError, match="does not support bf16"):
        resolve_precision("bf16")
    native["value"] = True
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("bf16") == "fp32", "no GPU: fp32 with a warning"
