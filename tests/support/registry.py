"""The MLflow model registry as tests read it: by the registered model's aliases, not through the
code under test, and without mistaking a failing registry call for "no champion"."""

from __future__ import annotations

from typing import Any


def alias_holder(client: Any, model_name: str, alias: str = "champion") -> str | None:
    """The version ``alias`` points to; None when the model has no such alias or does not exist yet."""
    models = client.search_registered_models(filter_string=f"name = '{model_name}'")
    if not models:
        return None
    (model,) = models
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def assert_verdict_follows_the_numbers(
    client: Any, model_name: str, version: Any, metric: str, champion_before: str | None
) -> None:
    """For a rule ``metric`` (higher is better), ``min_improvement: 0``, no ``must_reach``: the
    candidate must be promoted exactly when there was no champion or it beats the champion's value
    strictly (a tie keeps the champion), and the alias must then point where the decision says.

    ``champion_before`` is the alias holder read before the run; ``version`` the candidate's version.
    """
    tags = version.tags
    candidate = client.get_run(version.run_id).data.metrics[metric]
    assert float(tags["trainyard.candidate_value"]) == candidate
    assert tags["trainyard.champion_version"] == (champion_before or "none")
    if champion_before is None:
        expected = "promoted"
    else:
        champion_run = client.get_model_version(model_name, champion_before).run_id
        champion_value = client.get_run(champion_run).data.metrics[metric]
        assert float(tags["trainyard.champion_value"]) == champion_value
        expected = "promoted" if candidate > champion_value else "rejected"
    assert tags["trainyard.decision"] == expected, tags["trainyard.reason"]
    holder = version.version if expected == "promoted" else champion_before
    assert alias_holder(client, model_name) == str(holder)
