"""Teams in the environment YAML: quotas that Kueue enforces, identity, and storage nobody else reads.

A pipeline's team must be declared in every Kubernetes environment, read only its own prefixes and
ask for no more GPUs than its quota could ever admit; each refusal names the file, the field and
the fix (close matches for a misspelt team).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from tests.config.test_config import DEMO, _edit, _error, _load
from trainyard.cli.main import main as cli
from trainyard.config.errors import ConfigError
from trainyard.config.loading import load_environment, outside_prefixes
from trainyard.train.pod import kueue_labels


def test_the_shipped_environments_schedule_through_kueue_with_the_demo_team(config_dirs):
    pipelines, environments = config_dirs
    for env in ("dev", "prod"):
        environment = load_environment(env, environments)
        assert environment.kubernetes.scheduling == "kueue"
        assert set(environment.teams) == {"nlp"}
        assert environment.cluster_queue("nlp") == f"trainyard-{env}-nlp"
        assert environment.local_queue("nlp") == "nlp"
        pipeline = _load(pipelines, environments, env)
        assert kueue_labels(pipeline) == {
            "kueue.x-k8s.io/queue-name": "nlp",
            "kueue.x-k8s.io/priority-class": environment.kubernetes.priority_class,
        }
    assert _load(pipelines, environments, "local").environment.teams == {}, "the embedded default has none"


def test_an_undeclared_team_is_refused_with_close_matches(config_dirs, capsys):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, "team: nlp", "team: nlpp")
    problem = _error(pipelines, environments, "dev").problems[0]
    assert problem.path == "team"
    assert "team 'nlpp' is not declared in environment 'dev' (teams: nlp)" in problem.message
    assert "nlp" in (problem.suggestion or "")
    _load(pipelines, environments, "local")  # no teams there: any team may train locally

    assert cli(["lint"]) == 1
    err = capsys.readouterr().err
    for env in ("dev", "prod"):
        assert re.search(rf"\[{env}\] .*{DEMO}: 1 problem", err), err
    assert "[local]" not in err


@pytest.mark.parametrize(
    ("field", "old", "new"),
    [
        ("dataset.train", "train: nlp/tweets/train.csv", "train: s3://someone-elses-bucket/secret.csv"),
        ("dataset.validation", "validation: nlp/tweets/validation.csv", "validation: vision/val.csv"),
        # A prefix is a folder: nlp/ does not admit nlp-secrets/.
        ("dataset.train", "train: nlp/tweets/train.csv", "train: nlp-secrets/train.csv"),
        ("model.base", "base: nlp/all-MiniLM-L6-v2", "base: vision/resnet"),
        # Object stores do not agree on resolving dot segments: never inside a prefix.
        ("model.base", "base: nlp/all-MiniLM-L6-v2", "base: nlp/../vision/resnet"),
    ],
)
def test_a_location_outside_the_teams_storage_is_refused_naming_the_prefixes(config_dirs, field, old, new):
    pipelines, environments = config_dirs
    _edit(pipelines / DEMO, old, new)
    for env in ("dev", "prod"):
        problems = _error(pipelines, environments, env).problems
        assert [p.path for p in problems] == [field]
        assert "outside team 'nlp''s storage" in problems[0].message
        assert f"s3://trainyard-{env}-{'models' if field == 'model.base' else 'datasets'}/nlp/" in (
            problems[0].suggestion or ""
        )
        assert problems[0].line == _line_of_value(pipelines / DEMO, new.split(": ", 1)[1])


def _line_of_value(path: Path, value: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if value in line)


def test_teams_apply_to_a_local_environment_too(config_dirs):
    pipelines, environments = config_dirs
    with (environments / "local.yaml").open("a") as handle:
        handle.write("teams:\n  nlp:\n    storage: {data: [/srv/nlp/], models: [/srv/nlp/]}\n")
    problems = _error(pipelines, environments, "local").problems
    assert [p.path for p in problems] == ["dataset.train", "dataset.validation", "model.base"]


@pytest.mark.parametrize(
    ("location", "prefixes", "outside"),
    [
        ("s3://data/nlp/train.csv", ("s3://data/nlp/",), False),
        ("s3://data/nlp", ("s3://data/nlp/",), False),  # the folder itself
        ("s3://data/nlp-secret/train.csv", ("s3://data/nlp/",), True),
        ("s3://data2/nlp/train.csv", ("s3://data/nlp/",), True),
        ("/srv/nlp/../vision/x.csv", ("/srv/nlp/",), True),
        ("s3://data/nlp/../cv/x.csv", ("s3://data/nlp/",), True),
        ("s3://data/nlp/./x.csv", ("s3://data/nlp/",), True),
        ("/srv/nlp/x.csv", ("/srv/vision/", "/srv/nlp/"), False),
    ],
)
def test_outside_prefixes(location, prefixes, outside):
    assert outside_prefixes(location, prefixes) is outside


def test_a_pipeline_its_quota_could_never_admit_is_refused(config_dirs):
    pipelines, environments = config_dirs
    _edit(environments / "dev.yaml", "borrow_gpus: {a100: 4, h100: 2}", "borrow_gpus: {a100: 0, h100: 0}")
    _edit(environments / "dev.yaml", "caps: {gpus: 2,", "caps: {gpus: 8,")
    _edit(pipelines / DEMO, "  gpus: 1", "  gpus: 3")
    problem = _error(pipelines, environments, "dev").problems[0]
    assert problem.path == "resources.gpus"
    assert "3 GPUs can never be admitted for team 'nlp' in 'dev': its quota plus borrowing limit is 2" in (
        problem.message
    )
    assert "teams.nlp.gpus" in (problem.suggestion or "")


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("      models: [s3://trainyard-dev-models/nlp/]\n", "", "teams.nlp.storage.models"),
        ("gpus: {a100: 2, h100: 0}", "gpus: 2", "2 is ambiguous with GPU types a100, h100"),
        ("gpus: {a100: 2, h100: 0}", "gpus: {a100: 2, v100: 1}", "unknown GPU type(s) v100"),
        ("gpus: {a100: 2, h100: 0}", "gpus: {a100: -1}", "cannot be negative"),
        ("  nlp:\n    gpus", "  NLP_team:\n    gpus", "not a valid team name"),
        ("  nlp:\n    gpus", "  default:\n    gpus", "'default' is reserved"),
        (
            "  caps: {gpus: 2,",
            "  secrets:\n    env_from: [trainyard-s3-credentials]\n  caps: {gpus: 2,",
            "kubernetes.secrets.env_from is shared by every team",
        ),
        ("      data: [s3://trainyard-dev-datasets/nlp/]", "      data: [nlp/]", "must be an s3://"),
        ("    a100: {node_labels:", "    A100_80GB: {node_labels:", "names the Kueue ResourceFlavor"),
    ],
)
def test_bad_team_declarations_are_refused(config_dirs, old, new, fragment):
    _, environments = config_dirs
    _edit(environments / "dev.yaml", old, new)
    with pytest.raises(ConfigError) as info:
        load_environment("dev", environments)
    assert fragment in str(info.value)
    assert "dev.yaml" in str(info.value)


def test_kueue_needs_teams(config_dirs):
    _, environments = config_dirs
    text = (environments / "dev.yaml").read_text()
    (environments / "dev.yaml").write_text(text[: text.index("teams:")])
    with pytest.raises(ConfigError, match=r"kubernetes\.scheduling is kueue but no teams are declared"):
        load_environment("dev", environments)


def test_kueue_needs_gpu_types(config_dirs):
    _, environments = config_dirs
    text = (environments / "dev.yaml").read_text()
    text = re.sub(r"  gpu_types:.*?\n(    .*\n)+", "", text)
    text = text.replace("gpus: {a100: 2, h100: 0}", "gpus: 2").replace("borrow_gpus: {a100: 4, h100: 2}", "")
    (environments / "dev.yaml").write_text(text)
    with pytest.raises(ConfigError, match="gpu_types is empty"):
        load_environment("dev", environments)


def test_the_old_gpu_node_selectors_still_load_with_a_warning(config_dirs):
    pipelines, environments = config_dirs
    path = environments / "dev.yaml"
    old_style = (
        "  gpu_node_selectors:\n"
        "    a100: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}\n"
        "    h100: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}\n"
    )
    text = path.read_text()
    new_style = re.search(r"  gpu_types:.*?\n(    .*\n)+", text).group(0)
    path.write_text(text.replace(new_style, old_style))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        environment = load_environment("dev", environments)
    assert any("gpu_node_selectors is deprecated" in str(w.message) for w in caught)
    assert environment.kubernetes.gpu_types["a100"].node_labels == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"
    }
    assert _load(pipelines, environments, "dev").environment.name == "dev"

    path.write_text(text.replace(new_style, new_style + old_style))
    with pytest.raises(ConfigError, match="set gpu_types only"):
        load_environment("dev", environments)


def test_each_team_runs_as_itself_unless_it_says_otherwise(config_dirs):
    _, environments = config_dirs
    _edit(
        environments / "dev.yaml",
        "    memory: 128Gi\n",
        "    memory: 128Gi\n    service_account: nlp-trainer\n",
    )
    _edit(environments / "dev.yaml", "    cpu: ", "    workload_identity: true\n    cpu: ")
    with (environments / "dev.yaml").open("a") as handle:
        handle.write(
            "  vision:\n    storage: {data: [s3://trainyard-dev-datasets/vision/], models: [/srv/models/]}\n"
        )
    environment = load_environment("dev", environments)
    assert environment.team_service_account("nlp") == "nlp-trainer"
    assert environment.team_credentials_secrets("nlp") == (), "workload identity: no Secret at all"
    assert environment.team_service_account("vision") == "trainyard-vision"
    assert environment.team_credentials_secrets("vision") == ("trainyard-vision-credentials",)
    assert environment.team_airflow_role("vision") == "trainyard-vision"
    assert environment.teams["vision"].storage.models == ("/srv/models/",)
