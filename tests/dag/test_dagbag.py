"""The DAG file in a real Airflow DagBag: one DAG per pipeline, in every environment."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.support.paths import DAGS, ROOT
from trainyard.cli.main import main as cli
from trainyard.loader_files import loader_file_name, shard_index

LOADERS = sorted(DAGS.glob("trainyard_pipelines_*.py"))

HEAVY = ("torch", "transformers", "datasets", "mlflow", "pandas", "boto3", "pyarrow", "sklearn")


def _dagbag():
    return DagBag(str(DAGS))


@pytest.mark.parametrize("env", ["local", "dev", "prod"])
def test_every_pipeline_loads_without_import_errors(env, monkeypatch):
    monkeypatch.setenv("TRAINYARD_ENV", env)
    bag = _dagbag()
    assert bag.import_errors == {}
    assert bag.dag_ids == ["tweet-sentiment"]
    dag = bag.dags["tweet-sentiment"]
    assert [t.task_id for t in dag.topological_sort()] == ["validate_data", "train", "promote"]
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert dag.tags == {"trainyard", "team:nlp", f"env:{env}"}
    assert dag.owner == "nlp-team@example.com"
    assert "tweet-sentiment" in dag.doc_md and "eval_f1_macro" in dag.doc_md
    train = dag.get_task("train")
    expected = {
        "local": "LocalTrainOperator",
        "dev": "KubernetesTrainOperator",
        "prod": "KubernetesTrainOperator",
    }
    assert type(train).__name__ == expected[env]


def test_schedule_and_retries_come_from_yaml(monkeypatch):
    monkeypatch.setenv("TRAINYARD_ENV", "prod")
    prod = _dagbag().dags["tweet-sentiment"]
    assert prod.schedule == "0 3 * * 1" and prod.timetable.expression == "0 3 * * 1"
    assert prod.default_args["retries"] == 2
    assert prod.default_args["retry_delay"] == timedelta(minutes=10)
    # Under Kueue the train task may also wait max_queue_wait_minutes for quota before training.
    assert prod.get_task("train").execution_timeout == timedelta(minutes=720 + 1440)

    monkeypatch.setenv("TRAINYARD_ENV", "dev")
    dev = _dagbag().dags["tweet-sentiment"]
    assert dev.schedule is None, "dev turns schedules off: manual runs only"


def test_params_are_generated_from_the_overridable_fields(monkeypatch):
    monkeypatch.setenv("TRAINYARD_ENV", "prod")
    params = _dagbag().dags["tweet-sentiment"].params
    assert set(params.keys()) == {"force_retrain", "epochs", "learning_rate", "batch_size", "max_steps"}
    assert params.get_param("force_retrain").schema["type"] == "boolean", "the trigger form shows a switch"
    assert params.get_param("force_retrain").value is False
    assert params.get_param("epochs").value == 3, "default is the value in this environment"
    assert params.get_param("epochs").schema == {
        "$schema": "http://json-schema.org/draft-07/schema#",  # a cheap metaschema to check against
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 100,
    }
    assert params.get_param("batch_size").schema["minimum"] == 1
    assert params.get_param("max_steps").schema["type"] == ["integer", "null"]
    from airflow.sdk.definitions.param import ParamValidationError, process_params

    with pytest.raises(ParamValidationError):
        params.get_param("learning_rate").resolve(-1.0)
    dag = _dagbag().dags["tweet-sentiment"]
    for task in dag.tasks:  # what a running task sees: the DAG's params, then the conf
        resolved = process_params(dag, task, {"epochs": 2}, suppress_exception=False)
        assert resolved == {
            "force_retrain": False,
            "epochs": 2,
            "learning_rate": 5e-5,
            "batch_size": 32,
            "max_steps": None,
        }
        with pytest.raises(ParamValidationError):
            process_params(dag, task, {"epochs": -1}, suppress_exception=False)


def test_params_survive_serialization_as_the_scheduler_and_api_server_see_them(monkeypatch):
    from airflow.serialization.serialized_objects import DagSerialization

    monkeypatch.setenv("TRAINYARD_ENV", "prod")
    dag = _dagbag().dags["tweet-sentiment"]
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert set(restored.params.keys()) == {
        "force_retrain",
        "epochs",
        "learning_rate",
        "batch_size",
        "max_steps",
    }
    assert restored.params.get_param("epochs").schema["maximum"] == 100


def test_a_broken_pipeline_file_leaves_the_good_dags_and_shows_its_error(config_dirs, monkeypatch):
    pipelines, _ = config_dirs
    (pipelines / "churn.yaml").write_text(
        (pipelines / "tweet-sentiment.yaml")
        .read_text()
        .replace("name: tweet-sentiment", "name: churn")
        .replace("  learning_rate: 5.0e-5", "  learnin_rate: 5.0e-5")
    )
    bag = _dagbag()
    assert bag.import_errors == {}, "the good DAGs stay loaded"
    assert set(bag.dag_ids) == {"tweet-sentiment", "churn"}
    placeholder = bag.dags["churn"]
    assert "trainyard:invalid" in placeholder.tags
    assert "churn.yaml" in placeholder.doc_md and "training.learnin_rate" in placeholder.doc_md
    assert "did you mean 'learning_rate'" in placeholder.doc_md
    assert [t.task_id for t in placeholder.tasks] == ["config_error"]
    warnings = " ".join(w for ws in bag.captured_warnings.values() for w in ws)
    assert "churn.yaml" in warnings and "learnin_rate" in warnings


def test_a_broken_environment_is_an_import_error(config_dirs, monkeypatch):
    _, environments = config_dirs
    (environments / "local.yaml").write_text("launcher: teleport\n")
    bag = _dagbag()
    assert bag.dag_ids == []
    assert len(bag.import_errors) == len(LOADERS), "every loader file reports it"
    for error in bag.import_errors.values():
        assert "local.yaml" in error and "launcher" in error


def test_each_pipeline_lands_in_the_loader_file_its_name_hashes_to(config_dirs):
    pipelines, _ = config_dirs
    demo = (pipelines / "tweet-sentiment.yaml").read_text()
    names = [f"team-model-{i:02d}" for i in range(12)]
    for name in names:
        (pipelines / f"{name}.yaml").write_text(demo.replace("name: tweet-sentiment", f"name: {name}"))
    bag = _dagbag()
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == sorted([*names, "tweet-sentiment"])
    used = set()
    for dag_id in bag.dag_ids:
        expected = DAGS / loader_file_name(shard_index(dag_id, len(LOADERS)), len(LOADERS))
        assert Path(bag.dags[dag_id].fileloc) == expected, "fileloc is stable: a hash of the name"
        used.add(expected)
    assert len(used) > 1, "the pipelines spread over several loader files"
    one_file = DagBag(str(DAGS / loader_file_name(0, len(LOADERS))))
    assert set(one_file.dag_ids) == {d for d in bag.dag_ids if shard_index(d, len(LOADERS)) == 0}


def test_an_incomplete_set_of_loader_files_is_an_error_not_missing_dags(tmp_path, capsys):
    for loader in LOADERS[1:]:  # loader 0 is missing: its pipelines would silently vanish
        shutil.copy(loader, tmp_path)
    shutil.copytree(DAGS / "pipelines", tmp_path / "pipelines")
    shutil.copytree(DAGS / "environments", tmp_path / "environments")
    bag = DagBag(str(tmp_path))
    assert len(bag.import_errors) == len(LOADERS) - 1
    for error in bag.import_errors.values():
        assert f"missing: {loader_file_name(0, len(LOADERS))}" in error
    assert cli(["lint", "--dags-dir", str(tmp_path)]) == 1
    assert f"missing: {loader_file_name(0, len(LOADERS))}" in capsys.readouterr().err


def test_parsing_imports_no_heavy_library():
    """Airflow re-parses DAG files constantly: the DAG file must not pull in ML libraries."""
    code = f"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bags = {{}}
import os
for env in ("local", "dev", "prod"):
    os.environ["TRAINYARD_ENV"] = env
    bag = DagBag({str(DAGS)!r})
    assert not bag.import_errors, bag.import_errors
    bags[env] = bag.dag_ids
print(json.dumps({{"dags": bags, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["dags"] == {env: ["tweet-sentiment"] for env in ("local", "dev", "prod")}
    assert result["heavy"] == []


def test_airflow_does_not_load_the_package_as_plugins():
    """Airflow's plugin loader registers each file under its bare name (validate/operator.py as
    ``operator``, shadowing the standard library) unless plugins/.airflowignore excludes the package."""
    code = (
        "import sys\n"
        "from airflow._shared.plugins_manager.plugins_manager import _load_plugins_from_plugin_directory\n"
        f"plugins, errors = _load_plugins_from_plugin_directory({str(ROOT / 'plugins')!r})\n"
        f"ours = sorted(n for n, m in list(sys.modules.items()) if {str(ROOT / 'plugins')!r} in "
        "str(getattr(m, '__file__', None) or '') and not n.startswith('trainyard'))\n"
        "print(ours, errors)\n"
        "import operator; operator.attrgetter\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] {}"
