"""The trainer's speed settings: what the training section asks for, made concrete for this device.

Every pipeline gets the fast path without its owner knowing any of it: length-grouped batches with
dynamic padding (short texts are not padded to ``max_length``), bf16 autocast on GPUs that have it
plus TF32 matmuls, the fused AdamW, PyTorch's SDPA attention, data-loader workers with pinned memory
on GPU, and a larger evaluation batch (no gradients, so it fits). ``torch.compile`` is opt-in: it
costs minutes of compilation per process and recompiles for every new padded length.

The choices are made once, by pure functions of the training section and the device, and logged
as MLflow params (``speed.*``) so that two runs' speed can be compared knowing how each ran.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from trainer.spec import Hyperparameters

logger = logging.getLogger(__name__)

#: Padding multiple on GPU: tensor cores work on tiles of 8 (fp16/bf16); on CPU it only adds work.
GPU_PAD_MULTIPLE = 8
#: Data-loader workers per rank on GPU when the training section does not say: collation of
#: pre-tokenized rows is light, two workers keep a GPU fed at the batch sizes used here.
GPU_DEFAULT_WORKERS = 2


@dataclass(frozen=True)
class SpeedPlan:
    """How this run trains, concretely; ``reasons`` says why where the request was not followed."""

    group_by_length: bool
    padding: str  # "dynamic": each batch padded to its longest example (see ``why_not_packed``)
    pad_to_multiple_of: int | None
    attention: str
    tf32: bool
    optimizer: str  # the TrainingArguments ``optim`` name
    compile: bool
    dataloader_workers: int
    pin_memory: bool
    eval_batch_size: int
    reasons: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        """The effective settings as MLflow params (the requested ones are logged unprefixed)."""
        values = asdict(self)
        values.pop("reasons")
        return {f"speed.{k}": v for k, v in values.items()}

    def training_arguments(self) -> dict[str, Any]:
        """The ``TrainingArguments`` keywords this plan sets."""
        return {
            "train_sampling_strategy": "group_by_length" if self.group_by_length else "random",
            "length_column_name": LENGTH_COLUMN,
            "tf32": self.tf32 or None,  # None leaves the library default; False would force IEEE fp32
            "optim": self.optimizer,
            "torch_compile": self.compile,
            "dataloader_num_workers": self.dataloader_workers,
            "dataloader_pin_memory": self.pin_memory,
            "dataloader_persistent_workers": self.dataloader_workers > 0,
            "per_device_eval_batch_size": self.eval_batch_size,
            # real (non-padding) tokens, summed over ranks: tokens/s and MFU are computed from it
            "include_num_input_tokens_seen": "non_padding",
        }


#: The column ``trainer.data.tokenize`` adds: each example's token count, which the length-grouped
#: sampler reads instead of measuring every row itself before the first step.
LENGTH_COLUMN = "length"


def plan_speed(hp: Hyperparameters, *, cuda: bool, tf32_available: bool, not_packed: str) -> SpeedPlan:
    """The concrete settings for this device; ``not_packed`` is why batches are not padding-free
    (``why_not_packed``), logged with the plan."""
    reasons = [f"dynamic padding rather than padding-free rows: {not_packed}"]
    tf32 = hp.tf32 and cuda and tf32_available
    if hp.tf32 and cuda and not tf32_available:
        reasons.append("tf32 off: this GPU has no TF32 (before Ampere)")
    workers = (
        hp.dataloader_workers if hp.dataloader_workers is not None else (GPU_DEFAULT_WORKERS if cuda else 0)
    )
    return SpeedPlan(
        group_by_length=hp.group_by_length,
        padding="dynamic",
        pad_to_multiple_of=GPU_PAD_MULTIPLE if cuda else None,
        attention=hp.attention,
        tf32=tf32,
        optimizer="adamw_torch_fused" if hp.optimizer == "adamw_fused" else "adamw_torch",
        compile=hp.compile,
        dataloader_workers=workers,
        pin_memory=cuda,
        eval_batch_size=hp.eval_batch_size or 2 * hp.batch_size,
        reasons=tuple(reasons),
    )


def why_not_packed(attention: str, *, cuda: bool, flash_attn_installed: bool) -> str:
    """Why batches are padded per batch rather than packed padding-free, in this environment.

    A packed row holds several examples back to back. For sequence classification that needs two
    things the stack does not give: attention that stays within each example (a varlen kernel fed
    the sequence boundaries, FlashAttention on CUDA; SDPA and eager see one sequence per row, and a
    block-diagonal mask would cost more attention work than the padding it saves) and a head that
    pools each example's first token, where the HF classification heads pool position 0 of the row.
    Length-grouped batches take most of the padding away instead (``padding_fraction`` measures
    what is left).
    """
    if not cuda:
        kernel = "there is no varlen attention kernel on CPU"
    elif not flash_attn_installed:
        kernel = "flash-attn (a varlen attention kernel) is not installed"
    else:
        kernel = f"attention {attention!r} attends across the examples of a packed row"
    return f"{kernel}, and HF classification heads pool one position per row"


def log_plan(plan: SpeedPlan) -> None:
    logger.info(
        "Speed: %s batches, %s, attention %s, optimizer %s, tf32 %s, compile %s, %d data-loader "
        "workers%s, eval batch %d",
        "length-grouped" if plan.group_by_length else "shuffled",
        f"{plan.padding} padding",
        plan.attention,
        plan.optimizer,
        "on" if plan.tf32 else "off",
        "on" if plan.compile else "off",
        plan.dataloader_workers,
        " (pinned memory)" if plan.pin_memory else "",
        plan.eval_batch_size,
    )
    for reason in plan.reasons:
        logger.info("Speed: %s", reason)
