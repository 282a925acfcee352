"""Plain HuggingFace ``Trainer`` runs the trainer benchmark compares ``python -m trainer`` with.

* ``hf_default``: what ``run_glue.py`` does with its defaults: every example padded to
  ``max_seq_length`` at tokenization (``pad_to_max_length=True``) and ``default_data_collator``,
  ``TrainingArguments``' defaults for everything else (the device's default precision, fp32; the
  library's default optimizer; no data-loader workers), at the batch size its README uses, 32.
* ``hf_tuned``: what a careful user writes with the same library: dynamic padding
  (``DataCollatorWithPadding``, to multiples of 8 on GPU), length-grouped batches (with a length
  column, so the sampler does not measure every row), bf16 and TF32 on a GPU that has them, the fused
  AdamW, two data-loader workers with pinned memory on GPU, at the batch size ours trains with.

Both share with ours the model, data, learning rate, seed and number of optimizer steps; none
checkpoints (saves would be excluded from the timing anyway, see ``step_timer``). Evaluation is not
timed; its batch is 64 (run_glue's 8 would only make the benchmark slower). One run per process:

    python benchmarks/hf_baseline.py --config '{"kind": "hf_tuned", ...}'

It writes ``{"timing": ..., "train_metrics": ..., "eval": ...}`` to the config's ``out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_timer

KINDS = ("hf_default", "hf_tuned")
EVAL_BATCH = 64


def macro_f1(eval_pred) -> dict[str, float]:
    """Accuracy and macro F1 over every class, computed as ``python -m trainer`` reports them."""
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    f1 = []
    for cls in range(logits.shape[-1]):
        tp = np.sum((predictions == cls) & (labels == cls))
        wrong = np.sum((predictions == cls) != (labels == cls))
        f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return {"accuracy": float(np.mean(predictions == labels)), "f1_macro": float(np.mean(f1))}


def length_grouping() -> dict[str, Any]:
    """``TrainingArguments`` keywords for length-grouped batches (transformers renamed the option)."""
    from transformers import TrainingArguments

    if "group_by_length" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"group_by_length": True}
    return {"train_sampling_strategy": "group_by_length"}


def training_arguments(kind: str, config: dict[str, Any], output_dir: str, cuda: bool, bf16: bool):
    from transformers import TrainingArguments

    common = {
        "output_dir": output_dir,
        "max_steps": config["max_steps"],
        "per_device_train_batch_size": config["batch_size"],
        "per_device_eval_batch_size": EVAL_BATCH,
        "learning_rate": config["learning_rate"],
        "seed": config["seed"],
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": max(1, config["max_steps"] // 10),
    }
    if kind == "hf_default":
        return TrainingArguments(**common)
    return TrainingArguments(
        **common,
        **length_grouping(),
        length_column_name="length",
        bf16=cuda and bf16,
        tf32=True if cuda and bf16 else None,  # TF32 exists on the GPUs that have native bf16
        optim="adamw_torch_fused",
        dataloader_num_workers=2 if cuda else 0,
        dataloader_pin_memory=cuda,
        dataloader_persistent_workers=cuda,
    )


def run(config: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        default_data_collator,
    )

    kind = config["kind"]
    if kind not in KINDS:
        raise ValueError(f"config kind {kind!r}: expected one of {', '.join(KINDS)}")
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    out = Path(config["out"])
    step_timer.install(config["warmup_steps"], out.with_suffix(".timing.json"))

    labels = list(config["label_names"])
    raw = datasets.load_dataset(
        "csv", data_files={"train": config["train"], "validation": config["validation"]}
    )
    raw = raw.map(
        lambda b: {"labels": [labels.index(v) for v in b["label"]]}, batched=True, remove_columns=["label"]
    )
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    max_length = config["max_length"]

    def encode(batch):
        if kind == "hf_default":  # run_glue: padding = "max_length" if pad_to_max_length
            return tokenizer(batch["text"], padding="max_length", max_length=max_length, truncation=True)
        encoded = tokenizer(batch["text"], max_length=max_length, truncation=True)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    encoded = raw.map(encode, batched=True, remove_columns=["text"])
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    transformers.set_seed(config["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        config["model"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    with tempfile.TemporaryDirectory(prefix=f"{kind}-") as output_dir:
        args = training_arguments(kind, config, output_dir, cuda, bf16)
        collator = (
            default_data_collator
            if kind == "hf_default"
            else DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None)
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=encoded["train"],
            eval_dataset=encoded["validation"].remove_columns(["length"] if kind == "hf_tuned" else []),
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=macro_f1,
        )
        outcome = trainer.train()
        evaluation = trainer.evaluate()
    report = {
        "kind": kind,
        "precision": "bf16" if args.bf16 else "fp32",
        "timing": json.loads(out.with_suffix(".timing.json").read_text()),
        "train_metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))},
        "eval": {k: v for k, v in evaluation.items() if k in ("eval_f1_macro", "eval_accuracy", "eval_loss")},
    }
    out.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run as JSON (see bench_trainer.py)")
    run(json.loads(parser.parse_args(argv).config))


if __name__ == "__main__":
    main()
