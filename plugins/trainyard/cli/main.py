"""``trainyard``: lint pipelines, prepare the demo, summarise the latest run, report training costs.

Machine-readable output goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from trainyard import paths
from trainyard.config.errors import ConfigError
from trainyard.config.loading import (
    ResolvedPipeline,
    available_environments,
    iter_lint,
    load_environment,
    load_pipeline,
    pipeline_files,
)

log = logging.getLogger("trainyard")
_output: dict[str, TextIO | None] = {"stream": None}  # None: whatever sys.stdout is now


def emit(text: str) -> None:
    """Machine-readable output: the only thing that reaches the real stdout."""
    stream = _output["stream"] or sys.stdout
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()


def _private_stdout() -> TextIO:
    """Airflow's loggers write to stdout: point file descriptor 1 at stderr, keep a private stdout."""
    sys.stdout.flush()
    private = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return private


def cmd_lint(args: argparse.Namespace) -> int:
    from trainyard.loader_files import LoaderFilesError, check_loader_files

    try:
        loaders = check_loader_files(args.dags_dir or paths.dags_dir())
    except LoaderFilesError as exc:
        print(exc, file=sys.stderr)
        return 1
    failures = list(iter_lint(args.pipelines_dir, args.environments_dir))
    for env_name, error in failures:
        print(f"[{env_name}] {error}", file=sys.stderr)
    files = pipeline_files(args.pipelines_dir)
    envs = available_environments(args.environments_dir)
    if failures:
        print(f"{len(failures)} file/environment combination(s) failed", file=sys.stderr)
        return 1
    emit(
        f"OK: {len(files)} pipeline(s) valid in {len(envs)} environment(s): {', '.join(envs)}; "
        f"{loaders} loader file(s)"
    )
    return 0


def _pipeline(name: str, env_name: str | None) -> ResolvedPipeline:
    env = load_environment(env_name)
    path = paths.pipelines_dir() / f"{name}.yaml"
    return load_pipeline(path, env, available_environments())


def cmd_params(args: argparse.Namespace) -> int:
    from trainyard.validate.trigger_conf import PARAM_SCHEMA_DIALECT, param_schemas

    schemas = param_schemas(_pipeline(args.pipeline, args.env))
    document = {
        "$schema": PARAM_SCHEMA_DIALECT,
        "type": "object",
        "properties": schemas,
        "additionalProperties": False,
    }
    emit(json.dumps(document, indent=2))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from trainyard.cli.render import render_pod
    from trainyard.validate.trigger_conf import ConfRejected

    try:
        conf = json.loads(args.conf) if args.conf else {}
    except ValueError as exc:
        print(f"--conf is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(conf, dict):
        print("--conf must be a JSON object of overrides", file=sys.stderr)
        return 2
    try:
        manifest = render_pod(_pipeline(args.pipeline, args.env), conf)
    except (ConfRejected, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    emit(yaml.safe_dump(manifest, sort_keys=False))
    return 0


def cmd_prepare_demo(args: argparse.Namespace) -> int:
    from trainyard.cli.demo import prepare_model, prepare_tweets

    env = load_environment(args.env)
    for root in (env.storage.data_root, env.storage.models_root):
        if "://" in root:
            print(f"prepare-demo writes local files; environment '{env.name}' uses {root}", file=sys.stderr)
            return 2
    train, validation = prepare_tweets(Path(env.storage.data_root))
    model = prepare_model(Path(env.storage.models_root))
    emit(json.dumps({"train": str(train), "validation": str(validation), "model": str(model)}))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from trainyard.cli.summary import latest_summary

    pipeline = _pipeline(args.pipeline, args.env)
    emit(latest_summary(pipeline))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from trainyard.cli.report import ReportError, build_report, parse_time, render_table

    try:
        since = parse_time("--since", args.since)
        until = parse_time("--until", args.until, end_of_day=True) if args.until else None
        if until is not None and until <= since:
            raise ReportError(f"--until {args.until!r} is not after --since {args.since!r}")
    except ReportError as exc:
        print(exc, file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    env = load_environment(args.env)
    client = MlflowClient(tracking_uri=env.mlflow.tracking_uri)
    try:
        report = build_report(client, env, since, until, args.team, args.pipeline)
    except ReportError as exc:
        print(exc, file=sys.stderr)
        return 2
    emit(json.dumps(report, indent=2) if args.format == "json" else render_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    lint = sub.add_parser("lint", help="validate every pipeline against every environment")
    lint.add_argument("--pipelines-dir", type=Path, default=None)
    lint.add_argument("--environments-dir", type=Path, default=None)
    lint.add_argument("--dags-dir", type=Path, default=None, help="where the loader files are")
    lint.set_defaults(func=cmd_lint)

    for name, func, helptext in (
        ("params", cmd_params, "print the JSON schema of a pipeline's trigger conf"),
        ("summary", cmd_summary, "summarise a pipeline's latest run from MLflow"),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("pipeline")
        command.add_argument("--env", default=None, help="environment (default: $TRAINYARD_ENV or local)")
        command.set_defaults(func=func)

    render = sub.add_parser("render", help="print the pod manifest a train task would create")
    render.add_argument("pipeline")
    render.add_argument("--env", default=None, help="a kubernetes environment, e.g. dev or prod")
    render.add_argument("--conf", default=None, help="trigger conf as JSON, validated like a real trigger")
    render.set_defaults(func=cmd_render)

    report = sub.add_parser("report", help="GPU time and cost of training runs, per team and pipeline")
    report.add_argument("--env", default=None, help="environment (default: $TRAINYARD_ENV or local)")
    report.add_argument("--since", required=True, help="runs started on or after this date (YYYY-MM-DD)")
    report.add_argument("--until", default=None, help="runs started up to this date, inclusive (YYYY-MM-DD)")
    report.add_argument("--team", default=None)
    report.add_argument("--pipeline", default=None)
    report.add_argument("--format", choices=("table", "json"), default="table")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("prepare-demo", help="write the demo tweets and base model under the local roots")
    demo.add_argument("--env", default=None)
    demo.set_defaults(func=cmd_prepare_demo)

    from trainyard.cli import mlflow_access

    mlflow_access.register(sub, emit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A real process also moves file descriptor 1; in-process callers (tests) keep theirs.
    _output["stream"] = _private_stdout() if argv is None else sys.stdout
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        _output["stream"] = None


if __name__ == "__main__":
    sys.exit(main())
