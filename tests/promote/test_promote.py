"""promote() against a real MLflow (SQLite store + local artifacts in a temp dir): the verdict, the
alias, the audit it leaves, the refusals that register nothing, and retries that converge."""

from __future__ import annotations

import pytest

from tests.support.mlflow_store import FP, OTHER_FP, tiny_model
from trainyard.promote.promote import PromotionRefused


def test_first_model_becomes_champion(make_env):
    env = make_env(metric="eval_f1_macro", must_reach=0.7, min_improvement=0.002)
    run_id = env.log_run("manual__1", {"eval_f1_macro": 0.8, "eval_accuracy": 0.81, "eval_loss": 0.4})

    d = env.promote("manual__1", triggered_by="alice")

    assert d.promoted and d.version == "1" and d.run_id == run_id
    assert d.champion_version is None and d.champion_value is None
    assert d.model_name == "nlp." + env.pipeline.name and d.alias == "champion"
    assert env.champion() == "1"
    tags = env.tags("1")
    assert tags["trainyard.decision"] == "promoted"
    assert tags["trainyard.champion_version"] == "none"
    assert tags["trainyard.candidate_value"] == "0.8"
    assert tags["trainyard.dataset_fingerprint"] == FP
    assert tags["airflow.dag_id"] == env.pipeline.name and tags["airflow.run_id"] == "manual__1"
    assert tags["trainyard.decided_at"] == "2026-01-02T03:04:05+00:00"
    assert tags["trainyard.decided_by"] == f"airflow:{env.pipeline.name}/manual__1 triggered by alice"
    assert tags["trainyard.reason"] == d.reason
    version = env.client.get_model_version(env.model_name, "1")
    assert version.run_id == run_id
    assert version.description.startswith("Promoted to 'champion': no champion yet")
    assert d.to_dict()["promoted"] is True


def test_worse_model_leaves_alias_and_records_why(make_env):
    env = make_env(min_improvement=0.002)
    env.log_run("r1", {"eval_f1_macro": 0.85})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.84})

    d = env.promote("r2")

    assert not d.promoted and d.version == "2"
    assert d.champion_version == "1" and d.champion_value == pytest.approx(0.85)
    assert env.champion() == "1"
    tags = env.tags("2")
    assert tags["trainyard.decision"] == "rejected"
    assert (
        tags["trainyard.reason"] == "eval_f1_macro 0.84 is worse than champion v1 (0.85); "
        "higher is better and a tie keeps the champion, both scored on this run's validation data"
    )
    assert tags["trainyard.champion_version"] == "1" and tags["trainyard.champion_value"] == "0.85"
    assert env.client.get_model_version(env.model_name, "2").description.startswith("Not promoted")
    assert "trainyard.superseded_by" not in env.tags("1")


def test_better_model_moves_alias_and_supersedes(make_env):
    env = make_env(min_improvement=0.002)
    env.log_run("r1", {"eval_f1_macro": 0.850})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.861})

    d = env.promote("r2")

    assert d.promoted and d.version == "2"
    assert d.reason == (
        "eval_f1_macro 0.861 beats champion v1 (0.85) by 0.011 >= required 0.002, "
        "both scored on this run's validation data"
    )
    assert env.champion() == "2"
    assert env.tags("1")["trainyard.superseded_by"] == "2"
    assert env.tags("1")["trainyard.superseded_at"] == "2026-01-02T03:04:05+00:00"
    assert env.tags("2")["trainyard.decision"] == "promoted"


def test_the_champion_rescored_on_the_new_data_decides_not_its_recorded_metric(make_env):
    """The champion looked better on its own (easier) validation set than it does on the new one."""
    env = make_env(min_improvement=0.0)
    env.log_run("r1", {"eval_f1_macro": 0.90})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.82}, fingerprint=OTHER_FP, champion_scores={"eval_f1_macro": 0.78})

    d = env.promote("r2", approved_fingerprint=OTHER_FP)

    assert d.promoted, d.reason  # 0.82 < 0.90 recorded, but 0.82 > 0.78 on the same data
    assert d.champion_value == pytest.approx(0.78) and d.champion_recorded_value == pytest.approx(0.90)
    assert d.champion_value_source == "rescored" and d.compared_on == OTHER_FP
    assert "both scored on this run's validation data" in d.reason
    tags = env.tags("2")
    assert tags["trainyard.champion_value"] == "0.78" and tags["trainyard.champion_recorded_value"] == "0.9"
    assert tags["trainyard.compared_on_fingerprint"] == OTHER_FP
    assert tags["trainyard.champion_value_source"] == "rescored"
    assert tags["trainyard.champion_dataset_fingerprint"] == FP
    assert env.champion() == "2"

    again = env.promote("r2", approved_fingerprint=OTHER_FP)  # a retry after the alias moved keeps the audit

    assert again.champion_value_source == "rescored" and again.champion_recorded_value == pytest.approx(0.90)


def test_a_candidate_that_beats_only_the_recorded_metric_is_rejected(make_env):
    env = make_env(min_improvement=0.0)
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.85}, fingerprint=OTHER_FP, champion_scores={"eval_f1_macro": 0.88})

    d = env.promote("r2", approved_fingerprint=OTHER_FP)

    assert not d.promoted and "is worse than champion v1 (0.88)" in d.reason
    assert env.champion() == "1"


def test_an_unscorable_champion_rejects_by_default_and_says_why(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.70})
    env.promote("r1")
    why = "champion v1 predicts labels [a, b, c], this run's labels are [negative, positive]"
    env.log_run("r2", {"eval_f1_macro": 0.95}, champion_scores=None, unscorable=why)

    d = env.promote("r2")

    assert not d.promoted and env.champion() == "1"
    assert why in d.reason and "if_champion_unscorable is 'reject'" in d.reason
    assert env.tags("2")["trainyard.champion_unscorable"] == why
    assert env.tags("2")["trainyard.champion_value_source"] == "none"


def test_an_unscorable_champion_is_compared_as_recorded_when_the_pipeline_says_so(make_env):
    env = make_env(if_champion_unscorable="compare_recorded")
    env.log_run("r1", {"eval_f1_macro": 0.70})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.75}, champion_scores=None, unscorable="its model artifact is gone")

    d = env.promote("r2")

    assert d.promoted and d.champion_value_source == "recorded" and d.champion_value == pytest.approx(0.70)
    assert "compared with the champion's recorded eval_f1_macro" in d.reason
    assert "its model artifact is gone" in d.reason


def test_a_score_of_another_version_than_the_alias_holder_is_not_used(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.70})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.80})
    env.promote("r2")  # v2 takes the alias after r3 was launched against v1
    run_id = env.log_run("r3", {"eval_f1_macro": 0.85}, champion_scores=None)
    env.client.set_tag(run_id, "trainyard.champion.version", "1")
    env.client.log_metric(run_id, "champion_eval_f1_macro", 0.70)

    d = env.promote("r3")

    assert not d.promoted
    assert "the trainer scored v1, but v2 has held the alias since the run was launched" in d.reason


def test_below_must_reach_rejected(make_env):
    env = make_env(must_reach=0.7)
    env.log_run("r1", {"eval_f1_macro": 0.65})

    d = env.promote("r1")

    assert not d.promoted and d.version == "1"
    assert "below the required minimum 0.7" in d.reason
    assert env.champion() is None
    assert env.tags("1")["trainyard.decision"] == "rejected"


def test_improvement_below_margin_rejected(make_env):
    env = make_env(min_improvement=0.01)
    env.log_run("r1", {"eval_f1_macro": 0.850})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.855})

    d = env.promote("r2")

    assert not d.promoted
    assert "by only 0.005 < required 0.01" in d.reason
    assert env.champion() == "1"


def test_eval_loss_lower_is_better(make_env):
    env = make_env(metric="eval_loss", must_reach=0.5)
    env.log_run("r1", {"eval_loss": 0.40})
    assert env.promote("r1").promoted
    env.log_run("r2", {"eval_loss": 0.45})
    assert not env.promote("r2").promoted
    env.log_run("r3", {"eval_loss": 0.30})

    d = env.promote("r3")

    assert d.promoted and d.champion_version == "1"
    assert env.champion() == "3"
    assert env.tags("1")["trainyard.superseded_by"] == "3"


def test_mismatched_fingerprint_refused_and_nothing_registered(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.9}, fingerprint=OTHER_FP)

    with pytest.raises(PromotionRefused) as err:
        env.promote("r1")

    assert OTHER_FP in str(err.value) and FP in str(err.value)
    assert env.versions() == []


def test_missing_fingerprint_refused(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.9}, fingerprint=None)
    with pytest.raises(PromotionRefused, match=r"no trainyard\.dataset_fingerprint tag"):
        env.promote("r1")
    assert env.versions() == []


def test_missing_metric_refused(make_env):
    env = make_env(metric="eval_f1_macro")
    env.log_run("r1", {"eval_accuracy": 0.9, "eval_loss": 0.3})

    with pytest.raises(PromotionRefused) as err:
        env.promote("r1")

    assert "no metric 'eval_f1_macro'" in str(err.value)
    assert "eval_accuracy, eval_loss" in str(err.value)
    assert env.versions() == []


def test_retried_promote_is_idempotent(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.90})

    first = env.promote("r2")
    again = env.promote("r2")  # the task is retried after it had already moved the alias

    assert first.promoted and again.promoted
    assert first.version == again.version == "2"
    assert again.champion_version == "1" and again.reason == first.reason
    assert [str(v.version) for v in env.versions()] == ["1", "2"]
    assert env.champion() == "2"
    assert env.tags("2")["trainyard.decision"] == "promoted"


def test_retried_rejection_registers_once(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.70})
    assert not env.promote("r2").promoted
    assert not env.promote("r2").promoted
    assert [str(v.version) for v in env.versions()] == ["1", "2"]
    assert env.champion() == "1"


def test_retry_finishes_superseded_tag_after_crash(make_env):
    env = make_env()
    env.log_run("r1", {"eval_f1_macro": 0.80})
    env.promote("r1")
    env.log_run("r2", {"eval_f1_macro": 0.90})
    env.promote("r2")
    env.client.delete_model_version_tag(env.model_name, "1", "trainyard.superseded_by")  # crash before step 4

    env.promote("r2")

    assert env.tags("1")["trainyard.superseded_by"] == "2"


def test_champion_without_metric_replaced_only_past_must_reach(make_env):
    env = make_env(metric="eval_f1_macro", must_reach=0.7, if_champion_unscorable="compare_recorded")
    env.log_run("r1", {"eval_f1_macro": 0.9})
    env.promote("r1")
    # Simulate a champion whose run lacks the metric (e.g. registered by hand from another run).
    import mlflow

    with mlflow.start_run(experiment_id=env.experiment_id) as bare:
        info = mlflow.pyfunc.log_model(name="model", python_model=tiny_model(), pip_requirements=["mlflow"])
    manual = env.client.create_model_version(env.model_name, info.model_uri, run_id=bare.info.run_id)
    env.client.set_registered_model_alias(env.model_name, "champion", manual.version)

    env.log_run("low", {"eval_f1_macro": 0.6})
    low = env.promote("low")
    env.log_run("ok", {"eval_f1_macro": 0.75})
    ok = env.promote("ok")

    assert not low.promoted and "below the required minimum" in low.reason
    assert ok.promoted and f"champion v{manual.version} has no eval_f1_macro" in ok.reason
    assert env.champion() == ok.version


def test_the_run_s_cost_is_on_the_version_s_audit(make_env):
    env = make_env()
    run_id = env.log_run(
        "r1",
        {
            "eval_f1_macro": 0.8,
            "trainyard.gpu_seconds.queued": 1800.0,
            "trainyard.gpu_seconds.running": 7200.0,
            "trainyard.gpu_seconds.lost": 360.0,
            "trainyard.cost": 5.0,
        },
    )
    for key, value in {
        "trainyard.gpu_type": "a100",
        "trainyard.gpus": "2",
        "trainyard.currency": "EUR",
    }.items():
        env.client.set_tag(run_id, key, value)

    env.promote("r1")

    tags = env.tags("1")
    assert tags["trainyard.gpu_hours.running"] == "2.0000" and tags["trainyard.gpu_hours.queued"] == "0.5000"
    assert tags["trainyard.gpu_hours.lost"] == "0.1000" and tags["trainyard.cost"] == "5.00"
    assert tags["trainyard.currency"] == "EUR" and tags["trainyard.gpu_type"] == "a100"
