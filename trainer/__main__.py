"""``python -m trainer --spec '<RunSpec JSON>'`` or ``--spec-file run.json``.

Logs go to stderr; the only line on stdout is the final ``{"trainyard_result": {...}}``.

Exit codes:
    0    trained, evaluated and logged
    1    unexpected failure (traceback in the log; a retry may help: after training it resumes at
         the final checkpoint and repeats only what failed)
    2    invalid command line or run spec (the validation errors are printed; no traceback)
    3    the run cannot succeed as specified: bad data (unknown label, missing column) or model
    130  Ctrl-C (SIGINT): no checkpoint is saved; the MLflow run is ended KILLED
    143  SIGTERM: a checkpoint was saved if training had started; relaunch to resume

Once the MLflow run exists, a failure is recorded on it before exiting (tags ``trainyard.error``,
``trainyard.error_stage``, ``trainyard.exit_code``, ``trainyard.checkpoint_step``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from trainer.errors import Terminated, TrainerInputError
from trainer.preemption import Preemption
from trainer.spec import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID_SPEC,
    EXIT_OK,
    EXIT_TERMINATED,
    RunSpec,
)

logger = logging.getLogger("trainer")


def setup_logging() -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f"[rank {os.environ.get('RANK', '0')}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)-7s {rank}%(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # mlflow's records then use this handler too
    if not sys.stderr.isatty():  # no progress bars in pod and task logs (logging a model downloads it)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "aiobotocore", "alembic", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Fine-tune one model as described by a RunSpec (trainer/spec.py).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="the RunSpec as a JSON document")
    source.add_argument("--spec-file", type=Path, help="a file holding the RunSpec JSON")
    return parser.parse_args(argv)


def load_spec(args: argparse.Namespace) -> RunSpec:
    text = args.spec if args.spec is not None else args.spec_file.read_text(encoding="utf-8")
    return RunSpec.model_validate_json(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 on a bad command line
    setup_logging()
    preemption = Preemption()
    preemption.install()
    try:
        try:
            spec = load_spec(args)
        except (ValidationError, OSError) as error:
            print(f"python -m trainer: invalid run spec: {error}", file=sys.stderr)
            return EXIT_INVALID_SPEC

        from trainer.train import run  # heavy imports (torch, transformers) only after the spec is valid

        with contextlib.redirect_stdout(sys.stderr):  # libraries that print() must not pollute stdout
            result = run(spec, preemption)
    except Terminated:
        logger.warning("Terminated by SIGTERM (exit %d); relaunch the same spec to resume", EXIT_TERMINATED)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        logger.warning("Interrupted (exit %d); relaunch the same spec to resume", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except TrainerInputError as error:
        logger.error("%s", error)
        return EXIT_BAD_INPUT
    except Exception:
        logger.exception("Training failed")
        return EXIT_FAILED
    if result is not None:
        print(json.dumps({"trainyard_result": result}), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
