"""The speed settings (``trainer.speed``) and the efficiency figures (``trainer.efficiency``):
pure functions of the training section, the device and the batches."""

from __future__ import annotations

import pytest

from trainer.efficiency import chunks, mfu, padding_fraction, peak_flops
from trainer.spec import Hyperparameters
from trainer.speed import plan_speed, why_not_packed


def plan(cuda: bool, tf32: bool = True, **training):
    hp = Hyperparameters(**training)
    return plan_speed(
        hp,
        cuda=cuda,
        tf32_available=tf32,
        not_packed=why_not_packed("sdpa", cuda=cuda, flash_attn_installed=False),
    )


def test_on_a_gpu_every_fast_default_is_on():
    speed = plan(cuda=True, batch_size=64)
    args = speed.training_arguments()
    assert args["train_sampling_strategy"] == "group_by_length"
    assert args["optim"] == "adamw_torch_fused"
    assert args["tf32"] is True
    assert args["dataloader_num_workers"] == 2 and args["dataloader_pin_memory"] is True
    assert args["dataloader_persistent_workers"] is True
    assert args["per_device_eval_batch_size"] == 128
    assert args["torch_compile"] is False, "compile is opt-in"
    assert args["include_num_input_tokens_seen"] == "non_padding"
    assert speed.pad_to_multiple_of == 8 and speed.attention == "sdpa"


def test_on_cpu_there_are_no_workers_pinned_memory_tf32_or_padding_multiple():
    speed = plan(cuda=False)
    args = speed.training_arguments()
    assert args["dataloader_num_workers"] == 0 and args["dataloader_pin_memory"] is False
    assert args["dataloader_persistent_workers"] is False
    assert args["tf32"] is None, "None leaves torch's default; False would force IEEE fp32 on a GPU"
    assert speed.pad_to_multiple_of is None
    assert any("no varlen attention kernel on CPU" in r for r in speed.reasons)


def test_a_gpu_without_tf32_says_why_it_is_off():
    speed = plan(cuda=True, tf32=False)
    assert speed.tf32 is False
    assert any("before Ampere" in r for r in speed.reasons)


def test_every_setting_can_be_overridden_and_is_recorded_as_a_param():
    speed = plan(
        cuda=True,
        group_by_length=False,
        optimizer="adamw",
        tf32=False,
        compile=True,
        dataloader_workers=6,
        eval_batch_size=7,
        attention="eager",
    )
    args = speed.training_arguments()
    assert args["train_sampling_strategy"] == "random" and args["optim"] == "adamw_torch"
    assert args["tf32"] is None and args["torch_compile"] is True
    assert args["dataloader_num_workers"] == 6 and args["per_device_eval_batch_size"] == 7
    params = speed.params()
    assert params["speed.attention"] == "eager" and params["speed.dataloader_workers"] == 6
    assert params["speed.padding"] == "dynamic"
    assert "speed.reasons" not in params


def test_padding_fraction_counts_the_padded_tokens_of_each_batch():
    lengths = [10, 10, 2, 6]
    # batch [0, 1]: no padding; batch [2, 3]: padded to 6 -> 4 of 12 tokens are padding
    assert padding_fraction(lengths, [[0, 1], [2, 3]], None) == pytest.approx(4 / 32)
    # to a multiple of 8: [0, 1] -> 16 each, [2, 3] -> 8 each: 48 tokens, 28 real
    assert padding_fraction(lengths, [[0, 1], [2, 3]], 8) == pytest.approx(1 - 28 / 48)
    assert padding_fraction(lengths, [], None) == 0.0


def test_length_grouping_leaves_less_padding_than_shuffling():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(2048)]
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    grouped = sorted(shuffled, key=lambda i: lengths[i])
    assert (
        padding_fraction(lengths, chunks(grouped, 32), 8)
        < 0.1
        < padding_fraction(lengths, chunks(shuffled, 32), 8)
    )


def test_chunks_keeps_the_last_partial_batch():
    assert list(chunks(range(5), 2)) == [[0, 1], [2, 3], [4]]


def test_peak_flops_prefers_the_longest_matching_name_and_knows_when_it_does_not_know():
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some Future GPU") is None


def test_mfu_is_six_flops_per_parameter_per_token_over_the_peak():
    # 85M parameters (BERT-base without embeddings), 400k tokens/s on one H100: 20.6% of 989 TFLOP/s
    assert mfu(400_000, 85_000_000, 989e12, 1) == pytest.approx(6 * 85e6 * 4e5 / 989e12)
    assert mfu(800_000, 85_000_000, 989e12, 2) == pytest.approx(mfu(400_000, 85_000_000, 989e12, 1))
