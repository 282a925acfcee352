"""``python -m trainer.launcher --nproc-per-node N --shutdown-timeout S -- --spec ...``: one
``python -m trainer`` per GPU of a pod, under torch's elastic agent (the machinery ``torchrun``
runs), with the two things a pod needs that ``torchrun`` does not give:

* **The pod's exit code is the first failing rank's.** ``torchrun`` exits 1 whatever its ranks
  exit with, which would make a bad spec (2) or bad data (3) look retryable and hide a preemption
  (143). Here the first rank to fail decides (``pod_exit_code``), and a SIGTERM to the launcher
  itself exits 143 once the ranks have saved their checkpoint and stopped.
* **The ranks' grace period after SIGTERM** is ``--shutdown-timeout`` seconds, passed to the agent
  as ``LaunchConfig.shutdown_timeout`` (the pod's termination grace period, less a margin); the
  agent SIGKILLs a rank only after that. No command-line flag of a particular ``torchrun`` is
  relied on: the launch is a call into the installed torch, whose API the tests run.

Rendezvous is torchrun's ``--standalone`` (c10d on localhost: one node), with no restarts: a failed
pod is relaunched by Airflow, which resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

from trainer.spec import EXIT_FAILED, EXIT_TERMINATED

logger = logging.getLogger("trainer.launcher")

#: How a rank ends when the agent stops it, after another rank failed or the launcher got SIGTERM:
#: SIGTERM handled (143) or not (-15), or the agent's SIGKILL once the grace period is over.
SHUTDOWN_EXIT_CODES = frozenset({EXIT_TERMINATED, -signal.SIGTERM, -signal.SIGKILL})


class Failure(Protocol):
    """What ``pod_exit_code`` reads of torch's ``ProcessFailure``."""

    exitcode: int
    timestamp: int


def exit_code_of(code: int) -> int:
    """A rank's exit status as a shell reports it: killed by signal N (``-N``) is 128 + N."""
    return 128 - code if code < 0 else code


def pod_exit_code(failures: Mapping[int, Failure]) -> int:
    """The exit code of the first rank that failed (``ChildFailedError.failures``, by global rank).

    The agent stamps a failure in whole seconds when it sees it; the ranks it then stops (SIGTERM,
    SIGKILL) fail later, or in the same second. On a tie the failure that is not such a stop wins,
    then the lowest rank: a rank that exits 3 on bad data, the others stopped in the same second,
    makes the pod exit 3. A rank killed by SIGTERM (-15) or exiting 143 makes it exit 143.
    """
    if not failures:
        return EXIT_FAILED
    first = min(
        failures, key=lambda r: (failures[r].timestamp, failures[r].exitcode in SHUTDOWN_EXIT_CODES, r)
    )
    return exit_code_of(failures[first].exitcode)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.launcher",
        description="One `python -m trainer` per GPU (one node); exit with the first failing rank's code.",
    )
    parser.add_argument("--nproc-per-node", type=int, required=True, help="processes (ranks): one per GPU")
    parser.add_argument(
        "--shutdown-timeout",
        type=int,
        required=True,
        help="seconds the ranks get to checkpoint and exit after SIGTERM before they are killed",
    )
    parser.add_argument(
        "--module", default="trainer", help="the module each rank runs with `python -m` (default: trainer)"
    )
    parser.add_argument("rank_args", nargs=argparse.REMAINDER, help="-- then the arguments of every rank")
    args = parser.parse_args(argv)
    if args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node {args.nproc_per_node}: must be at least 1")
    if args.shutdown_timeout < 0:
        parser.error(f"--shutdown-timeout {args.shutdown_timeout}: must not be negative")
    if args.rank_args[:1] == ["--"]:
        args.rank_args = args.rank_args[1:]
    return args


def launch_config(nproc_per_node: int, shutdown_timeout: int):
    """torchrun's ``--standalone --nproc-per-node N --max-restarts 0``, with the shutdown timeout."""
    from torch.distributed.launcher.api import LaunchConfig

    options = {}
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        options["shutdown_timeout"] = shutdown_timeout
    else:  # an older torch: the agent's grace period is fixed
        logger.warning(
            "torch %s has no LaunchConfig.shutdown_timeout: the ranks get 30 s, not %d s, to checkpoint",
            _torch_version(),
            shutdown_timeout,
        )
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port on this node, as torchrun --standalone
        max_restarts=0,
        **options,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


def launch(nproc_per_node: int, shutdown_timeout: int, module: str, rank_args: Sequence[str]) -> int:
    """Run the ranks to the end; the exit code the pod ends with."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    if nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # torchrun's default: N ranks must not each take every core
    config = launch_config(nproc_per_node, shutdown_timeout)
    logger.info(
        "Starting %d ranks of `python -m %s` (SIGTERM: %d s to checkpoint)",
        nproc_per_node,
        module,
        shutdown_timeout,
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", module, *rank_args)
    except ChildFailedError as error:
        code = pod_exit_code(error.failures)
        codes = ", ".join(f"rank {r}: {f.exitcode}" for r, f in sorted(error.failures.items()))
        logger.error("A rank failed (%s): exiting with the first failure's code %d", codes, code)
        return code
    except SignalException as error:
        signum = int(error.sigval)
        logger.warning("%s: the ranks were stopped (exit %d)", signal.Signals(signum).name, 128 + signum)
        return 128 + signum
    return 0


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 on a bad command line
    setup_logging()
    return launch(args.nproc_per_node, args.shutdown_timeout, args.module, args.rank_args)


if __name__ == "__main__":
    sys.exit(main())
