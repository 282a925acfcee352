"""System test: on MLflow's basic-auth server only the promotion gate's identity moves the champion.

A real ``mlflow server --app-name basic-auth`` (SQLite backend store, its own SQLite auth database,
``default_permission = NO_PERMISSIONS``, proxied artifacts), as helm-values/mlflow runs it. The
grants come from ``trainyard mlflow-access --env <env> --apply`` itself (in-process, as an admin),
for an environment with the teams ``nlp`` (pipeline tweet-sentiment) and ``cv`` (none yet). Then
each identity talks to the server with its own MLFLOW_TRACKING_USERNAME/PASSWORD, like its
deployment does:

* the trainer of nlp (a training pod) logs a run with a model in the team's experiment, and cannot
  register or alias versions;
* the platform (Airflow's promote task) registers that run's model through Trainyard's own
  ``registry.register_candidate`` and moves the ``champion`` alias with ``registry.move_alias``;
* a member of nlp reads the model, its versions and the champion, and every write that would move
  or rewrite the champion is refused with 403 PERMISSION_DENIED;
* a member of cv cannot even see nlp's model.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import requests
import yaml

from tests.support import services as svc
from tests.support.paths import DAGS
from trainyard.cli.main import main

pytestmark = pytest.mark.system

ENVIRONMENT = "authz"
PIPELINE = "tweet-sentiment"
EXPERIMENT = f"{ENVIRONMENT}/{PIPELINE}"
MODEL = f"{ENVIRONMENT}.nlp.{PIPELINE}"
ADMIN = ("admin", "admin-" + secrets.token_hex(8))
PLATFORM = ("trainyard-platform", "platform-" + secrets.token_hex(8))
TRAINER = (f"trainyard-{ENVIRONMENT}-nlp-trainer", "trainer-" + secrets.token_hex(8))
ALICE = ("alice", "alice-" + secrets.token_hex(8))  # nlp
CAROL = ("carol", "carol-" + secrets.token_hex(8))  # cv


def auth_ini(path: Path, database: Path) -> Path:
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{database}\n"
        f"admin_username = {ADMIN[0]}\n"
        f"admin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request re-hashes its password (PBKDF2) without the cache: slow on a busy machine.
        "auth_cache_ttl_seconds = 300\n"
    )
    return path


def environment_yaml(base: Path, tracking_uri: str) -> dict[str, Any]:
    def team(name: str) -> dict[str, Any]:
        return {"storage": {"data": [f"{base}/data/{name}/"], "models": [f"{base}/models/{name}/"]}}

    return {
        "launcher": "local",
        "airflow": {"schedules_enabled": False},
        "mlflow": {
            "tracking_uri": tracking_uri,
            "experiment_name": "{environment}/{pipeline}",
            "registered_model_name": "{environment}.{team}.{pipeline}",
        },
        "storage": {
            "data_root": f"{base}/data",
            "models_root": f"{base}/models",
            "checkpoint_root": f"{base}/checkpoints",
        },
        "teams": {"nlp": team("nlp"), "cv": team("cv")},
    }


@dataclass
class Server:
    url: str
    dags: Path

    @contextlib.contextmanager
    def as_user(self, user: tuple[str, str]) -> Iterator[Any]:
        """An MlflowClient that authenticates as ``user`` (the variables MLflow's client reads)."""
        from mlflow import MlflowClient

        credentials = {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}
        with mock.patch.dict(os.environ, credentials):
            yield MlflowClient(self.url)

    def mlflow_access(self, *args: str, **passwords: str) -> int:
        """``trainyard mlflow-access --env authz --apply ...`` as the admin, in this process."""
        settings = {
            "TRAINYARD_ENVIRONMENTS_DIR": str(self.dags / "environments"),
            "TRAINYARD_PIPELINES_DIR": str(self.dags / "pipelines"),
            "MLFLOW_TRACKING_USERNAME": ADMIN[0],
            "MLFLOW_TRACKING_PASSWORD": ADMIN[1],
            **passwords,
        }
        with mock.patch.dict(os.environ, settings):
            return main(["mlflow-access", "--env", ENVIRONMENT, "--apply", *args])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("mlflow-auth")
    port = svc.free_port()
    url = f"http://127.0.0.1:{port}"
    env = svc.clean_env(
        {
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini(base / "basic_auth.ini", base / "auth.db")),
            # The auth app's CSRF protection refuses to start without a static key.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
    )
    dags = base / "dags"
    (dags / "environments").mkdir(parents=True)
    (dags / "pipelines").mkdir()
    (dags / "environments" / f"{ENVIRONMENT}.yaml").write_text(yaml.safe_dump(environment_yaml(base, url)))
    # The real pipeline; its per-environment overrides name environments this test does not have.
    pipeline = yaml.safe_load((DAGS / "pipelines" / f"{PIPELINE}.yaml").read_text())
    pipeline.pop("environments", None)
    (dags / "pipelines" / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(pipeline))
    with svc.Services(base / "logs") as services:
        svc.start_mlflow(
            services,
            port,
            base / "mlflow.db",
            str(base / "artifacts"),
            env,
            app_name="basic-auth",
            timeout=180,
        )
        yield Server(url, dags)


@pytest.fixture(scope="module")
def applied(server: Server) -> Server:
    """The grants, applied as a deployment does: people's accounts first, then the command."""
    from mlflow.server.auth.client import AuthServiceClient

    passwords = {
        "TRAINYARD_MLFLOW_PASSWORD_TRAINYARD_PLATFORM": PLATFORM[1],
        "TRAINYARD_MLFLOW_PASSWORD_TRAINYARD_AUTHZ_NLP_TRAINER": TRAINER[1],
        "TRAINYARD_MLFLOW_PASSWORD_TRAINYARD_AUTHZ_CV_TRAINER": "cv-trainer-" + secrets.token_hex(8),
    }
    with mock.patch.dict(
        os.environ, {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
    ):
        admin = AuthServiceClient(server.url)
        for user in (ALICE, CAROL):
            admin.create_user(*user)
    assert server.mlflow_access("--member", "nlp=alice", "--member", "cv=carol", **passwords) == 0
    return server


def denied(call: Callable[[], Any]) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as raised:
        call()
    assert raised.value.error_code == "PERMISSION_DENIED", raised.value
    assert raised.value.get_http_status_code() == 403


def trainer_run(server: Server) -> Any:
    """What a training pod does: a run in the team's experiment with a model directory logged."""
    with server.as_user(TRAINER) as client:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        run = client.create_run(experiment.experiment_id, tags={"trainyard.team": "nlp"})
        client.log_metric(run.info.run_id, "eval_f1_macro", 0.81)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "MLmodel").write_text("flavors: {}\n")
            client.log_artifact(run.info.run_id, str(Path(tmp) / "MLmodel"), "model")
        client.set_terminated(run.info.run_id, "FINISHED")
        return client.get_run(run.info.run_id)


@pytest.fixture(scope="module")
def champion(applied: Server) -> dict[str, Any]:
    """The platform registers the trainer's run and moves the alias, through Trainyard's registry code."""
    from trainyard.promote import registry

    run = trainer_run(applied)
    with applied.as_user(PLATFORM) as client:
        version = registry.register_candidate(client, MODEL, run)
        registry.tag_version(client, MODEL, version.version, {"trainyard.promoted": "true"})
        registry.move_alias(client, MODEL, "champion", version.version)
        assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    return {"run": run, "version": version.version}


def test_apply_is_idempotent_and_refuses_unknown_people(
    applied: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.server.auth.client import AuthServiceClient

    capsys.readouterr()
    assert applied.mlflow_access("--member", "nlp=alice", "--member", "cv=carol") == 0
    assert "applied: no change(s)" in capsys.readouterr().err

    # A person without an account: nothing is applied, and the message says who.
    assert applied.mlflow_access("--member", "nlp=dave") == 1
    assert "user 'dave' does not exist" in capsys.readouterr().err

    with mock.patch.dict(
        os.environ, {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
    ):
        admin = AuthServiceClient(applied.url)
        roles = {role.name: role for role in admin.list_roles("default")}
        readers = roles[f"trainyard-{ENVIRONMENT}-nlp-readers"]
        assert {(p.resource_type, p.permission) for p in admin.list_role_permissions(readers.id)} == {
            ("experiment", "READ"),
            ("registered_model", "READ"),
        }
        assert [u.user_id for u in admin.list_role_users(readers.id)] == [admin.get_user("alice").id]
        assert admin.get_user_permission("alice", "registered_model", MODEL).permission == "READ"
        assert admin.get_user_permission("carol", "registered_model", MODEL).permission == "NO_PERMISSIONS"
        assert admin.get_user_permission(PLATFORM[0], "registered_model", MODEL).permission == "MANAGE"
        assert admin.get_user_permission(TRAINER[0], "registered_model", MODEL).permission == "READ"


def test_platform_moves_the_champion(champion: dict[str, Any], applied: Server) -> None:
    with applied.as_user(PLATFORM) as client:
        assert client.get_registered_model(MODEL).aliases == {"champion": champion["version"]}
        assert client.get_model_version(MODEL, champion["version"]).run_id == champion["run"].info.run_id


@pytest.mark.filterwarnings("ignore:``mlflow.tracking.client.MlflowClient.transition_model_version_stage``")
def test_team_member_reads_but_cannot_move_the_champion(champion: dict[str, Any], applied: Server) -> None:
    version, run = champion["version"], champion["run"]
    with applied.as_user(ALICE) as client:
        assert client.get_registered_model(MODEL).aliases == {"champion": version}
        assert client.get_model_version(MODEL, version).tags["trainyard.promoted"] == "true"
        assert client.get_model_version_by_alias(MODEL, "champion").version == version
        assert client.get_run(run.info.run_id).data.metrics["eval_f1_macro"] == 0.81
        assert [m.name for m in client.search_registered_models()] == [MODEL]

        denied(lambda: client.set_registered_model_alias(MODEL, "champion", version))
        denied(lambda: client.set_registered_model_alias(MODEL, "challenger", version))
        denied(lambda: client.delete_registered_model_alias(MODEL, "champion"))
        denied(lambda: client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id))
        denied(lambda: client.transition_model_version_stage(MODEL, version, "Production"))
        denied(lambda: client.update_model_version(MODEL, version, description="mine now"))
        denied(lambda: client.set_model_version_tag(MODEL, version, "trainyard.promoted", "false"))
        denied(lambda: client.delete_model_version(MODEL, version))
        denied(lambda: client.create_run(run.info.experiment_id))

    with applied.as_user(PLATFORM) as client:
        assert client.get_model_version_by_alias(MODEL, "champion").version == version


def test_another_team_cannot_read_the_model(champion: dict[str, Any], applied: Server) -> None:
    with applied.as_user(CAROL) as client:
        denied(lambda: client.get_registered_model(MODEL))
        denied(lambda: client.get_model_version(MODEL, champion["version"]))
        denied(lambda: client.get_run(champion["run"].info.run_id))
        assert MODEL not in [m.name for m in client.search_registered_models()]
        assert EXPERIMENT not in [e.name for e in client.search_experiments()]


def test_trainer_logs_runs_but_cannot_set_the_alias(champion: dict[str, Any], applied: Server) -> None:
    run = trainer_run(applied)
    with applied.as_user(TRAINER) as client:
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        # READ on the model: it downloads the champion to score it, nothing more.
        assert client.get_model_version_by_alias(MODEL, "champion").version == champion["version"]
        denied(lambda: client.set_registered_model_alias(MODEL, "champion", champion["version"]))
        denied(lambda: client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id))


def test_anonymous_requests_are_refused(applied: Server) -> None:
    response = requests.get(f"{applied.url}/api/2.0/mlflow/registered-models/get", params={"name": MODEL})
    assert response.status_code == 401
