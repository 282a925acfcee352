"""``trainyard mlflow-access --env <env> [--apply]``: the MLflow users, roles and grants of an environment.

Without ``--apply`` it prints the plan (``trainyard.registry_access``) and touches nothing. With it,
it connects to the environment's tracking server as an MLflow admin (MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD, which MLflow's clients read themselves), creates the pipelines' missing
experiments and registered models, then the missing service users and the roles with their grants.
Run it again after adding a pipeline or a team; a second run changes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainyard.registry_access import AccessPlan

HELP = "print (or --apply) the MLflow users, roles and grants of an environment"


def _member(value: str) -> tuple[str, str]:
    team, sep, user = value.partition("=")
    if not sep or not team or not user:
        raise argparse.ArgumentTypeError(f"'{value}' is not TEAM=USER")
    return team, user


def register(sub: argparse._SubParsersAction, emit: Callable[[str], None]) -> None:
    """Add the ``mlflow-access`` subcommand to ``trainyard``'s parser."""
    command = sub.add_parser("mlflow-access", help=HELP, description=__doc__)
    command.add_argument("--env", required=True, help="environment whose MLflow access to print or apply")
    command.add_argument(
        "--apply", action="store_true", help="apply against the tracking server (admin credentials)"
    )
    command.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    command.add_argument(
        "--member",
        action="append",
        type=_member,
        default=[],
        metavar="TEAM=USER",
        help="an existing MLflow user who reads TEAM's models (repeatable)",
    )
    command.add_argument(
        "--platform-user",
        default=None,
        help="MLflow user of the Airflow workers (default: trainyard-platform)",
    )
    command.set_defaults(func=lambda args: run(args, emit))


def run(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    from trainyard.config.loading import load_environment, load_pipelines
    from trainyard.registry_access import PLATFORM_USER, AccessError, access_plan, describe

    environment = load_environment(args.env)
    pipelines, errors = load_pipelines(environment)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        print(
            f"{len(errors)} pipeline file(s) do not load in '{environment.name}': their grants would be "
            "missing (and removed from the roles); fix them first (trainyard lint)",
            file=sys.stderr,
        )
        return 1
    members: dict[str, list[str]] = {}
    for team, user in args.member:
        members.setdefault(team, []).append(user)
    try:
        plan = access_plan(
            environment, pipelines, platform_user=args.platform_user or PLATFORM_USER, members=members
        )
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    emit(describe(plan, args.json))
    if not args.apply:
        print("dry run: nothing changed (add --apply to apply)", file=sys.stderr)
        return 0
    try:
        changes = apply(plan)
    except AccessError as exc:
        print(f"not applied: {exc}", file=sys.stderr)
        return 1
    for change in changes:
        print(change, file=sys.stderr)
    print(f"applied: {len(changes) or 'no'} change(s)", file=sys.stderr)
    return 0


def apply(plan: AccessPlan) -> list[str]:
    """Resources first (as the admin, so nobody else owns them), then users, roles and grants."""
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from trainyard.registry_access import (
        PASSWORD_VARIABLE_PREFIX,
        AccessError,
        apply_grants,
        ensure_resources,
    )

    if not plan.tracking_uri.startswith(("http://", "https://")):
        raise AccessError(
            f"environment '{plan.environment}' tracks to {plan.tracking_uri}: access control needs an "
            "MLflow server started with --app-name basic-auth"
        )
    if not (os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        raise AccessError("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an MLflow admin")
    auth = AuthServiceClient(plan.tracking_uri)
    if not auth.get_user(os.environ["MLFLOW_TRACKING_USERNAME"]).is_admin:
        raise AccessError(f"MLflow user '{os.environ['MLFLOW_TRACKING_USERNAME']}' is not an admin")
    experiment_ids, changes = ensure_resources(MlflowClient(plan.tracking_uri), plan)
    passwords = {k: v for k, v in os.environ.items() if k.startswith(PASSWORD_VARIABLE_PREFIX)}
    return changes + apply_grants(auth, plan, experiment_ids=experiment_ids, passwords=passwords)
