"""Who may do what on the MLflow tracking server: only the promotion gate moves a champion.

MLflow's UI offers every user alias editing and "Promote model"; without access control anybody
could point ``champion`` at any version and bypass Trainyard's governed ``promote`` task. With the
server's basic-auth app (``mlflow server --app-name basic-auth``, docs/deploy.md, "MLflow access
control") and ``default_permission = NO_PERMISSIONS``, what a user can do is what the roles below
grant, and nothing else:

========================================= ========================================================
role (members)                            grants
========================================= ========================================================
``trainyard-<env>-platform``              MANAGE on every experiment and registered model of the
(the Airflow workers' user,               environment's pipelines: registers versions, tags them,
``trainyard-platform``)                   moves the alias (``promote``), records skipped runs.
``trainyard-<env>-<team>-trainer``        EDIT on the team's experiments (create runs, log metrics,
(``trainyard-<env>-<team>-trainer``, the  artifacts and models), READ on its registered models
team's training pods)                     (score the champion). Setting an alias needs EDIT on the
                                          registered model, so the pods cannot.
``trainyard-<env>-<team>-readers``        READ on the team's experiments and registered models:
(people, ``--member``)                    see runs, versions and the champion, change nothing.
========================================= ========================================================

The MLflow permissions behind it (``mlflow/server/auth/__init__.py``, BEFORE_REQUEST_HANDLERS):
setting an alias needs ``update`` (EDIT) on the registered model, deleting one ``delete`` (MANAGE);
creating a version needs EDIT on the model and READ on the run; transition stage, update version and
set version tag need EDIT, delete version MANAGE; creating a run or logged model needs EDIT on the
experiment.

Everything except :func:`ensure_resources` and :func:`apply_grants` is pure: the plan is computed
from the environment and its pipelines, so ``trainyard mlflow-access`` can print it without a
server. Registered models and experiments are created *before* they are granted (a registered model
otherwise exists only after a pipeline's first promotion, and MLflow gives whoever creates a model
MANAGE on it: a user creating ``prod.nlp.x`` first would own its champion).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from trainyard.config.environment_schema import EnvironmentConfig
    from trainyard.config.loading import ResolvedPipeline

log = logging.getLogger(__name__)

#: The user Trainyard's Airflow workers authenticate as (Secret trainyard-mlflow-credentials).
PLATFORM_USER = "trainyard-platform"
EXPERIMENT = "experiment"
REGISTERED_MODEL = "registered_model"
READ, EDIT, MANAGE = "READ", "EDIT", "MANAGE"
#: Roles live in a workspace; without MLflow workspaces every grant is resolved in this one.
ROLE_WORKSPACE = "default"
#: The environment variable a new user's password is read from: prefix + username in upper case.
PASSWORD_VARIABLE_PREFIX = "TRAINYARD_MLFLOW_PASSWORD_"


class AccessError(RuntimeError):
    """The plan cannot be applied as it stands (missing users, passwords, or a deleted resource)."""


def platform_role(environment: str) -> str:
    return f"trainyard-{environment}-platform"


def trainer_role(environment: str, team: str) -> str:
    return f"trainyard-{environment}-{team}-trainer"


def readers_role(environment: str, team: str) -> str:
    return f"trainyard-{environment}-{team}-readers"


def trainer_user(environment: str, team: str) -> str:
    """The MLflow user of a team's training pods (MLFLOW_TRACKING_USERNAME in the team's Secret)."""
    return f"trainyard-{environment}-{team}-trainer"


def password_variable(username: str) -> str:
    """Where ``apply`` reads the password of a user it has to create, e.g. TRAINYARD_MLFLOW_PASSWORD_X."""
    return PASSWORD_VARIABLE_PREFIX + re.sub(r"[^A-Z0-9]", "_", username.upper())


@dataclass(frozen=True, order=True)
class Grant:
    """One permission of one role on one experiment (by name) or registered model."""

    role: str
    resource_type: str
    resource: str
    permission: str


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class AccessPlan:
    """Everything ``apply`` makes true on the server for one environment."""

    environment: str
    tracking_uri: str
    artifact_location: str | None
    #: Service users created when missing (their passwords come from :func:`password_variable`).
    service_users: tuple[str, ...]
    roles: tuple[Role, ...]
    grants: tuple[Grant, ...]
    experiments: tuple[str, ...]
    registered_models: tuple[str, ...]
    teams: tuple[str, ...] = field(default=())

    def members(self) -> tuple[str, ...]:
        return tuple(sorted({member for role in self.roles for member in role.members}))

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "tracking_uri": self.tracking_uri,
            "teams": list(self.teams),
            "service_users": [
                {"username": user, "password_from": password_variable(user)} for user in self.service_users
            ],
            "roles": [{**asdict(role), "members": list(role.members)} for role in self.roles],
            "grants": [asdict(grant) for grant in self.grants],
            "experiments": list(self.experiments),
            "registered_models": list(self.registered_models),
        }

    def table(self) -> str:
        """The grants as a plain-text table, one row per role and resource."""
        members = {role.name: ", ".join(role.members) or "-" for role in self.roles}
        header = ("ROLE", "MEMBERS", "RESOURCE TYPE", "RESOURCE", "PERMISSION")
        rows = [(g.role, members[g.role], g.resource_type, g.resource, g.permission) for g in self.grants]
        rows += [(role.name, members[role.name], "-", "-", "-") for role in self.roles if not self._has(role)]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            return "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

        return "\n".join([line(header), *(line(row) for row in rows)])

    def _has(self, role: Role) -> bool:
        return any(grant.role == role.name for grant in self.grants)


def access_plan(
    environment: EnvironmentConfig,
    pipelines: Iterable[ResolvedPipeline],
    *,
    platform_user: str = PLATFORM_USER,
    members: Mapping[str, Sequence[str]] | None = None,
) -> AccessPlan:
    """The roles, members and grants of ``environment``: pure, from its teams and pipelines.

    ``members`` maps a team to the MLflow users (people) who read its models. The teams are the
    environment's declared teams; without any declared, the teams the pipelines name.
    """
    env = environment.name
    pipelines = sorted(pipelines, key=lambda p: p.name)
    for pipeline in pipelines:
        if pipeline.environment.name != env:
            raise ValueError(
                f"pipeline {pipeline.name} is resolved for '{pipeline.environment.name}', not '{env}'"
            )
    teams = sorted(set(environment.teams) or {p.config.team for p in pipelines})
    members = dict(members or {})
    unknown = sorted(set(members) - set(teams))
    if unknown:
        raise ValueError(
            f"--member names team(s) {', '.join(unknown)}, not in environment '{env}' "
            f"(teams: {', '.join(teams) or 'none'})"
        )

    grants: set[Grant] = set()
    for pipeline in pipelines:
        team = pipeline.config.team
        experiment, model = pipeline.experiment_name, pipeline.registered_model_name
        grants |= {
            Grant(platform_role(env), EXPERIMENT, experiment, MANAGE),
            Grant(platform_role(env), REGISTERED_MODEL, model, MANAGE),
            Grant(trainer_role(env, team), EXPERIMENT, experiment, EDIT),
            Grant(trainer_role(env, team), REGISTERED_MODEL, model, READ),
            Grant(readers_role(env, team), EXPERIMENT, experiment, READ),
            Grant(readers_role(env, team), REGISTERED_MODEL, model, READ),
        }
    _one_team_each(grants)

    roles = [
        Role(
            platform_role(env),
            f"Trainyard {env}: the promotion gate (Airflow workers); the only one that moves aliases",
            (platform_user,),
        )
    ]
    for team in teams:
        roles.append(
            Role(
                trainer_role(env, team),
                f"Trainyard {env}: team {team}'s training pods log runs and models",
                (trainer_user(env, team),),
            )
        )
        roles.append(
            Role(
                readers_role(env, team),
                f"Trainyard {env}: team {team} reads its experiments and registered models",
                tuple(sorted(set(members.get(team, ())))),
            )
        )
    return AccessPlan(
        environment=env,
        tracking_uri=environment.mlflow.tracking_uri,
        artifact_location=environment.mlflow.artifact_location,
        service_users=tuple(sorted({platform_user, *(trainer_user(env, team) for team in teams)})),
        roles=tuple(roles),
        grants=tuple(sorted(grants)),
        experiments=tuple(sorted({p.experiment_name for p in pipelines})),
        registered_models=tuple(sorted({p.registered_model_name for p in pipelines})),
        teams=tuple(teams),
    )


def _one_team_each(grants: set[Grant]) -> None:
    """Pipelines of different teams cannot share an experiment: each team reads only its own."""
    owners: dict[tuple[str, str], set[str]] = {}
    for grant in grants:
        if grant.role.endswith("-readers"):
            owners.setdefault((grant.resource_type, grant.resource), set()).add(grant.role)
    shared = {key: roles for key, roles in owners.items() if len(roles) > 1}
    if shared:
        (resource_type, resource), roles = sorted(shared.items())[0]
        raise ValueError(
            f"{resource_type} '{resource}' belongs to pipelines of several teams "
            f"({', '.join(sorted(roles))}); put {{team}} or {{pipeline}} in mlflow.experiment_name"
        )


# ------------------------------------------------------------------------------------ applying


def _is(exc: Exception, *codes: str) -> bool:
    return getattr(exc, "error_code", None) in codes


def ensure_resources(client: MlflowClient, plan: AccessPlan) -> tuple[dict[str, str], list[str]]:
    """Create the plan's missing experiments and registered models; (experiment ids by name, changes).

    Run with the admin's credentials, before :func:`apply_grants`: nobody else can then create
    (and so own) a pipeline's registered model or experiment before its first run.
    """
    from mlflow.exceptions import MlflowException

    changes: list[str] = []
    experiment_ids: dict[str, str] = {}
    for name in plan.experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = client.create_experiment(name, artifact_location=plan.artifact_location)
            changes.append(f"created experiment {name} (id {experiment_id})")
        elif experiment.lifecycle_stage != "active":
            raise AccessError(
                f"experiment '{name}' (id {experiment.experiment_id}) is deleted: restore it "
                "(mlflow experiments restore) or purge it (mlflow gc) and run this again"
            )
        else:
            experiment_id = experiment.experiment_id
        experiment_ids[name] = experiment_id
    for name in plan.registered_models:
        try:
            client.get_registered_model(name)
            continue
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
        client.create_registered_model(name, description="Registered by Trainyard (trainyard mlflow-access).")
        changes.append(f"created registered model {name}")
    return experiment_ids, changes


def apply_grants(
    auth: AuthServiceClient,
    plan: AccessPlan,
    *,
    experiment_ids: Mapping[str, str],
    passwords: Mapping[str, str],
) -> list[str]:
    """Make the server hold exactly the plan's roles and grants; returns what changed (empty = nothing).

    Idempotent. Service users are created when missing, with the password ``passwords`` has under
    :func:`password_variable`; members (people) must already exist. Nothing is changed when a user
    cannot be found or created. The roles are owned by this function: a permission on one of them
    that the plan does not hold (a pipeline that moved to another team or was removed) is removed.
    Members are only ever added; remove people from a role in the MLflow UI or with
    ``AuthServiceClient.unassign_role``.
    """
    from mlflow.exceptions import MlflowException

    missing_ids = sorted(
        {g.resource for g in plan.grants if g.resource_type == EXPERIMENT} - set(experiment_ids)
    )
    if missing_ids:
        raise AccessError(f"no experiment id for {', '.join(missing_ids)}: run ensure_resources first")

    existing_users: set[str] = set()
    to_create: list[str] = []
    problems: list[str] = []
    for username in sorted({*plan.service_users, *plan.members()}):
        try:
            auth.get_user(username)
            existing_users.add(username)
            continue
        except MlflowException as exc:
            if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                raise
        if username not in plan.service_users:
            problems.append(f"user '{username}' does not exist (people create theirs or an admin does)")
        elif not passwords.get(password_variable(username)):
            problems.append(
                f"user '{username}' does not exist; set {password_variable(username)} to create it"
            )
        else:
            to_create.append(username)
    if problems:
        raise AccessError("; ".join(problems))

    changes: list[str] = []
    for username in to_create:
        auth.create_user(username, passwords[password_variable(username)])
        changes.append(f"created user {username}")

    roles = {role.name: role for role in auth.list_roles(ROLE_WORKSPACE)}
    for wanted in plan.roles:
        role = roles.get(wanted.name)
        if role is None:
            role = auth.create_role(ROLE_WORKSPACE, wanted.name, wanted.description)
            changes.append(f"created role {wanted.name}")
        changes += _sync_permissions(auth, role.id, wanted.name, plan, experiment_ids)
        for member in wanted.members:
            held = {r.name for r in auth.list_user_roles(member) if r.workspace == ROLE_WORKSPACE}
            if wanted.name not in held:
                auth.assign_role(member, role.id)
                changes.append(f"assigned {member} to {wanted.name}")
    return changes


def _sync_permissions(
    auth: AuthServiceClient, role_id: int, role: str, plan: AccessPlan, experiment_ids: Mapping[str, str]
) -> list[str]:
    def pattern(grant: Grant) -> str:
        return experiment_ids[grant.resource] if grant.resource_type == EXPERIMENT else grant.resource

    wanted = {(g.resource_type, pattern(g)): g for g in plan.grants if g.role == role}
    changes: list[str] = []
    for current in auth.list_role_permissions(role_id):
        key = (current.resource_type, current.resource_pattern)
        grant = wanted.pop(key, None)
        if grant is None:
            auth.remove_role_permission(current.id)
            changes.append(f"removed {current.permission} on {key[0]} {key[1]} from {role}")
        elif current.permission != grant.permission:
            auth.update_role_permission(current.id, grant.permission)
            changes.append(f"{role}: {current.permission} -> {grant.permission} on {key[0]} {grant.resource}")
    for (resource_type, resource_pattern), grant in sorted(wanted.items()):
        auth.add_role_permission(role_id, resource_type, resource_pattern, grant.permission)
        changes.append(f"granted {role} {grant.permission} on {resource_type} {grant.resource}")
    return changes


def describe(plan: AccessPlan, as_json: bool) -> str:
    """The plan as ``trainyard mlflow-access`` prints it."""
    if as_json:
        return json.dumps(plan.to_json(), indent=2)
    users = ", ".join(f"{user} (password from ${password_variable(user)})" for user in plan.service_users)
    return (
        f"MLflow access for environment '{plan.environment}' ({plan.tracking_uri})\n"
        f"service users: {users}\n"
        f"experiments: {', '.join(plan.experiments) or '-'}\n"
        f"registered models: {', '.join(plan.registered_models) or '-'}\n\n{plan.table()}"
    )
