"""The GPU check's trainer checks: ``python -m trainer`` and its checkpoints on the node, for real.

* ``compare``: ``bench_trainer.py --compare`` with BERT-base at 128 tokens, batch 128 for the tuned
  HF Trainer and ours (32 for run_glue's defaults), on the tweets and the long variant. PASS when
  every run worked and the GPU targets are met (>= 3,700 samples/s, >= 4x the defaults, macro F1
  within 0.5 points of the tuned HF Trainer). The dry run trains the tiny BERT a few steps, where
  no target applies.
* ``e2e``: that comparison's ``python -m trainer`` run on the tweets, looked at as a pipeline's run:
  it trained in bf16 (fp32 on CPU) for every step, evaluated, and its model loads back from MLflow
  and classifies text; the logged requirements pin installable releases (no local or pre-release
  version of torch).
* ``sigterm``: one trainer process; SIGTERM once it reports training steps. PASS when it exits 143
  with a complete checkpoint and a relaunch of the same spec resumes at that step and finishes.
* ``torchrun_sigterm``: the same under ``python -m trainer.launcher --nproc-per-node 1`` with two
  data-loader workers (the case where SIGTERM reached the workers and the rank died unsaved):
  SIGTERM to the launcher, exit 143, a complete checkpoint with every rank's RNG state.
* ``ckpt_large``: a BERT-large-sized classifier (335M parameters) saved by the HF Trainer after a
  training step, with its optimizer state: size on disk, save time, host RSS, and the time to
  resume from it.
* ``s3_upload``: that checkpoint uploaded by ``trainer.checkpoints.CheckpointStore`` to a local moto
  S3 server. PASS when save + upload fit the pod's grace period less the launcher's margin (moto
  on loopback is an upper bound on speed: a real object store over the network is slower).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import bench_inputs
import bench_trainer
from gpu_checks import FAIL, PASS, SKIP, Context

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: A progress line of the trainer: "step 12/400 ...".
PROGRESS = re.compile(r"\bstep (\d+)/(\d+)\b")
#: The launcher's margin: ranks get the pod's grace period less this to save (plugins' pod.py).
GRACE_MARGIN_S = 15
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _model(ctx: Context) -> Path:
    return bench_inputs.build_model("bert-base" if ctx.full_size else "tiny", ctx.work / "models")


def _tweets(ctx: Context) -> bench_inputs.Dataset:
    if ctx.full_size:
        return bench_inputs.tweets(ctx.work / "data", validation_rows=200)
    return bench_inputs.tweets(ctx.work / "data", validation_rows=64, train_rows=640)


def _spec(ctx: Context, run_dir: Path, **hyperparameters: Any) -> Path:
    """A real RunSpec for the demo tweets, written to ``run_dir/spec.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = bench_trainer.ours_spec(run_dir, _tweets(ctx), _model(ctx), steps=1, batch_size=32)
    spec["hyperparameters"] = {"batch_size": 32, **hyperparameters}
    spec["mlflow"]["tracking_uri"] = (
        f"sqlite:///{ctx.work / 'mlflow.db'}"  # one schema migration, not one a run
    )
    path = run_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def _env(ctx: Context) -> dict[str, str]:
    return bench_trainer.child_env(ctx.work)


def grace_budget_s() -> tuple[int, int]:
    """(the prod environment's termination grace period, the seconds of it a save may take)."""
    import yaml

    prod = yaml.safe_load((ROOT / "dags" / "environments" / "prod.yaml").read_text())
    grace = int((prod.get("kubernetes") or {}).get("termination_grace_period_seconds", 300))
    return grace, grace - GRACE_MARGIN_S


# -- compare and e2e -------------------------------------------------------------------------------------


def check_compare(ctx: Context) -> dict[str, Any]:
    work, out = ctx.work / "compare", ctx.out / "compare.json"
    command = [
        sys.executable,
        str(HERE / "bench_trainer.py"),
        "--compare",
        "--work",
        str(work),
        "--json-out",
        str(out),
    ]
    if ctx.full_size:
        command += [
            "--model",
            "bert-base",
            "--max-length",
            "128",
            "--batch-size",
            "128",
            "--datasets",
            "tweets,long",
        ]
    else:
        command += ["--model", "tiny", "--quick", "--steps", "4", "--warmup", "1", "--validation-rows", "64"]
        command += ["--train-rows", "640"]
    proc = subprocess.run(command, cwd=ROOT, env=_env(ctx), capture_output=True, text=True, check=False)
    (ctx.out / "compare.txt").write_text(proc.stdout + "\n" + proc.stderr[-5000:])
    if not out.is_file():
        return {"status": FAIL, "reason": f"bench_trainer.py exited {proc.returncode}: {proc.stderr[-1500:]}"}
    result = json.loads(out.read_text())
    missed = [k for k, t in result["targets"].items() if not t["met"]]
    status = FAIL if result["failed"] or missed else PASS
    figures = {
        k: result.get(k)
        for k in (
            "model",
            "steps",
            "batch_size",
            "ours_samples_per_s",
            "hf_default_samples_per_s",
            "hf_tuned_samples_per_s",
            "ratio_default",
            "ratio_tuned",
            "padding_fraction",
            "f1_delta_vs_tuned_points",
            "eval_f1_macro",
            "targets",
            "failed",
        )
    }
    figures["long"] = {
        k: v for k, v in result["datasets"].get("long", {}).items() if k != "runs" and not isinstance(v, dict)
    }
    summary = (
        f"ours {bench_trainer.fmt(result['ours_samples_per_s'], '.0f')} samples/s = "
        f"{bench_trainer.fmt(result['ratio_default'], '.2f')}x run_glue defaults, "
        f"{bench_trainer.fmt(result['ratio_tuned'], '.2f')}x tuned HF"
    )
    if missed:
        summary += f"; missed: {', '.join(missed)}"
    if result["failed"]:
        summary += f"; failed runs: {', '.join(result['failed'])}"
    return {"status": status, "summary": summary, **figures, "table": str(ctx.out / "compare.txt")}


def check_e2e(ctx: Context) -> dict[str, Any]:
    import mlflow
    import torch

    compare = ctx.out / "compare.json"
    if not compare.is_file():
        return {"status": SKIP, "reason": "the compare check produced no result to look at"}
    result = json.loads(compare.read_text())
    run = result["datasets"].get("tweets", {}).get("runs", {}).get("ours")
    if run is None or "error" in run:
        return {
            "status": FAIL,
            "reason": f"the compare's trainer run failed: {(run or {}).get('error', 'missing')}",
        }
    expected = "fp32"
    if ctx.cuda:
        expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    problems = []
    if run["precision"] != expected:
        problems.append(f"precision {run['precision']}, expected {expected}")
    if run.get("global_step") != result["steps"]:
        problems.append(f"global_step {run.get('global_step')}, expected {result['steps']}")
    if run.get("eval_f1_macro") is None:
        problems.append("no eval_f1_macro")
    mlflow.set_tracking_uri(run["tracking_uri"])
    started = time.monotonic()
    model = mlflow.pyfunc.load_model(run["model_uri"])
    predictions = model.predict(["what a wonderful day", "this is the worst"])
    load_s = time.monotonic() - started
    if len(predictions) != 2 or not set(predictions["label"]) <= set(bench_inputs.demo.LABELS):
        problems.append(f"the logged model predicted {predictions!r}")
    requirements = Path(mlflow.pyfunc.get_model_dependencies(run["model_uri"])).read_text().split()
    torch_pin = next((r for r in requirements if r.startswith("torch==")), None)
    if torch_pin is None or "+" in torch_pin or re.search(r"(a|b|rc|dev)\d", torch_pin.split("==")[1]):
        problems.append(f"the logged model pins {torch_pin!r}: not an installable torch release")
    status = mlflow.MlflowClient().get_run(run["mlflow_run_id"]).info.status
    if status != "FINISHED":
        problems.append(f"MLflow run status {status}")
    return {
        "status": FAIL if problems else PASS,
        "summary": f"{run['global_step']} steps {run['precision']}, {run['samples_per_s']:.0f} samples/s, "
        f"F1 {run['eval_f1_macro']:.4f}, model loads in {load_s:.1f} s",
        "problems": problems,
        "samples_per_s": run["samples_per_s"],
        "tokens_per_s": run["tokens_per_s"],
        "padding_fraction": run["padding_fraction"],
        "eval_f1_macro": run["eval_f1_macro"],
        "trainer_reported": run.get("trainer_reported"),
        "model_uri": run["model_uri"],
        "model_load_predict_s": round(load_s, 2),
        "requirements": requirements,
    }


# -- SIGTERM, alone and under the launcher ------------------------------------------------------------------


class Watched:
    """A process whose stderr is copied to a log while a thread watches it for progress lines."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.progress = threading.Event()
        self.last_step: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.write(line)
            match = PROGRESS.search(line)
            if match:
                self.last_step = int(match.group(1))
                self.progress.set()

    def sigterm_after_progress(self, timeout: float) -> float:
        """SIGTERM once a training step is reported; the seconds from SIGTERM to the process's exit."""
        if not self.progress.wait(timeout):
            self.proc.kill()
            raise TimeoutError(f"no training progress line within {timeout:.0f} s (see {self.log.name})")
        self.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        self.proc.wait(timeout=timeout)
        return time.monotonic() - sent

    def finish(self, timeout: float) -> tuple[int, str]:
        stdout, _ = self.proc.communicate(timeout=timeout)
        self._reader.join(5)
        self.log.close()
        return self.proc.returncode, stdout


def _latest_checkpoint(directory: Path) -> Path | None:
    complete = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1])) if complete else None


def _interrupted_run(
    ctx: Context, name: str, command_prefix: list[str], steps: int, **hp: Any
) -> dict[str, Any]:
    """Start a run of ``steps`` steps, SIGTERM it at its first progress line, look at what it left."""
    run_dir = ctx.work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = _spec(ctx, run_dir, max_steps=steps, checkpoint_every_steps=1_000_000, **hp)
    watched = Watched(
        [*command_prefix, "--spec-file", str(spec)], ctx.out / "logs" / f"{name}-run1.log", _env(ctx)
    )
    to_exit = watched.sigterm_after_progress(timeout=120 if ctx.full_size else 90)
    code, _ = watched.finish(30)
    checkpoint = _latest_checkpoint(run_dir / "checkpoints")
    return {
        "spec": spec,
        "exit_code": code,
        "sigterm_at_step": watched.last_step,
        "sigterm_to_exit_s": round(to_exit, 2),
        "checkpoint": checkpoint,
        "checkpoint_step": int(checkpoint.name.split("-")[1]) if checkpoint else None,
        "steps": steps,
    }


def check_sigterm(ctx: Context) -> dict[str, Any]:
    steps = 400 if ctx.full_size else 30
    first = _interrupted_run(ctx, "sigterm", [sys.executable, "-m", "trainer"], steps)
    problems = []
    if first["exit_code"] != 143:
        problems.append(f"exit {first['exit_code']} after SIGTERM, expected 143")
    if first["checkpoint"] is None:
        problems.append("no complete checkpoint after SIGTERM")
    resumed: dict[str, Any] = {}
    if not problems:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "trainer", "--spec-file", str(first["spec"])],
            cwd=ROOT,
            env=_env(ctx),
            capture_output=True,
            text=True,
            timeout=150 if ctx.full_size else 90,
            check=False,
        )
        (ctx.out / "logs" / "sigterm-run2.log").write_text(proc.stderr)
        resumed["resume_run_s"] = round(time.monotonic() - started, 2)
        resumed["exit_code"] = proc.returncode
        if proc.returncode != 0:
            problems.append(f"the relaunch exited {proc.returncode}")
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])["trainyard_result"]
            resumed.update(resumed_from_step=result["resumed_from_step"], global_step=result["global_step"])
            if result["resumed_from_step"] != first["checkpoint_step"]:
                problems.append(
                    f"resumed from step {result['resumed_from_step']}, saved at {first['checkpoint_step']}"
                )
            if result["global_step"] != steps:
                problems.append(f"the relaunch ended at step {result['global_step']}, not {steps}")
    first = {k: str(v) if isinstance(v, Path) else v for k, v in first.items()}
    return {
        "status": FAIL if problems else PASS,
        "summary": f"SIGTERM at step {first['sigterm_at_step']}: exit {first['exit_code']} in "
        f"{first['sigterm_to_exit_s']} s, checkpoint {first['checkpoint_step']}; "
        f"resumed {resumed or 'not tried'}",
        "problems": problems,
        "first_run": first,
        "resumed_run": resumed,
    }


def check_torchrun_sigterm(ctx: Context) -> dict[str, Any]:
    if not (ROOT / "trainer" / "launcher.py").is_file():
        return {"status": SKIP, "reason": "trainer/launcher.py is not in this checkout"}
    nproc = 1
    command = [
        sys.executable,
        "-m",
        "trainer.launcher",
        "--nproc-per-node",
        str(nproc),
        "--shutdown-timeout",
        "60",
        "--",
    ]
    run = _interrupted_run(
        ctx, "torchrun-sigterm", command, 400 if ctx.full_size else 30, dataloader_workers=2
    )
    problems = []
    if run["exit_code"] != 143:
        problems.append(f"the launcher exited {run['exit_code']} after SIGTERM, expected 143")
    rng_states: list[str] = []
    if run["checkpoint"] is None:
        problems.append("no complete checkpoint after SIGTERM")
    else:
        rng_states = sorted(p.name for p in run["checkpoint"].glob("rng_state*.pth"))
        if len(rng_states) != nproc:
            problems.append(
                f"{len(rng_states)} rank RNG states in the checkpoint, expected {nproc}: {rng_states}"
            )
    run = {k: str(v) if isinstance(v, Path) else v for k, v in run.items()}
    return {
        "status": FAIL if problems else PASS,
        "summary": f"{nproc} rank, 2 workers: SIGTERM at step {run['sigterm_at_step']} -> "
        f"exit {run['exit_code']} in {run['sigterm_to_exit_s']} s, checkpoint {run['checkpoint_step']} "
        f"({len(rng_states)} RNG states)",
        "problems": problems,
        "nproc_per_node": nproc,
        "dataloader_workers": 2,
        "rng_states": rng_states,
        **run,
    }


# -- a large checkpoint, on disk and to S3 ----------------------------------------------------------------


def _rss_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak (Linux /proc), in MiB."""
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").is_file() else ""
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    peak = int(found.get("VmHWM", 0)) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_mb": round(int(found.get("VmRSS", 0)) / 1024, 1), "peak_rss_mb": round(peak / 1024, 1)}


def _store_paths(ctx: Context):
    from trainer.checkpoints import CheckpointStore

    root = "s3://trainyard/gpu-check/ckpt-large"
    return root, CheckpointStore(root, None, work_dir=str(ctx.work / "ckpt"))


def check_ckpt_large(ctx: Context) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    if ctx.full_size:
        config = BertConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        )
    else:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    config.num_labels = 2
    _, store = _store_paths(ctx)
    shutil.rmtree(store.local_dir, ignore_errors=True)
    store.local_dir.mkdir(parents=True)
    rows = 32
    data = datasets.Dataset.from_dict(
        {
            "input_ids": [[101] + [1000 + i] * 126 + [102] for i in range(rows)],
            "labels": [i % 2 for i in range(rows)],
        }
    )
    bf16 = ctx.cuda and torch.cuda.is_bf16_supported(including_emulation=False)

    class SaveTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks["train_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if ctx.cuda:
                torch.cuda.synchronize()
            self.marks["step_end"] = time.perf_counter()
            self.marks["rss_before_save"] = _rss_mb()["rss_mb"]

        def on_save(self, args, state, control, **kwargs):
            self.marks["saved"] = time.perf_counter()

    def trainer_for(max_steps: int, save: bool) -> tuple[Trainer, SaveTimer]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        args = TrainingArguments(
            output_dir=str(store.local_dir),
            max_steps=max_steps,
            per_device_train_batch_size=8,
            save_strategy="steps" if save else "no",
            save_steps=max_steps,
            bf16=bf16,
            optim="adamw_torch_fused",
            report_to="none",
            disable_tqdm=True,
            logging_strategy="no",
        )
        timer = SaveTimer()
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[timer]), timer

    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer, timer = trainer_for(1, save=True)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    save_s = timer.marks["saved"] - timer.marks["step_end"]
    checkpoint = store.local_dir / "checkpoint-1"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    memory = _rss_mb()
    if ctx.cuda:
        memory["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del trainer
    if ctx.cuda:
        torch.cuda.empty_cache()

    rss_before_save = timer.marks.get("rss_before_save")
    resumed, resume_timer = trainer_for(2, save=False)
    called = time.perf_counter()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resume_s = resume_timer.marks["train_begin"] - called
    grace, budget = grace_budget_s()
    info = {
        "parameters": parameters,
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": size,
        "checkpoint_gb": round(size / 1e9, 3),
        "files": sorted(p.name for p in checkpoint.iterdir()),
        "save_s": round(save_s, 2),
        "resume_s": round(resume_s, 2),
        "rss_before_save_mb": rss_before_save,
        **memory,
        "resumed_to_step": resumed.state.global_step,
        "grace_period_s": grace,
        "save_budget_s": budget,
        "precision": "bf16" if bf16 else "fp32",
    }
    problems = []
    if resumed.state.global_step != 2:
        problems.append(f"the resumed run ended at step {resumed.state.global_step}, expected 2")
    if save_s > budget:
        problems.append(f"saving took {save_s:.0f} s, over the {budget} s the grace period leaves")
    return {
        "status": FAIL if problems else PASS,
        "summary": f"{parameters / 1e6:.0f}M params: {size / 1e9:.2f} GB saved in {save_s:.1f} s, "
        f"resumed in {resume_s:.1f} s, peak RSS {memory['peak_rss_mb']:.0f} MiB",
        "problems": problems,
        **info,
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """moto's S3 in its own process (an upload of gigabytes must not share a GIL with the client)."""

    def __enter__(self) -> str:
        port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return self.endpoint
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise TimeoutError("moto server did not start within 30 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def check_s3_upload(ctx: Context) -> dict[str, Any]:
    import boto3

    from trainer.checkpoints import CheckpointStore

    large = ctx.result_of("ckpt_large")
    if not large or large.get("status") != PASS:
        return {"status": SKIP, "reason": "the ckpt_large check left no checkpoint to upload"}
    checkpoint = Path(large["checkpoint"])
    os.environ.update(AWS)
    root, _ = _store_paths(ctx)
    with MotoServer() as endpoint:
        bucket = root.removeprefix("s3://").split("/", 1)[0]
        client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
        client.create_bucket(Bucket=bucket)
        store = CheckpointStore(root, endpoint, work_dir=str(ctx.work / "ckpt"))
        started = time.monotonic()
        store.upload(checkpoint)
        upload_s = time.monotonic() - started
        prefix = root.removeprefix(f"s3://{bucket}/") + f"/{checkpoint.name}/"
        listed = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        uploaded = sum(o["Size"] for page in listed for o in page.get("Contents", []))
    grace, budget = large["grace_period_s"], large["save_budget_s"]
    total = large["save_s"] + upload_s
    problems = []
    if uploaded != large["checkpoint_bytes"]:
        problems.append(f"{uploaded} bytes in S3, the checkpoint has {large['checkpoint_bytes']}")
    if total > budget:
        problems.append(f"save + upload {total:.0f} s, over the {budget} s the {grace} s grace period leaves")
    return {
        "status": FAIL if problems else PASS,
        "summary": f"{uploaded / 1e9:.2f} GB uploaded in {upload_s:.1f} s "
        f"({uploaded / 1e6 / max(upload_s, 1e-9):.0f} MB/s); "
        f"save + upload {total:.1f} s of the {budget} s budget",
        "problems": problems,
        "upload_s": round(upload_s, 2),
        "uploaded_bytes": uploaded,
        "save_plus_upload_s": round(total, 2),
        "budget_s": budget,
        "grace_period_s": grace,
        "note": "moto on loopback: a real object store over the network is slower",
    }


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }
