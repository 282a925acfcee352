"""The GPU check: what ``benchmarks/gpu_check.sh`` runs on a machine with an NVIDIA GPU, in under 8
minutes, writing every result as JSON.

    benchmarks/gpu_check.sh                      # results in $OUT, else ./gpu-check-out
    benchmarks/gpu_check.sh --out /tmp/gpu --only env,attention
    benchmarks/gpu_check.sh --dry-run            # the whole flow on CPU, tiny sizes (~3 min, 2 cores)

Each check runs in its own process, forked from one that has imported the libraries (a crash, a
hung CUDA call or a leaked GPU allocation stays in it), under its own time budget, killed with its
process group when over it; no new check starts
after ``NEW_CHECKS_UNTIL_S`` (7.5 min), and a running one is stopped at ``TOTAL_LIMIT_S``. Every
check ends PASS, FAIL or SKIP with its numbers (``gpu_checks_device`` and ``gpu_checks_trainer``
say what each measures and what passes). Checks that only mean something on a GPU are SKIPped
without CUDA; ``--dry-run`` hides the GPU from the checks and uses tiny models, so the same code
paths run on a laptop or in CI. ``--exercise`` runs the CUDA-only checks on CPU too (tiny sizes,
figures meaningless), to test their code without a GPU.

Output, in ``--out``: ``gpu_check.json`` (rewritten after every check, so a killed run keeps what
finished), ``checks/<name>.json`` per check, ``logs/<name>.log`` per check, ``work/`` (models,
data, runs; removed unless ``--keep-work``). The exit status is 1 if any check FAILed.

Nothing here needs the network: models are built from configs (or the packaged MiniLM's tokenizer),
the data is the packaged demo tweets, S3 is a local moto server.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

#: The whole script must end within 8 minutes on the GPU machine.
NEW_CHECKS_UNTIL_S = 450
TOTAL_LIMIT_S = 470
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class Context:
    """What every check is told: where to write, and how big to go."""

    out: Path
    dry_run: bool
    cuda: bool  # a CUDA GPU is visible to the checks (never in a dry run)
    exercise: bool  # run CUDA-only checks on CPU as well

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def full_size(self) -> bool:
        """GPU sizes (BERT-base, hundreds of steps) rather than the dry run's tiny ones."""
        return self.cuda and not self.dry_run

    def result_of(self, name: str) -> dict[str, Any] | None:
        path = self.out / "checks" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class Check:
    name: str
    budget_s: int
    cuda_only: bool
    run: Callable[[Context], dict[str, Any]]
    doc: str


def registry() -> list[Check]:
    """Every check, in the order they run: cheap and independent first, then the trainer runs."""
    import gpu_checks_device as device
    import gpu_checks_trainer as trainer

    return [
        Check(
            "env",
            60,
            False,
            device.check_env,
            "versions, TF32 flags, default optimizer, numpy ABI, launcher, pip",
        ),
        Check("precision", 30, False, device.check_precision, "auto precision is bf16 on sm_80+"),
        Check("dtype", 45, False, device.check_dtype, "half-precision checkpoints load as float32"),
        Check("attention", 60, True, device.check_attention, "SDPA vs eager fwd+bwd, BERT-base 32x128 bf16"),
        Check("dataloader", 60, False, device.check_dataloader, "loader samples/s, workers 0 vs 2"),
        Check("compare", 210, False, trainer.check_compare, "ours vs run_glue defaults vs tuned HF Trainer"),
        Check(
            "e2e",
            45,
            False,
            trainer.check_e2e,
            "the compare's trainer run: bf16, steps, eval, model in MLflow",
        ),
        Check("sigterm", 100, False, trainer.check_sigterm, "SIGTERM saves, exits 143, resumes at that step"),
        Check(
            "torchrun_sigterm", 80, False, trainer.check_torchrun_sigterm, "the same under trainer.launcher"
        ),
        Check(
            "ckpt_large",
            90,
            False,
            trainer.check_ckpt_large,
            "BERT-large checkpoint: size, save, RSS, resume",
        ),
        Check(
            "s3_upload",
            120,
            False,
            trainer.check_s3_upload,
            "that checkpoint to S3 (moto) vs the grace period",
        ),
    ]


# -- one check, in its own process ------------------------------------------------------------------


def run_one(name: str, ctx: Context) -> int:
    """Child mode: run one check and write ``checks/<name>.json``."""
    check = {c.name: c for c in registry()}[name]
    started = time.monotonic()
    try:
        result = check.run(ctx)
    except Exception as error:
        traceback.print_exc()
        result = {"status": FAIL, "reason": f"{type(error).__name__}: {error}"}
    result.setdefault("status", PASS)
    result["elapsed_s"] = round(time.monotonic() - started, 2)
    write_json(ctx.out / "checks" / f"{name}.json", result)
    return 0


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2, default=str))
    partial.replace(path)


def child_env(ctx: Context) -> dict[str, str]:
    """What a check's process sets in its environment (inherited by the trainers it starts)."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": str(ctx.work / "hf-home"),
        "TRAINYARD_SCRATCH": str(ctx.work / "scratch"),
    }
    if ctx.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU flow, on any machine
        env["OMP_NUM_THREADS"] = "1"
    return env


def launch(
    check: Check, ctx: Context, timeout_s: float, *, spawn: bool = False, capped: bool = False
) -> dict[str, Any]:
    """Run one check in a child process, its own process group, killed (the group: trainers it
    started too) when over ``timeout_s``. Forked by default: the parent imported torch, transformers
    and MLflow once, so a check starts at once instead of paying the imports; ``spawn`` starts a
    fresh interpreter instead (where a forked child cannot use CUDA, see ``fork_can_use_cuda``)."""
    log = ctx.out / "logs" / f"{check.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    (ctx.out / "checks" / f"{check.name}.json").unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = _spawn(check, ctx, log) if spawn else _fork(check, ctx, log)
    status = _wait(pid, timeout_s)
    _kill_group(pid)  # anything it left running
    if status is None:
        return {
            **(ctx.result_of(check.name) or {}),
            "status": FAIL,
            "reason": (
                f"stopped at the overall time limit after {timeout_s:.0f} s (its budget had more left)"
                if capped
                else f"over its time budget: killed after {timeout_s:.0f} s"
            ),
            "elapsed_s": round(time.monotonic() - started, 2),
        }
    result = ctx.result_of(check.name)
    if result is None:
        tail = log.read_text(errors="replace")[-1500:]
        return {"status": FAIL, "reason": f"the check process ended ({status}) without a result: {tail}"}
    return result


def _fork(check: Check, ctx: Context, log: Path) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child: never returns
    try:
        os.setsid()
        handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, 1)
        os.dup2(handle, 2)
        os.environ.update(child_env(ctx))
        if ctx.dry_run:
            import torch

            torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
        code = run_one(check.name, ctx)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _spawn(check: Check, ctx: Context, log: Path) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), "--run-one", check.name, "--out", str(ctx.out)]
    command += ["--dry-run"] * ctx.dry_run + ["--exercise"] * ctx.exercise
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **child_env(ctx)},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


def fork_can_use_cuda() -> bool:
    """Whether a child forked from this process can use the GPU: not if an import here initialised
    the CUDA driver (fork and CUDA do not mix). Probed once with a tensor on the GPU."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import torch

            code = 0 if torch.ones(1, device="cuda").sum().item() == 1 else 1
        except BaseException:
            pass
        finally:
            os._exit(code)
    status = _wait(pid, 60)
    return status is not None and os.waitstatus_to_exitcode(status) == 0


def _wait(pid: int, timeout_s: float) -> int | None:
    """The child's wait status, or None if it is still running after ``timeout_s`` (then killed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    _kill_group(pid)
    os.waitpid(pid, 0)
    return None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def preimport() -> None:
    """What most checks import, loaded once here so that the forked checks share it."""
    import datasets  # noqa: F401
    import mlflow  # noqa: F401
    import torch  # noqa: F401
    from transformers import Trainer, TrainingArguments  # noqa: F401


# -- the whole run ------------------------------------------------------------------------------------


def select(checks: list[Check], only: str | None, skip: str | None) -> list[Check]:
    names = {c.name for c in checks}
    for option, value in (("--only", only), ("--skip", skip)):
        unknown = sorted(set((value or "").split(",")) - names - {""})
        if unknown:
            raise SystemExit(
                f"{option}: unknown check {', '.join(unknown)}; the checks are {', '.join(sorted(names))}"
            )
    wanted = set(only.split(",")) if only else names
    wanted -= set((skip or "").split(","))
    return [c for c in checks if c.name in wanted]


def cuda_visible() -> dict[str, Any]:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, torch; c = torch.cuda.is_available(); "
            "print(json.dumps({'cuda': c, 'name': torch.cuda.get_device_name() if c else 'cpu', "
            "'count': torch.cuda.device_count()}))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return {"cuda": False, "name": "unknown", "error": probe.stderr[-500:]}
    return json.loads(probe.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU only, tiny sizes: the flow, not the figures"
    )
    parser.add_argument("--exercise", action="store_true", help="also run the CUDA-only checks without CUDA")
    parser.add_argument("--only", help="comma-separated checks to run")
    parser.add_argument("--skip", help="comma-separated checks not to run")
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every check's time budget (a slower machine)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep models, data and runs under OUT/work")
    parser.add_argument(
        "--spawn", action="store_true", help="a fresh interpreter per check instead of a fork"
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out.resolve()

    if args.run_one:  # one check in this process, for debugging one: no budget, no fork
        os.environ.update(child_env(Context(out, args.dry_run, False, args.exercise)))
        import torch

        return run_one(args.run_one, Context(out, args.dry_run, torch.cuda.is_available(), args.exercise))

    started = time.monotonic()
    gpu = {"cuda": False, "name": "cpu (dry run)"} if args.dry_run else cuda_visible()
    dry_run = args.dry_run or not gpu["cuda"]
    if dry_run and not args.dry_run:
        print("gpu_check: no CUDA GPU visible; running the dry run (tiny sizes, CPU)", file=sys.stderr)
    ctx = Context(out, dry_run, bool(gpu["cuda"]) and not dry_run, args.exercise)
    checks = select(registry(), args.only, args.skip)
    preimport()
    spawn = args.spawn or (ctx.cuda and not fork_can_use_cuda())
    shutil.rmtree(out / "checks", ignore_errors=True)
    report: dict[str, Any] = {
        "schema": 1,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "exercise": args.exercise,
        "gpu": gpu,
        "limits_s": {
            "new_checks_until": NEW_CHECKS_UNTIL_S * max(1.0, args.budget_scale),
            "total": TOTAL_LIMIT_S * max(1.0, args.budget_scale),
        },
        "order": [c.name for c in checks],
        "checks_started_by": "spawn" if spawn else "fork",
        "checks": {},
    }
    print(f"gpu_check: {len(checks)} checks on {gpu['name']}, results in {out}", file=sys.stderr)
    stretch = max(1.0, args.budget_scale)  # the overall limits stretch with the budgets, never shrink
    for check in checks:
        elapsed = time.monotonic() - started
        if check.cuda_only and not ctx.cuda and not ctx.exercise:
            result = {"status": SKIP, "reason": "needs a CUDA GPU"}
        elif elapsed > NEW_CHECKS_UNTIL_S * stretch:
            result = {"status": SKIP, "reason": f"no time left: {elapsed:.0f} s spent"}
        else:
            budget = check.budget_s * args.budget_scale
            timeout = min(budget, TOTAL_LIMIT_S * stretch - elapsed)
            result = launch(check, ctx, timeout, spawn=spawn, capped=timeout < budget)
        result = {
            "status": result.get("status", FAIL),
            "budget_s": round(check.budget_s * args.budget_scale, 3),
            "doc": check.doc,
            **result,
        }
        report["checks"][check.name] = result
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        report["summary"] = {
            s: sum(r["status"] == s for r in report["checks"].values()) for s in (PASS, FAIL, SKIP)
        }
        write_json(out / "gpu_check.json", report)
        print(
            f"{result['status']:4}  {check.name:17} {result.get('elapsed_s', 0):6.1f} s  {headline(result)}",
            flush=True,
        )
    if not args.keep_work:
        shutil.rmtree(ctx.work, ignore_errors=True)
    print(
        json.dumps(
            {"gpu_check": str(out / "gpu_check.json"), **report["summary"], "elapsed_s": report["elapsed_s"]}
        )
    )
    return 1 if report["summary"][FAIL] else 0


def headline(result: dict[str, Any]) -> str:
    """One line for the console: the reason, or the check's own summary."""
    text = result.get("reason") or result.get("summary") or ""
    return text.replace("\n", " ")[:160]


if __name__ == "__main__":
    sys.exit(main())
