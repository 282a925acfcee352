"""Training throughput of ``python -m trainer`` itself, against a GPU anchor.

The anchor (plain HF ``Trainer``, BERT-base-sized classifier, seq 128, synthetic tokens, one H200):
fp32 batch 32: 483 samples/s, bf16 batch 32: 804, bf16 batch 128: 2,679.

This runs the real trainer (data loading, dynamic padding, checkpoints, MLflow on a SQLite file) on
synthetic texts long enough to be truncated to 128 tokens, with a randomly initialised BERT-base-sized
model (``--size base``) or the tiny test BERT (``--size tiny``, for a CPU smoke run), and prints one
JSON line with the trainer's own ``train_samples_per_second``.

    python benchmarks/bench_trainer.py --size base --batch-size 128 --precision auto --max-steps 200
    python benchmarks/bench_trainer.py --size tiny --max-steps 20          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHOR_SAMPLES_PER_S = {("fp32", 32): 483, ("bf16", 32): 804, ("bf16", 128): 2679}


def build_model(directory: Path, size: str) -> Path:
    from tests.support.tiny_model import build_tiny_model

    tiny = build_tiny_model(directory / "tiny")
    if size == "tiny":
        return tiny
    from transformers import AutoTokenizer, BertConfig, BertModel

    base = directory / "base"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = BertConfig(vocab_size=30522)  # BERT-base: hidden 768, 12 layers, 12 heads, 3072 intermediate
    BertModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["base", "tiny"], default="base")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args()

    from tests.support.synthetic_data import sentiment_rows, write_csv
    from trainer.storage import dataset_fingerprint

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    model = build_model(work, args.size)
    rows = [
        {"text": " ".join([r["text"]] * 12), "label": r["label"]} for r in sentiment_rows(args.rows, seed=7)
    ]
    train = write_csv(work / "train.csv", rows)
    validation = write_csv(work / "validation.csv", rows[:256])
    spec = {
        "identity": {"pipeline": "bench", "environment": "bench", "dag_id": "bench", "run_id": "bench"},
        "data": {
            "train_uri": str(train),
            "validation_uri": str(validation),
            "format": "csv",
            "text_column": "text",
            "label_column": "label",
            "label_names": ["negative", "positive"],
        },
        "dataset_fingerprint": dataset_fingerprint(str(train), str(validation)),
        "model": {"base": str(model), "max_length": 128},
        "hyperparameters": {
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "checkpoint_every_steps": 1_000_000,
        },
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment_name": "bench"},
        "checkpoint_dir": str(work / "checkpoints"),
    }
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--spec", json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.splitlines()[-1])["trainyard_result"]
    report = {
        "size": args.size,
        "batch_size": args.batch_size,
        "precision_requested": args.precision,
        "max_steps": args.max_steps,
        "precision": result["precision"],
        **result["train"],
        "anchor_samples_per_second": ANCHOR_SAMPLES_PER_S.get((result["precision"], args.batch_size)),
    }
    print(json.dumps(report))
    out = ROOT / "benchmarks" / ".out"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "bench_trainer.jsonl").open("a") as handle:
        handle.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
