"""The DAG file in a real Airflow DagBag: one DAG per pipeline, in every environment."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest

from tests.conftest import DAGS, ROOT

HEAVY = ("torch", "transformers", "datasets", "mlflow", "pandas", "boto3", "pyarrow", "sklearn")


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

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
    assert prod.get_task("train").execution_timeout == timedelta(minutes=720)

    monkeypatch.setenv("TRAINYARD_ENV", "dev")
    dev = _dagbag().dags["tweet-sentiment"]
    assert dev.schedule is None, "dev turns schedules off: manual runs only"


def test_params_are_generated_from_the_overridable_fields(monkeypatch):
    monkeypatch.setenv("TRAINYARD_ENV", "prod")
    params = _dagbag().dags["tweet-sentiment"].params
    assert set(params.keys()) == {"epochs", "learning_rate", "batch_size", "max_steps"}
    assert params.get_param("epochs").value == 3, "default is the value in this environment"
    assert params.get_param("epochs").schema == {"type": "number", "exclusiveMinimum": 0, "maximum": 100}
    assert params.get_param("batch_size").schema["minimum"] == 1
    assert params.get_param("max_steps").schema["type"] == ["integer", "null"]
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        params.get_param("learning_rate").resolve(-1.0)


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
    (error,) = bag.import_errors.values()
    assert "local.yaml" in error and "launcher" in error


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
