"""The trainer tests' fixtures: tiny BERT models built on the spot, synthetic splits, moto's S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.s3 import CREDENTIALS, MotoS3
from tests.support.synthetic_data import write_long_splits, write_splits
from tests.support.tiny_model import build_tiny_model
from tests.support.trainer_runs import SHORT_POSITIONS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_splits(tmp_path_factory.mktemp("data"), train_rows=400, validation_rows=100)


@pytest.fixture
def s3(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with MotoS3("trainyard") as server:
        yield server


# -- long documents: a position limit far below the texts -------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert-64"), max_position_embeddings=SHORT_POSITIONS)


@pytest.fixture(scope="session")
def long_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_long_splits(tmp_path_factory.mktemp("long-data"), train_rows=160, validation_rows=40)
