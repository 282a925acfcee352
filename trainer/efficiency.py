"""How well a run uses its hardware, measured while it trains: samples/s, tokens/s counting only
real tokens, the share of padding in the batches, and on GPU the model FLOPs utilisation (MFU).

The figures go into the progress lines and onto the MLflow run (``train_tokens_per_second``,
``padding_fraction``, ``mfu``...), so a slow pipeline shows why: too much padding, a small batch,
or a GPU waiting for data. GPU utilisation itself comes from MLflow's system metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

#: Dense bf16/fp16 tensor-core peak per GPU in FLOP/s (vendor data sheets, without sparsity), by a
#: substring of ``torch.cuda.get_device_name()``: the denominator of the MFU estimate. Longest match
#: wins ("H100 PCIe" before "H100").
GPU_PEAK_FLOPS: dict[str, float] = {
    "B200": 2.25e15,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]], multiple: int | None) -> float:
    """The share of the tokens the model processes that are padding, for these batches of example
    indices under dynamic padding (each batch padded to its longest example, rounded up)."""
    real = padded = 0
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        if not sizes:
            continue
        longest = max(sizes)
        if multiple:
            longest = math.ceil(longest / multiple) * multiple
        real += sum(sizes)
        padded += longest * len(sizes)
    return 1.0 - real / padded if padded else 0.0


def chunks(indices: Iterable[int], size: int) -> Iterable[list[int]]:
    batch: list[int] = []
    for index in indices:
        batch.append(index)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def peak_flops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak, or None for a GPU not in the table (no MFU then)."""
    matches = [key for key in GPU_PEAK_FLOPS if key in device_name]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(tokens_per_second: float, trainable_parameters: int, peak: float, devices: int) -> float:
    """Model FLOPs utilisation: 6 FLOPs per parameter per token (forward 2, backward 4) over the peak.

    The attention score FLOPs are left out (at 128 tokens they are under 5% for BERT-base), so this
    slightly understates the utilisation.
    """
    return 6.0 * trainable_parameters * tokens_per_second / (peak * devices)


def trainable_parameters(model) -> int:
    """Parameters that take part in every token's forward and backward pass: the embedding tables
    are lookups, not matmuls, so they are left out of the FLOP count."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embeddings = model.get_input_embeddings()
    if embeddings is not None:
        total -= embeddings.weight.numel()
    return total


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressCallback(TrainerCallback):
    """One log line per logging step (step N/M, loss, lr, samples/s, tokens/s, MFU, ETA: no progress
    bars in pod logs), and the same speed figures as MLflow step metrics through ``log_metrics``
    (rank 0 only; the tracker sends them in the background)."""

    def __init__(
        self,
        samples_per_step: int,
        log_metrics,
        *,
        parameters: int | None = None,
        peak: float | None = None,
        devices: int = 1,
    ) -> None:
        self.samples_per_step = samples_per_step
        self.log_metrics = log_metrics
        self.parameters = parameters  # trainable_parameters(model); with peak None off GPU: no MFU
        self.peak = peak
        self.devices = devices
        self._start: tuple[float, int, int] = (0.0, 0, 0)
        self._last: tuple[float, int, int] = (0.0, 0, 0)
        self.summary: dict[str, float] = {}

    def _mfu(self, tokens_per_second: float) -> float | None:
        if self.parameters is None or self.peak is None:
            return None
        return mfu(tokens_per_second, self.parameters, self.peak, self.devices)

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self._last = (time.monotonic(), state.global_step, state.num_input_tokens_seen)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        now, step, tokens = time.monotonic(), state.global_step, state.num_input_tokens_seen
        elapsed = max(now - self._last[0], 1e-9)
        samples_per_second = (step - self._last[1]) * self.samples_per_step / elapsed
        tokens_per_second = (tokens - self._last[2]) / elapsed
        overall = (step - self._start[1]) / max(now - self._start[0], 1e-9)
        eta = _duration((state.max_steps - step) / overall) if overall > 0 else "?"
        utilisation = self._mfu(tokens_per_second)
        logger.info(
            "step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.1f samples/s  %.0f tokens/s%s  ETA %s",
            step,
            state.max_steps,
            logs.get("epoch", state.epoch or 0.0),
            logs["loss"],
            logs.get("learning_rate", float("nan")),
            samples_per_second,
            tokens_per_second,
            f"  MFU {utilisation:.1%}" if utilisation is not None else "",
            eta,
        )
        if step > self._last[1]:
            metrics = {"samples_per_second": samples_per_second, "tokens_per_second": tokens_per_second}
            if utilisation is not None:
                metrics["mfu"] = utilisation
            self.log_metrics(metrics, step)
        self._last = (now, step, tokens)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """The whole session's figures (a resumed run: since the resume), for the run's summary."""
        if not state.is_world_process_zero:
            return control
        elapsed = max(time.monotonic() - self._start[0], 1e-9)
        steps = state.global_step - self._start[1]
        tokens_per_second = (state.num_input_tokens_seen - self._start[2]) / elapsed
        self.summary = {
            "train_tokens_per_second": tokens_per_second,
            "train_samples_per_second_measured": steps * self.samples_per_step / elapsed,
        }
        utilisation = self._mfu(tokens_per_second)
        if utilisation is not None:
            self.summary["train_mfu"] = utilisation
        return control
