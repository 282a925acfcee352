"""``benchmarks/gpu_check.sh``, on CPU: the dry run goes through every check and reports each as
JSON; a check over its budget is stopped and reported without stopping the others.

No GPU here: the CUDA-only check SKIPs in the dry run, and ``--exercise`` runs its code on CPU at
tiny sizes (its figures mean nothing there; that it runs and reports does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.paths import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_checks

STATUSES = {"PASS", "FAIL", "SKIP"}
#: The compare's JSON line carries these for whoever reads the benchmark's result.
COMPARE_KEYS = {
    "device",
    "ours_samples_per_s",
    "hf_default_samples_per_s",
    "hf_tuned_samples_per_s",
    "ratio_default",
    "ratio_tuned",
    "padding_fraction",
}


def _run(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _report(out) -> dict:
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == 1
    assert report["dry_run"] is True
    for name, result in report["checks"].items():
        assert result["status"] in STATUSES, (name, result)
        assert result["budget_s"] > 0
        assert result["doc"]
        if result["status"] != "SKIP":
            assert "elapsed_s" in result, (name, result)
    counts = {s: sum(r["status"] == s for r in report["checks"].values()) for s in STATUSES}
    assert report["summary"] == counts
    return report


def _living(pgid: int) -> list[int]:
    """The processes of a process group that are not zombies (the container's init may not reap)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_a_check_over_its_budget_is_killed_with_everything_it_started():
    check = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    time.sleep(0.3)
    assert len(_living(check.pid)) == 3  # bash and both sleeps
    started = time.monotonic()
    assert gpu_checks._wait(check.pid, timeout_s=0.5) is None  # None: over budget, killed
    assert time.monotonic() - started < 5
    time.sleep(0.2)
    assert _living(check.pid) == []  # the background sleep too


def test_the_attention_check_runs_on_cpu(tmp_path):
    """CUDA-only, so the dry run skips it; ``--exercise`` runs its code at tiny sizes, as here."""
    import gpu_checks_device

    ctx = gpu_checks.Context(tmp_path, dry_run=True, cuda=False, exercise=True)
    attention = gpu_checks_device.check_attention(ctx)
    assert attention["status"] == "PASS"
    assert set(attention["ms_per_fwd_bwd"]) == {"eager", "sdpa"}
    assert all(ms > 0 for kind in attention["ms_per_fwd_bwd"].values() for ms in kind.values())


@pytest.mark.extended
def test_dry_run_goes_through_every_check(tmp_path):
    """The whole flow on CPU with tiny models (~3 min on 2 cores, 5 when busy: six training processes)."""
    out = tmp_path / "out"
    proc = _run(["--dry-run", "--budget-scale", "3", "--out", str(out)], 1500, GPU_CHECK_TIMEOUT_S="1450")
    report = _report(out)
    assert proc.returncode == 0, json.dumps(report["checks"], indent=1)[-4000:]
    names = [c.name for c in gpu_checks.registry()]
    assert report["order"] == names
    assert set(report["checks"]) == set(names)
    statuses = {n: r["status"] for n, r in report["checks"].items()}
    assert statuses == {n: "SKIP" if n == "attention" else "PASS" for n in names}
    assert report["checks"]["attention"]["reason"] == "needs a CUDA GPU"

    compare = json.loads((out / "compare.json").read_text())
    assert set(compare) >= COMPARE_KEYS
    assert compare["device"] == "cpu"
    assert compare["ours_samples_per_s"] > 0
    assert set(compare["datasets"]["tweets"]["runs"]) == {"hf_default", "hf_tuned", "ours"}
    assert compare["hf_default_padding_fraction"] > compare["padding_fraction"]  # padded to max_length
    sigterm = report["checks"]["sigterm"]
    assert sigterm["first_run"]["exit_code"] == 143
    assert sigterm["resumed_run"]["resumed_from_step"] == sigterm["first_run"]["checkpoint_step"]
    assert report["checks"]["torchrun_sigterm"]["exit_code"] == 143
    assert (
        report["checks"]["s3_upload"]["uploaded_bytes"] == report["checks"]["ckpt_large"]["checkpoint_bytes"]
    )
