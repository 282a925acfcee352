"""Pipeline and environment YAML: every error kind names the file, the line, the field and a fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from trainyard.cli.main import main as cli
from trainyard.config.errors import ConfigError
from trainyard.config.loading import available_environments, load_environment, load_pipeline, load_pipelines

DEMO = "tweet-sentiment.yaml"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"fixture text not found: {old!r}"
    path.write_text(text.replace(old, new, 1))


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def _load(pipelines: Path, environments: Path, env: str = "local", name: str = DEMO):
    return load_pipeline(
        pipelines / name, load_environment(env, environments), available_environments(environments)
    )


def _error(pipelines: Path, environments: Path, env: str = "local", name: str = DEMO) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(pipelines, environments, env, name)
    return info.value


def test_the_shipped_pipelines_load_in_every_environment(config_dirs):
    pipelines, environments = config_dirs
    assert available_environments(environments) == ["dev", "local", "prod"]
    for env in ("local", "dev", "prod"):
        pipeline = _load(pipelines, environments, env)
        assert pipeline.name == "tweet-sentiment"
    prod = _load(pipelines, environments, "prod")
    dev = _load(pipelines, environments, "dev")
    assert prod.config.training.epochs == 3, "prod override applied"
    assert dev.config.training.epochs == 1
    assert prod.schedule == "0 3 * * 1" and dev.schedule is None, "dev switches schedules off"
    assert prod.data_spec.train_uri == "s3://trainyard-prod-datasets/nlp/tweets/train.csv"
    assert prod.registered_model_name == "prod.nlp.tweet-sentiment"


def test_missing_field_names_file_and_field(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "owner: nlp-team@example.com\n", "")
    error = _error(pipelines, environments)
    assert error.file == pipelines / DEMO
    text = str(error)
    assert str(pipelines / DEMO) in text
    assert "owner: required field is missing" in text


def test_wrong_type_names_field_line_and_value(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "batch_size: 32", "batch_size: lots")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "training.batch_size"
    assert problem.line == _line_of(pipelines / DEMO, "batch_size: lots")
    assert "integer" in problem.message and "'lots'" in problem.message


def test_unknown_key_suggests_the_close_match(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "  epochs: 1\n", "  epoch: 1\n")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "training.epoch"
    assert problem.message == "unknown field"
    assert problem.suggestion == "did you mean 'epochs'?"
    assert problem.line == _line_of(pipelines / DEMO, "epoch: 1")


def test_unknown_top_level_key_lists_valid_keys_when_nothing_is_close(config_dirs):
    pipelines, environments = config_dirs
    (pipelines / DEMO).write_text((pipelines / DEMO).read_text() + "zzz_banana: 1\n")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "zzz_banana"
    assert "valid keys here:" in (problem.suggestion or "") and "dataset" in problem.suggestion


@pytest.mark.parametrize(
    ("schedule", "fragment"),
    [("61 * * * *", "not a valid cron expression"), ("@fortnightly", "unknown preset '@fortnightly'")],
)
def test_bad_schedule(config_dirs, schedule, fragment):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, 'schedule: "0 3 * * 1"', f'schedule: "{schedule}"')
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "schedule"
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("ftp://host/train.csv", "unsupported URI scheme 'ftp://'"),
        ("s3://Bad_Bucket/train.csv", "not a valid s3:// URI"),
        ("s3://bucket-only", "not a valid s3:// URI"),
    ],
)
def test_bad_dataset_uri(config_dirs, uri, fragment):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "train: nlp/tweets/train.csv", f"train: {uri}")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "dataset.train"
    assert fragment in problem.message


def test_unknown_file_format_asks_for_format(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "train: nlp/tweets/train.csv", "train: tweets/train.jsonl")
    assert "set dataset.format to csv or parquet" in str(_error(pipelines, environments))


@pytest.mark.parametrize("field", ["image", "namespace", "model", "resources", "gpus"])
def test_only_hyperparameters_can_be_overridable(config_dirs, field):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "overridable: [epochs,", f"overridable: [{field}, epochs,")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "overridable"
    assert f"'{field}' cannot be overridden at trigger time" in problem.message
    assert "learning_rate" in problem.message, "lists what can be overridden"


def test_environment_override_of_unknown_field_points_into_the_override(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "      epochs: 3", "      epocs: 3")
    # local has no override: it loads; prod applies it and fails, naming the override's path.
    _load(pipelines, environments, "local")
    problem = _error(pipelines, environments, "prod").problems[0]
    assert problem.path == "environments.prod.training.epocs"
    assert problem.suggestion == "did you mean 'epochs'?"
    assert problem.line == _line_of(pipelines / DEMO, "epocs: 3")


def test_environment_override_for_unknown_environment(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "environments:\n  prod:", "environments:\n  prdo:")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "environments.prdo"
    assert problem.suggestion == "did you mean 'prod'?"


def test_environment_override_may_not_rename_the_pipeline(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "environments:\n  prod:", "environments:\n  prod:\n    name: other")
    assert "environments.prod.name: cannot differ per environment" in str(_error(pipelines, environments))


def test_invalid_yaml_reports_the_line(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "  max_length: 128", "  max_length: [128")
    error = _error(pipelines, environments)
    assert "invalid YAML" in str(error)
    assert error.problems[0].line is not None


def test_name_must_match_file(config_dirs):
    pipelines, environments = config_dirs
    (pipelines / DEMO).rename(pipelines / "other.yaml")
    error = _error(pipelines, environments, name="other.yaml")
    assert "does not match the file name" in str(error) and "rename the file" in str(error)


def test_all_problems_are_reported_at_once(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "batch_size: 32", "batch_size: 0")
    _edit(pipelines / DEMO, "learning_rate: 5.0e-5", "learning_rate: -1")
    _edit(pipelines / DEMO, "metric: eval_f1_macro", "metric: f1")
    paths = {p.path for p in _error(pipelines, environments).problems}
    assert paths == {"training.batch_size", "training.learning_rate", "promotion.metric"}


def test_resources_over_the_environment_caps(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "  gpus: 1", "  gpus: 4")
    _edit(pipelines / DEMO, "  gpu_type: a100\n", "  gpu_type: a100\n  memory: 128Gi\n")
    _load(pipelines, environments, "local")  # no caps on one machine
    _load(pipelines, environments, "prod")  # prod allows 8 GPUs and 512Gi
    error = _error(pipelines, environments, "dev")
    messages = {p.path: p.message for p in error.problems}
    assert "4 GPUs exceed the cap of 2 in 'dev'" in messages["resources.gpus"]
    assert "128Gi exceeds the cap of 64Gi in 'dev'" in messages["resources.memory"]
    assert set(messages) == {"resources.gpus", "resources.memory"}, (
        "cpu and shm_size follow the GPU count: its own error covers them"
    )


def test_a_default_that_follows_gpus_past_a_cap_names_the_default_the_cap_and_the_fix(config_dirs, capsys):
    """Not clamped: a pod quietly smaller than its GPUs need would fail at run time instead."""
    pipelines, environments = config_dirs
    _edit(environments / "dev.yaml", 'caps: {gpus: 2, cpu: "16"', 'caps: {gpus: 2, cpu: "6"')
    _edit(pipelines / DEMO, "  gpus: 1", "  gpus: 2")
    error = _error(pipelines, environments, "dev")
    (problem,) = error.problems
    assert problem.path == "resources.cpu"
    assert problem.message == (
        "not set, so it follows gpus: 8 (4 per GPU x 2 GPUs), which exceeds the cap of 6 in 'dev'"
    )
    assert problem.suggestion == "set resources.cpu to at most 6, or ask the platform team to raise caps.cpu"
    assert problem.line == _line_of(pipelines / DEMO, "resources:"), "the section the field is missing from"
    assert cli(["lint"]) == 1
    assert "resources.cpu: not set, so it follows gpus: 8" in capsys.readouterr().err

    _edit(pipelines / DEMO, "  gpu_type: a100\n", '  gpu_type: a100\n  cpu: "6"\n')
    assert _load(pipelines, environments, "dev").config.resources.effective == {
        "cpu": "6",
        "memory": "32Gi",
        "shm_size": "4Gi",
    }, "a written value wins; the others still follow gpus"


def test_unknown_gpu_type(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "gpu_type: a100", "gpu_type: a10")
    problem = _error(pipelines, environments, "prod").problems[0]
    assert problem.path == "resources.gpu_type"
    assert "unknown GPU type 'a10'" in problem.message
    assert problem.suggestion == "did you mean 'a100'?"


def test_unknown_environment_suggests(config_dirs):
    _, environments = config_dirs
    with pytest.raises(ConfigError, match=r"unknown environment 'prdo'.*did you mean 'prod'\?"):
        load_environment("prdo", environments)


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        (
            "image: ghcr.io/trainyard/trainer:0.2.0",
            "image: ghcr.io/trainyard/trainer:latest",
            "must be pinned",
        ),
        ("image: ghcr.io/trainyard/trainer:0.2.0", "image: ghcr.io/trainyard/trainer", "must be pinned"),
        ('experiment_name: "dev/{pipeline}"', 'experiment_name: "dev/{model}"', "bad template"),
        (
            "priority_class: trainyard-dev-low",
            "priority_klass: trainyard-dev-low",
            "did you mean 'priority_class'",
        ),
    ],
)
def test_environment_file_errors(config_dirs, old, new, fragment):
    _, environments = config_dirs
    _edit(environments / "dev.yaml", old, new)
    with pytest.raises(ConfigError) as info:
        load_environment("dev", environments)
    assert str(environments / "dev.yaml") in str(info.value)
    assert fragment in str(info.value)


def test_kubernetes_launcher_requires_its_section(config_dirs):
    _, environments = config_dirs
    data = yaml.safe_load((environments / "dev.yaml").read_text())
    del data["kubernetes"]
    (environments / "dev.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="needs a 'kubernetes' section"):
        load_environment("dev", environments)


def test_unset_environment_variable_is_named(config_dirs, monkeypatch):
    _, environments = config_dirs
    monkeypatch.delenv("TRAINYARD_TEST_UNSET", raising=False)
    _edit(
        environments / "local.yaml",
        "data_root: ${TRAINYARD_HOME}/data",
        "data_root: ${TRAINYARD_TEST_UNSET}/d",
    )
    with pytest.raises(
        ConfigError, match=r"storage\.data_root: environment variable \$\{TRAINYARD_TEST_UNSET\}"
    ):
        load_environment("local", environments)


def test_a_bad_file_does_not_hide_the_good_ones(config_dirs):
    pipelines, environments = config_dirs
    (pipelines / "broken.yaml").write_text("name: broken\nowner: x\n")
    good, errors = load_pipelines(load_environment("local", environments), pipelines, environments)
    assert [p.name for p in good] == ["tweet-sentiment"]
    assert [e.file.name for e in errors] == ["broken.yaml"]


def test_lint_exits_non_zero_listing_every_error(config_dirs, capsys):
    pipelines, _ = config_dirs
    assert cli(["lint"]) == 0
    assert "OK: 1 pipeline(s) valid in 3 environment(s)" in capsys.readouterr().out

    _edit(pipelines / DEMO, "  gpus: 1", "  gpus: 3")  # over dev's cap only
    (pipelines / "broken.yaml").write_text("name: broken\nteam: nlp\n")
    assert cli(["lint"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"\[dev\] .*tweet-sentiment.yaml: 1 problem", err)
    assert not re.search(r"\[(local|prod)\] .*tweet-sentiment.yaml", err), "only dev caps 2 GPUs"
    for env in ("dev", "local", "prod"):
        assert f"[{env}] {pipelines / 'broken.yaml'}" in err
    assert "owner: required field is missing" in err


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ('experiment_name: "dev/{pipeline}"', 'experiment_name: "dev/{pipeline.upper}"', "is not allowed"),
        (
            'registered_model_name: "dev.{team}.{pipeline}"',
            'registered_model_name: "dev.{team}"',
            "{pipeline}",
        ),
        ('registered_model_name: "dev.{team}.{pipeline}"', 'registered_model_name: "dev/{pipeline}"', "'/'"),
        (
            "tracking_uri: http://mlflow",
            "tracking_uri: http://user:hunter2@mlflow",
            "must not contain a password",
        ),
        ("data_root: s3://trainyard-dev-datasets", "data_root: datasets", "absolute path or an s3://"),
        ("models_root: s3://trainyard-dev-models", "models_root: s3://Bad_Bucket", "not a valid s3:// URI"),
    ],
)
def test_environment_naming_storage_and_credentials_are_checked(config_dirs, old, new, fragment):
    _, environments = config_dirs
    _edit(environments / "dev.yaml", old, new)
    with pytest.raises(ConfigError) as info:
        load_environment("dev", environments)
    assert fragment in str(info.value)


def test_locations_may_not_climb_out_of_their_root(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "train: nlp/tweets/train.csv", "train: ../other-team/train.csv")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "dataset.train" and "contains '..'" in problem.message


def test_pods_cannot_read_local_paths(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "train: nlp/tweets/train.csv", "train: /opt/airflow/secrets.csv")
    _load(pipelines, environments, "local")  # fine on one machine
    problem = _error(pipelines, environments, "prod").problems[0]
    assert problem.path == "dataset.train" and "pods in 'prod' cannot read" in problem.message


def test_duplicate_yaml_keys_are_an_error_naming_both_lines(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "  epochs: 1\n", "  epochs: 1\n  epochs: 9\n")
    error = _error(pipelines, environments)
    first = _line_of(pipelines / DEMO, "epochs: 1")
    assert f"duplicate key 'epochs' (first on line {first})" in str(error)


def test_environment_variables_expand_inside_lists(config_dirs, monkeypatch):
    _, environments = config_dirs
    monkeypatch.setenv("TY_NLP_DATA", "s3://nlp-datasets/shared")
    _edit(environments / "dev.yaml", "data: [s3://trainyard-dev-datasets/nlp/]", 'data: ["${TY_NLP_DATA}"]')
    storage = load_environment("dev", environments).teams["nlp"].storage
    assert storage.data == ("s3://nlp-datasets/shared/",)


def test_only_yaml_files_are_pipelines(config_dirs):
    pipelines, environments = config_dirs
    (pipelines / "tweet-sentiment.yml").write_text(
        (pipelines / DEMO).read_text().replace("epochs: 1", "epochs: 7")
    )
    good, errors = load_pipelines(load_environment("local", environments), pipelines, environments)
    assert [p.config.training.epochs for p in good] == [1] and errors == []


def test_yaml_booleans_where_text_is_expected_get_a_quoting_hint(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "label_names: [negative, positive]", "label_names: [no, yes]")
    problem = _error(pipelines, environments).problems[0]
    assert problem.path == "dataset.label_names[0]" and "got False" in problem.message
    assert "quote the value" in problem.suggestion


def test_the_old_name_of_must_reach_still_works_with_a_warning(config_dirs):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "  must_reach: 0.70", "  min_value: 0.70")
    _edit(pipelines / DEMO, "environments:\n", "environments:\n  dev:\n    promotion: {min_value: 0.5}\n")
    with pytest.warns(UserWarning) as caught:
        pipeline = _load(pipelines, environments, "dev")
    assert pipeline.config.promotion.must_reach == 0.5, "the dev override, under its old name"
    messages = sorted(str(w.message) for w in caught)
    fix = "is deprecated; rename it to promotion.must_reach"
    assert messages == [
        f"{pipelines / DEMO}: line {_line_of(pipelines / DEMO, '  min_value: 0.70')}, "
        f"promotion.min_value {fix}",
        f"{pipelines / DEMO}: line {_line_of(pipelines / DEMO, '{min_value: 0.5}')}, "
        f"environments.dev.promotion.min_value {fix}",
    ]
    _edit(pipelines / DEMO, "  min_value: 0.70", "  min_value: 0.70\n  must_reach: 0.8")
    assert "set only must_reach" in str(_error(pipelines, environments))
