"""Where and how this process runs: its place among the ranks (``trainer.launcher``, or a single
process), its GPU, the libraries' logging, and the precision its GPU supports. Read once, at the
start of ``trainer.train.run``.

Precision: ``auto`` is bf16 on CUDA GPUs that support it, fp16 on other CUDA GPUs, fp32 on CPU.
An explicit ``bf16``/``fp16`` without a CUDA GPU falls back to fp32 with a warning (the same pipeline
then runs on a laptop and on a GPU node); ``bf16`` on a GPU without bf16 is an input error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from trainer.errors import TrainerInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processes:
    """Where this process sits among the ranks of ``trainer.launcher`` (a single process otherwise)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Processes:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def use_local_gpu(processes: Processes) -> None:
    """Make this rank's GPU (``LOCAL_RANK``) the current CUDA device, before anything asks CUDA about
    "the" device: otherwise every rank's first queries (``resolve_precision``) go to GPU 0. Nothing
    to do without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if processes.local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK {processes.local_rank} has no GPU: {count} visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); the pod must get one GPU per rank"
        )
    torch.cuda.set_device(processes.local_rank)


def configure_libraries(progress_bars: bool) -> None:
    """HF libraries log through our handler (stderr); progress bars only on a terminal."""
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()
    for library in (transformers.utils.logging, datasets.utils.logging):
        library.set_verbosity_warning()
        library.enable_propagation()
    if not progress_bars:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _native_bf16(torch: Any) -> bool:
    """bf16 in hardware (Ampere and newer); torch's default also counts slow emulation (V100, T4)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str) -> str:
    import torch

    if not torch.cuda.is_available():
        if requested in ("bf16", "fp16"):
            logger.warning("precision %s requested but there is no CUDA GPU: training in fp32", requested)
        return "fp32"
    if requested == "auto":
        return "bf16" if _native_bf16(torch) else "fp16"
    if requested == "bf16" and not _native_bf16(torch):
        raise TrainerInputError(
            f"precision bf16 requested but {torch.cuda.get_device_name()} does not support bf16; "
            "use fp16 or auto"
        )
    return requested
