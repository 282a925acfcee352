"""A stand-in rank for ``python -m trainer.launcher --module tests.support.fake_rank``: the launcher's
own behaviour (exit codes, the grace period after SIGTERM) in seconds, without loading a model.

    --exit-codes 0,3        rank r exits with the r-th code (after --delays' r-th seconds)
    --save-seconds 0.2,30   rank r waits for SIGTERM, then "saves" for that long and exits 143

Each rank writes ``<dir>/ready-<rank>`` once its SIGTERM handler is in place and ``<dir>/saved-<rank>``
when its save completed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--exit-codes")
    parser.add_argument("--delays")
    parser.add_argument("--save-seconds")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    print(f"fake rank {rank} of {os.environ['WORLD_SIZE']}", file=sys.stderr, flush=True)
    if args.exit_codes:
        delays = [float(d) for d in args.delays.split(",")] if args.delays else [0.0] * (rank + 1)
        time.sleep(delays[rank])
        return int(args.exit_codes.split(",")[rank])

    save_seconds = float(args.save_seconds.split(",")[rank])

    def on_sigterm(signum: int, frame: object) -> None:
        time.sleep(save_seconds)
        (args.dir / f"saved-{rank}").write_text("saved\n")
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    (args.dir / f"ready-{rank}").write_text("ready\n")
    time.sleep(120)
    return 1


if __name__ == "__main__":
    sys.exit(main())
