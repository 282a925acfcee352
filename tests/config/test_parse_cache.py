"""The parse cache saves YAML parsing between DAG-file parses and never changes what loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainyard.config.loading import load_environment, load_pipelines
from trainyard.config.parse_cache import ParseCache

DEMO = "tweet-sentiment.yaml"


def _load(pipelines: Path, environments: Path, cache_file: Path, env: str = "local"):
    cache = ParseCache(cache_file)
    good, errors = load_pipelines(load_environment(env, environments), pipelines, environments, cache=cache)
    return good, errors, cache


def _copies(pipelines: Path, count: int) -> list[str]:
    demo = (pipelines / DEMO).read_text()
    names = [f"copy-{i}" for i in range(count)]
    for name in names:
        (pipelines / f"{name}.yaml").write_text(demo.replace("name: tweet-sentiment", f"name: {name}"))
    return names


def test_a_warm_cache_skips_parsing_and_loads_the_same_pipelines(config_dirs, tmp_path):
    pipelines, environments = config_dirs
    _copies(pipelines, 3)
    cache_file = tmp_path / "cache.json"
    cold, _, first = _load(pipelines, environments, cache_file)
    assert (first.hits, first.misses) == (0, 4)
    warm, _, second = _load(pipelines, environments, cache_file)
    assert (second.hits, second.misses) == (4, 0)
    assert [p.config for p in warm] == [p.config for p in cold]
    uncached, _ = load_pipelines(load_environment("local", environments), pipelines, environments)
    assert [p.config for p in uncached] == [p.config for p in cold]


def test_an_edited_file_is_parsed_again_and_stale_entries_are_dropped(config_dirs, tmp_path):
    pipelines, environments = config_dirs
    cache_file = tmp_path / "cache.json"
    _load(pipelines, environments, cache_file)
    text = (pipelines / DEMO).read_text()
    (pipelines / DEMO).write_text(text.replace("  epochs: 1\n", "  epochs: 2\n", 1))
    good, _, cache = _load(pipelines, environments, cache_file)
    assert (cache.hits, cache.misses) == (0, 1)
    assert good[0].config.training.epochs == 2
    assert len(json.loads(cache_file.read_text())["entries"]) == 1, "only what the last parse used"


def test_validation_always_runs_so_an_environment_change_is_never_hidden(config_dirs, tmp_path):
    pipelines, environments = config_dirs
    cache_file = tmp_path / "cache.json"
    good, errors, _ = _load(pipelines, environments, cache_file, env="dev")
    assert [p.name for p in good] == ["tweet-sentiment"] and errors == []
    dev = (environments / "dev.yaml").read_text()
    assert "caps: {gpus: 2" in dev
    (environments / "dev.yaml").write_text(dev.replace("caps: {gpus: 2", "caps: {gpus: 0"))
    good, errors, cache = _load(pipelines, environments, cache_file, env="dev")
    assert cache.hits == 1
    assert good == [] and "GPUs exceed the cap of 0" in str(errors[0])


def test_values_json_cannot_hold_are_parsed_every_time(config_dirs, tmp_path):
    """A YAML date is not a string: caching it as one would let an invalid file load."""
    pipelines, environments = config_dirs
    text = (pipelines / DEMO).read_text()
    (pipelines / DEMO).write_text(text.replace("owner: nlp-team@example.com", "owner: 2024-01-01"))
    cache_file = tmp_path / "cache.json"
    for _ in range(2):
        good, errors, cache = _load(pipelines, environments, cache_file)
        assert good == [] and "owner" in str(errors[0]) and "valid string" in str(errors[0])
        assert cache.hits == 0


@pytest.mark.parametrize("content", [b"{not json", b'{"entries": []}', b"\xff\xfe"])
def test_a_corrupt_cache_file_is_ignored(config_dirs, tmp_path, content):
    pipelines, environments = config_dirs
    cache_file = tmp_path / "cache.json"
    cache_file.write_bytes(content)
    good, _, cache = _load(pipelines, environments, cache_file)
    assert [p.name for p in good] == ["tweet-sentiment"] and cache.misses == 1
    assert json.loads(cache_file.read_text())["entries"], "rewritten"


def test_an_unwritable_cache_only_costs_speed(config_dirs, tmp_path):
    pipelines, environments = config_dirs
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    good, _, _ = _load(pipelines, environments, blocker / "cache.json")
    assert [p.name for p in good] == ["tweet-sentiment"]
    assert blocker.read_text().startswith("a file where")
    assert not [p for p in tmp_path.rglob(".cache.json*")], "no stray temporary files"
