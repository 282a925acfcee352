"""Each pipeline's DAG names its team's Airflow role, and only that role, in ``access_control``.

The DAGs come from the real DAG files in a real DagBag; what FAB makes of the mapping (permissions in
the metadata DB, 403s in the REST API) is shown by tests/system/test_team_access.py.
"""

from __future__ import annotations

import warnings

import pytest
import yaml
from airflow.dag_processing.dagbag import DagBag

from tests.support.paths import DAGS

NLP = {"trainyard-nlp": {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}}}


def _dag(monkeypatch: pytest.MonkeyPatch, env: str, folder: str = str(DAGS)):
    monkeypatch.setenv("TRAINYARD_ENV", env)
    bag = DagBag(folder)
    assert bag.import_errors == {}
    return bag.dags["tweet-sentiment"]


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_the_teams_role_may_read_edit_and_trigger_its_dag(env, monkeypatch):
    assert _dag(monkeypatch, env).access_control == NLP


def test_without_teams_the_dag_sets_no_access_control(monkeypatch):
    """The local environment declares no teams: FAB keeps whatever an admin granted by hand."""
    assert _dag(monkeypatch, "local").access_control is None


def test_a_teams_airflow_role_can_be_named(config_dirs, monkeypatch):
    _, environments = config_dirs
    dev = yaml.safe_load((environments / "dev.yaml").read_text())
    dev["teams"]["nlp"]["airflow_role"] = "NLP Engineers"
    dev["teams"]["cv"] = {
        "storage": {"data": ["s3://trainyard-dev-datasets/cv/"], "models": ["s3://trainyard-dev-models/cv/"]}
    }
    (environments / "dev.yaml").write_text(yaml.safe_dump(dev))
    access = _dag(monkeypatch, "dev").access_control
    assert access == {"NLP Engineers": NLP["trainyard-nlp"]}, "no other team's role, not even cv's"


def test_access_control_survives_serialization_as_the_dag_processor_syncs_it(monkeypatch):
    """The dag-processor hands FAB the access_control of the serialized DAG, not of the parsed one."""
    from airflow.serialization.serialized_objects import DagSerialization, LazyDeserializedDAG

    dag = _dag(monkeypatch, "prod")
    data = DagSerialization.to_dict(dag)
    assert LazyDeserializedDAG(data=data).access_control == NLP
    assert DagSerialization.from_dict(data).access_control == NLP


def test_access_control_leaves_no_warning_on_the_dag_files(monkeypatch):
    """The DAG processor shows every warning raised while a file is parsed; Airflow's own filters
    show DeprecationWarnings from airflow modules, so parse with every warning recorded."""
    monkeypatch.setenv("TRAINYARD_ENV", "dev")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bag = DagBag(str(DAGS))
    assert bag.dags["tweet-sentiment"].access_control == NLP
    assert not [w for w in caught if "permissions" in str(w.message)]
    assert not any("permissions" in w for ws in bag.captured_warnings.values() for w in ws)
