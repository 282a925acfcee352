"""System test: under the FAB auth manager a team's users trigger and edit their DAGs, and no others.

The auth manager is the one the Airflow Helm chart configures for Airflow 3 (FabAuthManager; see
docs/architecture.md, "Who may run what"). What runs, each as its own process on 127.0.0.1:

* ``airflow api-server``: the REST API, JWTs from ``POST /auth/token``, FAB's users and roles API;
* ``airflow dag-processor``: parses the repository's DAG files and, as it writes each DAG, syncs the
  DAG's ``access_control`` into FAB's permission tables (``airflow.dag_processing.collection``).

No scheduler or triggerer: access is decided by the API server from the permissions the
dag-processor wrote; nothing here needs a task to run (a triggered run stays queued).

The environment declares two teams, ``nlp`` (role ``trainyard-nlp``, the default name) and ``cv``
(role ``Vision Team``, named in the YAML); the pipelines are the real tweet-sentiment (nlp) and a copy
of it owned by cv. The roles are created empty, as a platform admin would: every DAG permission the
team users have comes from ``access_control``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from tests.support import services as svc
from tests.support.paths import DAGS

pytestmark = [pytest.mark.system, pytest.mark.slow]

ENVIRONMENT = "team-access"
NLP_DAG = "tweet-sentiment"
CV_DAG = "review-sentiment"
SPEECH_DAG = "call-sentiment"
ROLES = {"nlp": "trainyard-nlp", "cv": "Vision Team", "speech": "trainyard-speech"}
PASSWORDS = {"admin": "admin-system-test", "nlp-user": "nlp-system-test", "cv-user": "cv-system-test"}
#: How often the dag-processor re-parses a file here: each parse re-syncs the DAGs' permissions.
REPARSE_SECONDS = 5


def environment_yaml(base: Path) -> dict:
    def team(name: str) -> dict:
        return {"storage": {"data": [f"{base}/data/{name}/"], "models": [f"{base}/models/{name}/"]}}

    return {
        "launcher": "local",
        "airflow": {"schedules_enabled": False},
        "mlflow": {"tracking_uri": f"sqlite:///{base / 'mlflow.db'}"},
        "storage": {
            "data_root": f"{base}/data",
            "models_root": f"{base}/models",
            "checkpoint_root": f"{base}/checkpoints",
        },
        # speech's role is created by the last test only.
        "teams": {
            "nlp": team("nlp"),
            "cv": {**team("cv"), "airflow_role": ROLES["cv"]},
            "speech": team("speech"),
        },
    }


def team_pipeline_yaml(name: str, team: str) -> dict:
    """The real tweet-sentiment pipeline, owned by ``team`` and reading that team's storage."""
    config = yaml.safe_load((DAGS / "pipelines" / f"{NLP_DAG}.yaml").read_text())
    config.update({"name": name, "team": team, "owner": f"{team}-team@example.com"})
    config["dataset"].update({"train": f"{team}/data/train.csv", "validation": f"{team}/data/validation.csv"})
    config["model"]["base"] = f"{team}/all-MiniLM-L6-v2"
    return config


@dataclass
class Deployment:
    services: svc.Services
    api_url: str
    tokens: dict[str, str]
    pipelines: Path

    def call(self, user: str, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return requests.request(method, f"{self.api_url}{path}", headers=headers, timeout=30, **kwargs)

    def ok(self, user: str, method: str, path: str, **kwargs) -> dict:
        response = self.call(user, method, path, **kwargs)
        assert response.status_code in (200, 201), f"{user} {method} {path}: {response.text[:500]}"
        return response.json()

    def dag_permissions(self, role: str) -> set[tuple[str, str]]:
        """(action, resource) pairs of ``role`` on DAG-level resources, as FAB stores them."""
        actions = self.ok("admin", "GET", f"/auth/fab/v1/roles/{role}")["actions"]
        return {
            (a["action"]["name"], a["resource"]["name"])
            for a in actions
            if a["resource"]["name"].startswith(("DAG:", "DAG Run:"))
        }


def _expected(dag_id: str) -> set[tuple[str, str]]:
    return {
        ("can_read", f"DAG:{dag_id}"),
        ("can_edit", f"DAG:{dag_id}"),
        ("can_read", f"DAG Run:{dag_id}"),
        ("can_create", f"DAG Run:{dag_id}"),
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    started = time.monotonic()
    base = tmp_path_factory.mktemp("team-access")
    with svc.Services(base / "logs") as services:
        try:
            yield _start(base, services)
        except BaseException:
            print(services.report(60))
            raise
        finally:
            up = time.monotonic() - started
            print(f"\nteam-access deployment up for {up:.0f}s; logs in {services.log_dir}")


def _start(base: Path, services: svc.Services) -> Deployment:
    t0 = time.monotonic()
    environments = base / "environments"
    shutil.copytree(DAGS / "environments", environments)  # pipelines may override local/dev/prod
    (environments / f"{ENVIRONMENT}.yaml").write_text(yaml.safe_dump(environment_yaml(base), sort_keys=False))
    pipelines = base / "pipelines"
    pipelines.mkdir()
    shutil.copy(DAGS / "pipelines" / f"{NLP_DAG}.yaml", pipelines)
    (pipelines / f"{CV_DAG}.yaml").write_text(
        yaml.safe_dump(team_pipeline_yaml(CV_DAG, "cv"), sort_keys=False)
    )

    api_port = svc.free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = svc.fab_airflow_env(
        base / "airflow",
        api_port,
        {
            "TRAINYARD_ENV": ENVIRONMENT,
            "TRAINYARD_ENVIRONMENTS_DIR": str(environments),
            "TRAINYARD_PIPELINES_DIR": str(pipelines),
            "TRAINYARD_HOME": str(base / "trainyard-home"),
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(REPARSE_SECONDS),
        },
    )
    svc.migrate_airflow_db(env)  # Airflow's tables and FAB's (users, roles, permissions)
    svc.create_fab_user(env, "admin", PASSWORDS["admin"])  # as the chart's createUserJob does
    t1 = time.monotonic()
    svc.start_airflow(services, env, api_port, components=["api-server"])
    services.wait_http("api-server", f"{api_url}/api/v2/monitor/health", timeout=180)
    admin = svc.api_token(api_url, "admin", PASSWORDS["admin"])
    deployment = Deployment(services, api_url, {"admin": admin}, pipelines)

    # The platform team's part: the team roles must exist before the DAGs that name them are parsed
    # (FAB refuses an access_control naming an unknown role), and users get only their team's role.
    for role in (ROLES["nlp"], ROLES["cv"]):
        deployment.ok("admin", "POST", "/auth/fab/v1/roles", json={"name": role, "actions": []})
    for user, team in (("nlp-user", "nlp"), ("cv-user", "cv")):
        body = {
            "username": user,
            "email": f"{user}@example.com",
            "first_name": user,
            "last_name": "Test",
            "roles": [{"name": ROLES[team]}],
            "password": PASSWORDS[user],
        }
        deployment.ok("admin", "POST", "/auth/fab/v1/users", json=body)
    t2 = time.monotonic()

    svc.start_airflow(services, env, api_port, components=["dag-processor"])
    synced = {ROLES["nlp"]: _expected(NLP_DAG), ROLES["cv"]: _expected(CV_DAG)}
    services.wait_until(
        "the DAGs' access_control in FAB's permission tables",
        lambda: all(deployment.dag_permissions(role) == perms for role, perms in synced.items()),
        timeout=180,
        watch=["api-server", "dag-processor"],
        interval=1,
    )
    errors = deployment.ok("admin", "GET", "/api/v2/importErrors")
    assert errors["total_entries"] == 0, errors
    # Tokens only now: FAB caches a user's permissions for [fab] cache_ttl (30 s) once it is seen.
    for user in ("nlp-user", "cv-user"):
        deployment.tokens[user] = svc.api_token(api_url, user, PASSWORDS[user])
    print(
        f"\nmigrate + admin {t1 - t0:.0f}s; api-server, roles and users {t2 - t1:.0f}s; "
        f"DAGs parsed and permissions synced {time.monotonic() - t2:.0f}s"
    )
    return deployment


# ---------------------------------------------------------------------------------------------- tests


def test_each_team_lists_only_its_own_dags(deployment):
    assert {d["dag_id"] for d in deployment.ok("admin", "GET", "/api/v2/dags")["dags"]} == {NLP_DAG, CV_DAG}
    for user, own in (("nlp-user", NLP_DAG), ("cv-user", CV_DAG)):
        listed = deployment.ok(user, "GET", "/api/v2/dags")
        assert [d["dag_id"] for d in listed["dags"]] == [own], user
        assert listed["total_entries"] == 1


def test_the_team_triggers_its_dag_and_another_team_gets_403(deployment):
    body = {"logical_date": None, "conf": {"epochs": 2}}
    run = deployment.ok(
        "nlp-user", "POST", f"/api/v2/dags/{NLP_DAG}/dagRuns", json={**body, "dag_run_id": "nlp-1"}
    )
    assert (run["dag_id"], run["state"], run["conf"]) == (NLP_DAG, "queued", {"epochs": 2})
    runs = deployment.ok("nlp-user", "GET", f"/api/v2/dags/{NLP_DAG}/dagRuns")["dag_runs"]
    assert [r["dag_run_id"] for r in runs] == ["nlp-1"]

    refused = deployment.call("cv-user", "POST", f"/api/v2/dags/{NLP_DAG}/dagRuns", json=body)
    assert refused.status_code == 403, refused.text
    assert deployment.call("cv-user", "GET", f"/api/v2/dags/{NLP_DAG}/dagRuns").status_code == 403
    assert deployment.call("cv-user", "GET", f"/api/v2/dags/{NLP_DAG}").status_code == 403
    runs = deployment.ok("admin", "GET", f"/api/v2/dags/{NLP_DAG}/dagRuns")["dag_runs"]
    assert [r["dag_run_id"] for r in runs] == ["nlp-1"], "the refused trigger created no run"

    # And the other way round: cv runs its own pipeline, nlp may not.
    deployment.ok("cv-user", "POST", f"/api/v2/dags/{CV_DAG}/dagRuns", json=body)
    assert deployment.call("nlp-user", "POST", f"/api/v2/dags/{CV_DAG}/dagRuns", json=body).status_code == 403


def test_the_team_pauses_and_unpauses_its_dag_and_another_team_gets_403(deployment):
    path = f"/api/v2/dags/{NLP_DAG}"
    for paused in (False, True):
        assert deployment.ok("nlp-user", "PATCH", path, json={"is_paused": paused})["is_paused"] is paused
    refused = deployment.call("cv-user", "PATCH", path, json={"is_paused": False})
    assert refused.status_code == 403, refused.text
    assert deployment.ok("admin", "GET", path)["is_paused"] is True, "the refused edit changed nothing"


def test_a_permission_granted_by_hand_to_another_team_is_revoked_at_the_next_parse(deployment):
    """access_control is authoritative: FAB removes what it does not list (Admin keeps everything)."""
    role = ROLES["cv"]
    current = deployment.ok("admin", "GET", f"/auth/fab/v1/roles/{role}")["actions"]
    grant = {"action": {"name": "can_edit"}, "resource": {"name": f"DAG:{NLP_DAG}"}}
    deployment.ok(
        "admin", "PATCH", f"/auth/fab/v1/roles/{role}", json={"name": role, "actions": [*current, grant]}
    )
    assert ("can_edit", f"DAG:{NLP_DAG}") in deployment.dag_permissions(role)
    deployment.services.wait_until(
        f"the dag-processor to revoke {role}'s hand-made grant on {NLP_DAG}",
        lambda: deployment.dag_permissions(role) == _expected(CV_DAG),
        timeout=REPARSE_SECONDS * 12,
        watch=["api-server", "dag-processor"],
        interval=1,
    )
    assert deployment.dag_permissions(ROLES["nlp"]) == _expected(NLP_DAG)


def test_a_dag_whose_team_role_does_not_exist_is_an_import_error_until_the_role_is_created(deployment):
    """FAB refuses an access_control naming an unknown role: the file shows the error; once the role
    exists, the next parse grants it the DAG. This is why the team roles are created first."""
    path = deployment.pipelines / f"{SPEECH_DAG}.yaml"
    path.write_text(yaml.safe_dump(team_pipeline_yaml(SPEECH_DAG, "speech"), sort_keys=False))

    def import_errors() -> list[str]:
        return [
            e["stack_trace"] for e in deployment.ok("admin", "GET", "/api/v2/importErrors")["import_errors"]
        ]

    errors = deployment.services.wait_until(
        f"an import error for {SPEECH_DAG}'s missing role",
        lambda: [e for e in import_errors() if ROLES["speech"] in e],
        timeout=REPARSE_SECONDS * 12,
        watch=["api-server", "dag-processor"],
        interval=1,
    )
    assert f"includes a role named '{ROLES['speech']}', but that role does not exist" in errors[0]
    deployment.ok("admin", "POST", "/auth/fab/v1/roles", json={"name": ROLES["speech"], "actions": []})
    deployment.services.wait_until(
        f"{ROLES['speech']} to be granted {SPEECH_DAG} and the import error to clear",
        lambda: deployment.dag_permissions(ROLES["speech"]) == _expected(SPEECH_DAG) and not import_errors(),
        timeout=REPARSE_SECONDS * 12,
        watch=["api-server", "dag-processor"],
        interval=1,
    )
