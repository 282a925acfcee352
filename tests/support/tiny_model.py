"""A tiny BERT built offline (no downloads) that fine-tunes on the synthetic sentiment data in seconds."""

from __future__ import annotations

from pathlib import Path

from tests.support.synthetic_data import FILLER, NEGATIVE, POSITIVE, sentiment_rows

#: Extra everyday words so texts outside the synthetic vocabulary still tokenize into real pieces.
EXTRA_WORDS = (  # noqa: SIM905 - a word list reads better as one string
    "a an and are as at be but by for from has have i in is it its me my not of on or so that the "
    "they this to was we were what when with you your very really just like much more most some "
    "neutral positive negative okay fine meh quite rather film show album book song place hotel"
).split()


def _training_texts() -> list[str]:
    rows = sentiment_rows(2000, seed=123, prefix="t") + sentiment_rows(500, seed=456, prefix="v")
    return [row["text"] for row in rows] + [" ".join(POSITIVE + NEGATIVE + FILLER + EXTRA_WORDS)] * 10


def build_tiny_model(directory: Path, max_position_embeddings: int = 128) -> Path:
    """Write a tiny BERT (model + ``BertTokenizerFast``) to ``directory`` and return it.

    Reuses what is already there, so a session-scoped fixture builds it once. A small
    ``max_position_embeddings`` below the tokenizer's ``model_max_length`` (128) reproduces a model
    whose position limit, not its tokenizer, bounds the input: the long-document failure class.
    ``AutoTokenizer`` / ``AutoModelForSequenceClassification.from_pretrained(directory)`` load it; the
    classification head is initialised at load time, as with a real base checkpoint.
    """
    directory = Path(directory)
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        return directory

    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(_training_texts(), vocab_size=400, min_frequency=1, show_progress=False)
    wordpiece.save_model(str(directory))  # vocab.txt
    # transformers 5: the vocabulary is passed as ``vocab`` (a path or a dict), not ``vocab_file``.
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = 128

    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
