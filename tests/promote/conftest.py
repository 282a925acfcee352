"""Fixtures of the promote tests: a real MLflow store per test module, a fresh pipeline per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.mlflow_store import Env, open_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from open_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture
def make_env(store: dict[str, Any]) -> Callable[..., Env]:
    def factory(**promotion: Any) -> Env:
        return Env(store, promotion)

    return factory
