"""validate_data reads only its team's storage, whatever the DAG was parsed with.

Real environment and pipeline YAML files, real CSV files and symlinks in a temporary folder, and the
real ``ValidateDataOperator``; only the task context is a stand-in (the run's conf).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException

from tests.support.pipelines import tiny_pipeline
from tests.support.synthetic_data import write_splits
from trainyard.config.loading import ResolvedPipeline, load_environment, load_pipeline
from trainyard.validate.operator import ValidateDataOperator
from trainyard.validate.team_storage import team_storage_problems
from trainyard.validate.trigger_conf import param_schemas

CHECKS = {"min_rows": 100, "min_validation_rows": 20}


@dataclasses.dataclass
class Site:
    root: Path
    environments: Path
    pipelines: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def environment(self, name: str, teams: dict[str, Any] | None, **storage: str) -> None:
        document: dict[str, Any] = {
            "launcher": "local",
            "mlflow": {"tracking_uri": f"sqlite:///{self.root / 'mlflow.db'}"},
            "storage": {
                "data_root": str(self.data),
                "models_root": str(self.models),
                "checkpoint_root": str(self.root / "checkpoints"),
                **storage,
            },
        }
        if teams is not None:
            document["teams"] = teams
        (self.environments / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))

    def pipeline(self, environment: str, team: str = "nlp", **sections: Any) -> ResolvedPipeline:
        document = tiny_pipeline("tweets", "nlp/tiny-bert", description="team storage", team=team)
        document["dataset"] = {
            **document["dataset"],
            "train": "nlp/tweets/train.csv",
            "validation": "nlp/tweets/validation.csv",
            "checks": CHECKS,
        }
        document.update(sections)
        path = self.pipelines / "tweets.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        known = sorted(p.stem for p in self.environments.glob("*.yaml"))
        return load_pipeline(path, load_environment(environment, self.environments), known)


def _teams(data: str, models: str, **more: Any) -> dict[str, Any]:
    return {"nlp": {"storage": {"data": [data], "models": [models]}}, **more}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path, tmp_path / "environments", tmp_path / "pipelines")
    site.environments.mkdir()
    site.pipelines.mkdir()
    write_splits(site.data / "nlp" / "tweets", train_rows=200, validation_rows=40)
    write_splits(site.data / "cv" / "tweets", train_rows=200, validation_rows=40)
    (site.models / "nlp" / "tiny-bert").mkdir(parents=True)
    site.environment("teams", _teams(f"{site.data}/nlp/", f"{site.models}/nlp/"))
    return site


def _run(pipeline: ResolvedPipeline, conf: dict[str, Any] | None = None) -> dict[str, Any]:
    operator = ValidateDataOperator(task_id="validate_data", pipeline=pipeline)
    return operator.execute({"dag_run": SimpleNamespace(conf=conf or {})})  # type: ignore[arg-type]


def test_the_teams_own_data_is_validated(site):
    approval = _run(site.pipeline("teams"))
    assert approval["report"]["passed"] is True
    assert approval["fingerprint"].startswith("sha256:")


def test_a_dag_parsed_under_another_environment_file_reads_nothing_outside_the_team(site):
    """The DAG was built where nlp's data is the whole root; the environment it runs in says otherwise."""
    site.environment("wide", _teams(f"{site.data}/", f"{site.models}/"))
    parsed = site.pipeline(
        "wide",
        dataset={
            "train": "cv/tweets/train.csv",
            "validation": "cv/tweets/validation.csv",
            "label_names": ["negative", "positive"],
            "checks": CHECKS,
        },
    )
    assert _run(parsed)["report"]["passed"], "cv's files are valid data: only the team check stops them"
    running = dataclasses.replace(parsed, environment=load_environment("teams", site.environments))
    with pytest.raises(AirflowFailException) as info:
        _run(running)
    message = str(info.value)
    assert "Pipeline 'tweets' may not read outside its team's storage in environment 'teams'" in message
    for split in ("train", "validation"):
        assert f"dataset.{split} '{site.data}/cv/tweets/{split}.csv' is outside team 'nlp''s data" in message
    assert f"prefixes {site.data}/nlp/ (teams.nlp.storage.data)" in message
    assert "model.base" not in message, "the base model is still under nlp's models prefix"


def test_a_symlink_into_another_teams_data_is_refused(site):
    """nlp/tweets passes every check on the text of the path; the reader would open cv's files."""
    linked = site.data / "nlp" / "linked"
    linked.symlink_to(site.data / "cv" / "tweets", target_is_directory=True)
    pipeline = site.pipeline(
        "teams",
        dataset={
            "train": "nlp/linked/train.csv",
            "validation": "nlp/tweets/validation.csv",
            "label_names": ["negative", "positive"],
            "checks": CHECKS,
        },
    )
    with pytest.raises(AirflowFailException) as info:
        _run(pipeline)
    message = str(info.value)
    assert f"dataset.train '{linked}/train.csv' (resolves to '{site.data}/cv/tweets/train.csv')" in message
    assert "dataset.validation" not in message


def _parsed_without_teams(site: Site, **kwargs: Any) -> ResolvedPipeline:
    """Parsed where the environment declares no teams (so parsing checks nothing), run under 'teams'."""
    site.environment("open", None)
    parsed = site.pipeline("open", **kwargs)
    return dataclasses.replace(parsed, environment=load_environment("teams", site.environments))


def test_an_undeclared_team_reads_nothing(site):
    undeclared = r"team 'qa' is not declared in environment 'teams' \(teams: nlp\)"
    with pytest.raises(AirflowFailException, match=undeclared):
        _run(_parsed_without_teams(site, team="qa"))


def test_a_base_model_outside_the_teams_models_is_refused_and_a_hub_id_is_not(site):
    outside = _parsed_without_teams(site, model={"base": "shared/tiny-bert", "max_length": 32})
    with pytest.raises(AirflowFailException) as info:
        _run(outside)
    assert (
        f"model.base '{site.models}/shared/tiny-bert' is outside team 'nlp''s models prefixes "
        f"{site.models}/nlp/ (teams.nlp.storage.models)"
    ) in str(info.value)
    hub = site.pipeline("teams", model={"base": "hf://org/tiny-bert", "max_length": 32})
    assert team_storage_problems(hub) == []


def test_s3_locations_are_refused_before_any_request(site):
    """The endpoint is a closed port: a read would fail with a connection error, not this message."""
    site.environment(
        "s3",
        _teams("s3://datasets/nlp/", "s3://models/nlp/"),
        data_root="s3://datasets",
        models_root="s3://models",
        s3_endpoint_url="http://127.0.0.1:9",
    )
    site.environment("s3-wide", _teams("s3://datasets/", "s3://models/"), data_root="s3://datasets")
    parsed = site.pipeline(
        "s3-wide",
        dataset={
            "train": "nlp-secret/train.csv",  # a sibling folder sharing the prefix's name, not under it
            "validation": "nlp/tweets/validation.csv",
            "label_names": ["negative", "positive"],
            "checks": CHECKS,
        },
        model={"base": "s3://models/nlp/tiny-bert", "max_length": 32},
    )
    running = dataclasses.replace(parsed, environment=load_environment("s3", site.environments))
    with pytest.raises(AirflowFailException) as info:
        _run(running)
    assert str(info.value).endswith(
        "dataset.train 's3://datasets/nlp-secret/train.csv' is outside team 'nlp''s data prefixes "
        "s3://datasets/nlp/ (teams.nlp.storage.data)."
    )


def test_without_teams_nothing_is_restricted(site):
    site.environment("open", None)
    pipeline = site.pipeline(
        "open",
        team="anyone",
        dataset={
            "train": "cv/tweets/train.csv",
            "validation": "cv/tweets/validation.csv",
            "label_names": ["negative", "positive"],
            "checks": CHECKS,
        },
    )
    assert team_storage_problems(pipeline) == []
    assert _run(pipeline)["report"]["passed"]


def test_no_trigger_conf_key_can_name_a_location(site):
    """Only hyperparameters are overridable; a location in the conf stops the run like any other key."""
    pipeline = site.pipeline("teams")
    assert set(param_schemas(pipeline)) == {"force_retrain", "epochs", "learning_rate", "max_steps"}
    for conf in (
        {"train": f"{site.data}/cv/tweets/train.csv"},
        {"dataset": {"train": "cv/tweets/train.csv"}},
        {"data_root": str(site.data / "cv")},
        {"model": {"base": "cv/model"}},
    ):
        with pytest.raises(AirflowFailException, match="is not a known setting"):
            _run(pipeline, conf)
