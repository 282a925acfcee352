"""Small, learnable sentiment datasets written by the tests themselves (no downloads)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

POSITIVE = ["love", "great", "happy", "wonderful", "excellent", "amazing", "good", "fantastic", "enjoy"]
NEGATIVE = ["hate", "awful", "sad", "terrible", "horrible", "bad", "worst", "angry", "boring"]
FILLER = ["the", "movie", "today", "weather", "team", "food", "service", "game", "phone", "day", "this"]


def sentiment_rows(n_rows: int, seed: int, prefix: str = "") -> list[dict[str, str]]:
    """Unique texts whose label is decided by its sentiment words: a tiny model learns it fast."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        label = "positive" if i % 2 == 0 else "negative"
        words = POSITIVE if label == "positive" else NEGATIVE
        text = " ".join(
            [*rng.sample(FILLER, 3), rng.choice(words), rng.choice(words), rng.choice(FILLER), f"{prefix}{i}"]
        )
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_splits(
    directory: Path, train_rows: int = 400, validation_rows: int = 100, fmt: str = "csv"
) -> tuple[Path, Path]:
    """train/validation files with disjoint texts (no leakage)."""
    writer = write_csv if fmt == "csv" else write_parquet
    train = writer(directory / f"train.{fmt}", sentiment_rows(train_rows, seed=1, prefix="t"))
    validation = writer(directory / f"validation.{fmt}", sentiment_rows(validation_rows, seed=2, prefix="v"))
    return train, validation


def long_document_rows(n_rows: int, seed: int, words: int = 1000, prefix: str = "") -> list[dict[str, str]]:
    """Like ``sentiment_rows``, each text continued with ``words`` neutral words in sentences: far
    beyond 512 tokens, while the sentiment sits in the first tokens, where truncation keeps it."""
    rng = random.Random(seed)
    rows = sentiment_rows(n_rows, seed, prefix)
    for row in rows:
        filler = [rng.choice(FILLER) for _ in range(words)]
        sentences = [" ".join(filler[i : i + 12]) + "." for i in range(0, words, 12)]
        row["text"] = f"{row['text']}. {' '.join(sentences)}"
    return rows


def write_long_splits(
    directory: Path, train_rows: int = 160, validation_rows: int = 40, words: int = 1000
) -> tuple[Path, Path]:
    """train/validation CSVs of long documents (see ``long_document_rows``)."""
    train = long_document_rows(train_rows, seed=1, words=words, prefix="t")
    validation = long_document_rows(validation_rows, seed=2, words=words, prefix="v")
    return write_csv(directory / "train.csv", train), write_csv(directory / "validation.csv", validation)


def unpunctuated_text(words: int = 2000) -> str:
    """A long text with no punctuation at all, e.g. a lowercased transcript: the input that made the
    mlflow transformers flavor's text-classification pyfunc raise MemoryError (ast.literal_eval)."""
    cycle = [*POSITIVE, *FILLER]
    return " ".join(cycle[i % len(cycle)] for i in range(words))
