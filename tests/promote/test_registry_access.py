"""The MLflow grants of an environment (trainyard.registry_access): who may move a champion.

Pure computation, no server: tests/system/test_mlflow_auth.py applies the same plans to a real
``mlflow server --app-name basic-auth`` and checks what each identity can and cannot do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipelines import tiny_pipeline
from trainyard.cli.main import main
from trainyard.config.environment_schema import EnvironmentConfig
from trainyard.config.loading import ResolvedPipeline, load_environment, load_pipelines
from trainyard.config.pipeline_schema import PipelineConfig
from trainyard.registry_access import (
    EDIT,
    EXPERIMENT,
    MANAGE,
    READ,
    REGISTERED_MODEL,
    Grant,
    access_plan,
    describe,
    password_variable,
)

#: Permissions that allow setting a registered model's alias (update) or deleting it (delete).
ALIAS_CAPABLE = {EDIT, MANAGE}


def _environment(teams: dict[str, Any], **mlflow: str) -> EnvironmentConfig:
    def team() -> dict[str, Any]:
        return {"storage": {"data": ["/data/"], "models": ["/models/"]}}

    return EnvironmentConfig.model_validate(
        {
            "name": "prod",
            "launcher": "local",
            "mlflow": {"tracking_uri": "http://mlflow:5000", **mlflow},
            "storage": {"data_root": "/data", "models_root": "/models", "checkpoint_root": "/ckpt"},
            "teams": {name: {**team(), **extra} for name, extra in teams.items()},
        }
    )


def _pipeline(environment: EnvironmentConfig, name: str, team: str) -> ResolvedPipeline:
    config = PipelineConfig.model_validate({**tiny_pipeline(name, "tiny", description="x."), "team": team})
    return ResolvedPipeline(config=config, environment=environment, source=Path(f"{name}.yaml"))


def test_prod_plan_lets_only_the_platform_move_the_champion() -> None:
    environment = load_environment("prod")
    loaded, errors = load_pipelines(environment)
    assert not errors
    pipelines = [p for p in loaded if p.name == "tweet-sentiment"]

    plan = access_plan(environment, pipelines, members={"nlp": ["bob", "alice", "bob"]})

    assert set(plan.grants) == {
        Grant("trainyard-prod-platform", EXPERIMENT, "prod/tweet-sentiment", MANAGE),
        Grant("trainyard-prod-platform", REGISTERED_MODEL, "prod.nlp.tweet-sentiment", MANAGE),
        Grant("trainyard-prod-nlp-trainer", EXPERIMENT, "prod/tweet-sentiment", EDIT),
        Grant("trainyard-prod-nlp-trainer", REGISTERED_MODEL, "prod.nlp.tweet-sentiment", READ),
        Grant("trainyard-prod-nlp-readers", EXPERIMENT, "prod/tweet-sentiment", READ),
        Grant("trainyard-prod-nlp-readers", REGISTERED_MODEL, "prod.nlp.tweet-sentiment", READ),
    }
    alias_capable = {
        g.role for g in plan.grants if g.resource_type == REGISTERED_MODEL and g.permission in ALIAS_CAPABLE
    }
    assert alias_capable == {"trainyard-prod-platform"}
    roles = {role.name: role.members for role in plan.roles}
    assert roles == {
        "trainyard-prod-platform": ("trainyard-platform",),
        "trainyard-prod-nlp-trainer": ("trainyard-prod-nlp-trainer",),
        "trainyard-prod-nlp-readers": ("alice", "bob"),
    }
    assert plan.service_users == ("trainyard-platform", "trainyard-prod-nlp-trainer")
    assert plan.experiments == ("prod/tweet-sentiment",)
    assert plan.registered_models == ("prod.nlp.tweet-sentiment",)


def test_each_team_gets_only_its_own_pipelines() -> None:
    environment = _environment(
        {"nlp": {}, "cv": {}, "speech": {}},
        experiment_name="{environment}/{pipeline}",
        registered_model_name="{environment}.{team}.{pipeline}",
    )
    pipelines = [
        _pipeline(environment, "tweets", "nlp"),
        _pipeline(environment, "reviews", "nlp"),
        _pipeline(environment, "photos", "cv"),
    ]
    plan = access_plan(environment, pipelines, platform_user="airflow-prod")

    def resources(role: str) -> set[tuple[str, str, str]]:
        return {(g.resource_type, g.resource, g.permission) for g in plan.grants if g.role == role}

    assert resources("trainyard-prod-cv-readers") == {
        (EXPERIMENT, "prod/photos", READ),
        (REGISTERED_MODEL, "prod.cv.photos", READ),
    }
    assert resources("trainyard-prod-nlp-trainer") == {
        (EXPERIMENT, "prod/tweets", EDIT),
        (EXPERIMENT, "prod/reviews", EDIT),
        (REGISTERED_MODEL, "prod.nlp.tweets", READ),
        (REGISTERED_MODEL, "prod.nlp.reviews", READ),
    }
    assert len(resources("trainyard-prod-platform")) == 6
    assert {g.permission for g in plan.grants if g.role == "trainyard-prod-platform"} == {MANAGE}
    # A team without pipelines yet still has its roles and its pods' user (its Secret exists).
    assert resources("trainyard-prod-speech-readers") == set()
    assert {"trainyard-prod-speech-readers", "trainyard-prod-speech-trainer"} <= {r.name for r in plan.roles}
    assert plan.service_users == (
        "airflow-prod",
        "trainyard-prod-cv-trainer",
        "trainyard-prod-nlp-trainer",
        "trainyard-prod-speech-trainer",
    )
    assert plan.teams == ("cv", "nlp", "speech")


def test_without_declared_teams_the_pipelines_teams_are_used() -> None:
    environment = _environment({})
    plan = access_plan(environment, [_pipeline(environment, "tweets", "qa")])
    assert plan.teams == ("qa",)
    assert Grant("trainyard-prod-qa-readers", REGISTERED_MODEL, "tweets", READ) in plan.grants


def test_an_experiment_shared_by_two_teams_is_refused() -> None:
    environment = _environment({"nlp": {}, "cv": {}}, experiment_name="shared")
    pipelines = [_pipeline(environment, "tweets", "nlp"), _pipeline(environment, "photos", "cv")]
    with pytest.raises(ValueError, match="experiment 'shared' belongs to pipelines of several teams"):
        access_plan(environment, pipelines)


def test_members_of_an_unknown_team_are_refused() -> None:
    environment = _environment({"nlp": {}})
    with pytest.raises(ValueError, match=r"--member names team\(s\) vision, not in environment 'prod'"):
        access_plan(environment, [], members={"vision": ["carol"]})


def test_plan_output() -> None:
    environment = _environment({"nlp": {}})
    plan = access_plan(environment, [_pipeline(environment, "tweets", "nlp")], members={"nlp": ["alice"]})
    document = json.loads(describe(plan, as_json=True))
    assert document["service_users"][0] == {
        "username": "trainyard-platform",
        "password_from": "TRAINYARD_MLFLOW_PASSWORD_TRAINYARD_PLATFORM",
    }
    assert {"role": "trainyard-prod-nlp-readers", "resource_type": "registered_model"}.items() <= next(
        g for g in document["grants"] if g["role"].endswith("readers") and g["resource_type"] != EXPERIMENT
    ).items()
    table = describe(plan, as_json=False).splitlines()
    assert table[-1].split() == [
        "trainyard-prod-platform",
        "trainyard-platform",
        "registered_model",
        "tweets",
        "MANAGE",
    ]
    assert (
        password_variable("trainyard-dev-nlp.trainer")
        == "TRAINYARD_MLFLOW_PASSWORD_TRAINYARD_DEV_NLP_TRAINER"
    )


def test_cli_dry_run_prints_the_plan_and_apply_needs_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mlflow-access", "--env", "dev", "--json", "--member", "nlp=alice"]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["environment"] == "dev"
    assert "dev.nlp.tweet-sentiment" in document["registered_models"]
    assert "dry run: nothing changed" in err

    assert main(["mlflow-access", "--env", "local", "--apply"]) == 1
    assert "needs an MLflow server started with --app-name basic-auth" in capsys.readouterr().err

    assert main(["mlflow-access", "--env", "dev", "--member", "vision=carol"]) == 2
    assert "not in environment 'dev'" in capsys.readouterr().err
