"""The trainer benchmark's step timer, on a real (tiny) HF Trainer: it times the steps after the
warmup, counts exactly the examples and real tokens of their batches, and leaves checkpoint saves
out of the time."""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.paths import ROOT
from tests.support.tiny_model import build_tiny_model

sys.path.insert(0, str(ROOT / "benchmarks"))

import step_timer


@pytest.fixture
def trainer_parts(tmp_path):
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = build_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [" ".join(["good"] * (1 + i % 9) + ["film"] * (i % 4)) for i in range(40)]
    encoded = tokenizer(texts, truncation=True, max_length=32)
    dataset = datasets.Dataset.from_dict({**encoded, "labels": [i % 2 for i in range(40)]})
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return model, tokenizer, dataset


def test_times_the_steps_after_warmup_and_counts_their_real_tokens(tmp_path, trainer_parts):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model, tokenizer, dataset = trainer_parts
    padding = DataCollatorWithPadding(tokenizer)
    batches = []

    def recording_collator(features):  # what the Trainer trains on, seen independently of the timer
        batch = padding(features)
        batches.append(batch)
        return batch

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=4,  # a save inside the timed window (steps 3..6)
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=recording_collator)
    out = tmp_path / "timing.json"
    step_timer.attach(trainer, warmup_steps=2, out=out)
    trainer.train()

    report = json.loads(out.read_text())
    timed = batches[2:6]  # steps 3, 4, 5 and 6
    assert report["timed_steps"] == 4
    assert report["samples"] == 16
    assert report["positions"] == sum(b["input_ids"].numel() for b in timed)
    assert report["real_tokens"] == sum(int(b["attention_mask"].sum()) for b in timed)
    assert report["padding_fraction"] == pytest.approx(1 - report["real_tokens"] / report["positions"])
    assert 0 < report["padding_fraction"] < 1  # ragged texts, padded per batch
    assert report["save_seconds_excluded"] > 0
    assert report["samples_per_s"] == pytest.approx(16 / report["seconds"])


def test_a_padding_free_batch_counts_every_example_and_no_padding(trainer_parts):
    from transformers import DataCollatorWithFlattening

    _, _, dataset = trainer_parts
    features = [{"input_ids": row["input_ids"]} for row in dataset.select(range(5))]
    batch = DataCollatorWithFlattening()(features)
    examples, real, positions = step_timer.batch_counts(batch)
    assert int(examples) == 5
    assert real == positions == sum(len(f["input_ids"]) for f in features)
