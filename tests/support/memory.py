"""Peak memory of this process, for tests that bound what a hostile input may cost."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM), in MiB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps that across ``execve``, so a child of a
    large pytest process would report the parent's size at fork time.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
