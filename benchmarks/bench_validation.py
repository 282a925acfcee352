"""Benchmark ``trainyard.validate.dataset.validate_dataset`` against a plain pandas implementation.

    .venv/bin/python benchmarks/bench_validation.py                  # 500k and 2M rows
    .venv/bin/python benchmarks/bench_validation.py --rows 100000 1000000 4000000 --repeat 3

For each size it writes a tweet-like train CSV (with a few nulls, blank texts, duplicates and unknown
labels) and a validation CSV one tenth the size that shares some texts with train, into
benchmarks/.out/ (gitignored). Each measurement runs in a fresh interpreter, which reports its wall
time and its peak resident memory: ``VmHWM`` from /proc/self/status (``ru_maxrss`` elsewhere). Not
``ru_maxrss`` on Linux: ``RUSAGE_SELF`` keeps the pre-``exec`` high-water mark of the forked parent, and
``RUSAGE_CHILDREN`` is the largest child so far, not this one. Reported: the fastest of ``--repeat``
runs and the median peak RSS.

Both implementations compute the same statistics (rows, nulls, blank texts, label counts, unknown
labels, duplicates, train/validation overlap); the benchmark checks that they agree. The pandas
version is timed with and without the dataset fingerprint (``trainer.storage.dataset_fingerprint``,
which the ``validate_data`` task must also produce; ``validate_dataset`` computes it in its one pass).
The speedup target (>= 3x) is judged against the faster of the two, i.e. pandas without fingerprint.
The pandas code uses the fastest form found for each step (e.g. ``isin`` on object dtype: on pandas
3.1's default Arrow-backed string dtype it took 12 s for the 2M-row overlap alone).

Prints a table and whether the targets are met; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / ".out"
LABELS = ("negative", "positive", "neutral")
_WORD_LIST = """
the movie today weather team food service game phone day this love great happy wonderful excellent amazing
good fantastic enjoy hate awful sad terrible horrible bad worst angry boring really very not so much such
lol omg tbh
"""
WORDS = tuple(_WORD_LIST.split())


# -- data -------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: int, seed: int, id_offset: int, shared_from: int = 0) -> None:
    """Vectorised CSV writer: unique texts, plus ~0.5% duplicates, 0.1% blank, 0.1% null, 0.05% bad labels.

    ``shared_from`` > 0 makes 2% of the rows reuse texts of the file written with id_offset 0
    (train/validation overlap).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(seed)
    vocab = pa.array(WORDS)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.string())])
    chunk = 500_000
    with pcsv.CSVWriter(str(path), schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = np.arange(start, start + n) + id_offset
            text_ids = ids.copy()
            dup = rng.random(n) < 0.005
            text_ids[dup] = np.maximum(text_ids[dup] - rng.integers(1, 1000, dup.sum()), id_offset)
            if shared_from:
                shared = rng.random(n) < 0.02
                text_ids[shared] = rng.integers(0, shared_from, shared.sum())
            # words are a function of the text id, so a repeated id repeats the whole text
            words = []
            for k in range(8):
                word_rng = (text_ids * 2654435761 + k * 40503) % 1_000_003 % len(WORDS)
                words.append(
                    pa.DictionaryArray.from_arrays(pa.array(word_rng.astype(np.int32)), vocab).cast(
                        pa.string()
                    )
                )
            text = pc.binary_join_element_wise(*words, pa.array(text_ids).cast(pa.string()), " ")
            blank = rng.random(n) < 0.001
            text = pc.if_else(pa.array(blank), pa.scalar("   "), text)
            null_text = pa.array(rng.random(n) < 0.001)
            text = pc.if_else(null_text, pa.scalar(None, pa.string()), text)
            label_idx = rng.integers(0, len(LABELS), n).astype(np.int32)
            labels = pa.DictionaryArray.from_arrays(pa.array(label_idx), pa.array(list(LABELS))).cast(
                pa.string()
            )
            bad = pa.array(rng.random(n) < 0.0005)
            labels = pc.if_else(bad, pa.scalar("postive"), labels)
            writer.write(pa.record_batch([pa.array(ids), text, labels], schema=schema))
    # (pyarrow writes a null as an unquoted empty field and every string quoted: both sides read it alike)


def dataset(rows: int) -> tuple[Path, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    train, validation = OUT / f"train_{rows}.csv", OUT / f"validation_{rows}.csv"
    if not train.exists() or not validation.exists():
        write_csv(train, rows, seed=1, id_offset=0)
        write_csv(validation, max(rows // 10, 1000), seed=2, id_offset=10 * rows, shared_from=rows)
    return train, validation


# -- the two implementations (run in a child process) -------------------------------------------------


def run_arrow(train: str, validation: str) -> dict:
    from trainer.spec import DataSpec
    from trainyard.config.pipeline_schema import DataChecks
    from trainyard.validate.dataset import validate_dataset

    spec = DataSpec(
        train_uri=train,
        validation_uri=validation,
        format="csv",
        text_column="text",
        label_column="label",
        label_names=LABELS,
    )
    started = time.perf_counter()
    report = validate_dataset(spec, DataChecks())
    seconds = time.perf_counter() - started
    stats = {}
    for split in ("train", "validation"):
        s = report.split(split)
        stats[split] = {
            "rows": s.rows,
            "null_rows": s.null_rows,
            "empty_text_rows": s.empty_text_rows,
            "duplicate_rows": s.duplicate_rows,
            "unknown_label_rows": s.unknown_label_rows,
            "label_counts": s.label_counts,
        }
    stats["overlap_rows"] = report.overlap_rows
    return {"seconds": seconds, "stats": stats}


def pandas_split(path: str) -> tuple[dict, object]:
    import pandas as pd

    frame = pd.read_csv(path, usecols=["text", "label"], dtype=str, keep_default_na=False, na_values=[""])
    text, label = frame["text"], frame["label"]
    stripped = text.str.strip()
    text_valid = text.notna()
    blank = text_valid & (stripped == "")
    ids = label.map({name: i for i, name in enumerate(LABELS)})
    digits = ids.isna() & label.notna() & label.str.fullmatch(r"[0-9]{1,9}").fillna(False).astype(bool)
    if digits.any():
        as_int = label[digits].astype("int64")
        ids[digits] = as_int.where(as_int < len(LABELS))
    counts = ids.dropna().astype("int64").value_counts()
    keep = stripped[text_valid & ~blank]
    stats = {
        "rows": len(frame),
        "null_rows": int((~text_valid | label.isna()).sum()),
        "empty_text_rows": int(blank.sum()),
        "duplicate_rows": int(keep.duplicated().sum()),
        "unknown_label_rows": int((label.notna() & ids.isna()).sum()),
        "label_counts": {name: int(counts.get(i, 0)) for i, name in enumerate(LABELS)},
    }
    return stats, keep


def run_pandas(train: str, validation: str, fingerprint: bool) -> dict:
    import pandas  # noqa: F401  (imported before the clock starts, like pyarrow for the other side)

    started = time.perf_counter()
    train_stats, train_texts = pandas_split(train)
    validation_stats, validation_texts = pandas_split(validation)
    # object dtype: Series.isin on pandas 3's default (Arrow-backed) string dtype took 12 s for 2M rows
    overlap = int(validation_texts.astype(object).isin(train_texts.astype(object)).sum())
    if fingerprint:
        from trainer.storage import dataset_fingerprint

        dataset_fingerprint(train, validation)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "stats": {"train": train_stats, "validation": validation_stats, "overlap_rows": overlap},
    }


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(impl: str, train: str, validation: str) -> None:
    # Libraries are loaded before the clock starts on both sides (a task pays that once per process).
    import fsspec  # noqa: F401
    import pyarrow.compute
    import pyarrow.csv  # noqa: F401

    if impl == "arrow":
        result = run_arrow(train, validation)
    else:
        result = run_pandas(train, validation, fingerprint=impl == "pandas+fp")
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure(impl: str, train: Path, validation: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, str(train), str(validation)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise SystemExit(f"{impl} child failed ({out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout)


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[500_000, 2_000_000])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per measurement: fastest time, median peak RSS"
    )
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "TRAIN", "VALIDATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    impls = ("arrow", "pandas", "pandas+fp")
    results: dict[int, dict[str, dict]] = {}
    files: dict[int, float] = {}
    for rows in sorted(args.rows):
        started = time.perf_counter()
        train, validation = dataset(rows)
        files[rows] = (train.stat().st_size + validation.stat().st_size) / 2**20
        print(
            f"data: {rows:,} train rows, {files[rows]:.0f} MB ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
        results[rows] = {}
        for impl in impls:
            runs = [measure(impl, train, validation) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            best["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
            results[rows][impl] = best
            print(f"  {impl:<10} {best['seconds']:.2f} s", file=sys.stderr)

    print()
    header = f"{'rows':>11} {'file MB':>8} {'impl':<10} {'seconds':>8} {'rows/s':>12} {'peak RSS MB':>12}"
    print(f"{header} {'speedup':>8}")
    agree = True
    for rows, by_impl in results.items():
        arrow = by_impl["arrow"]
        for impl in impls:
            r = by_impl[impl]
            speedup = r["seconds"] / arrow["seconds"]
            total_rows = r["stats"]["train"]["rows"] + r["stats"]["validation"]["rows"]
            print(
                f"{rows:>11,} {files[rows]:>8.0f} {impl:<10} {r['seconds']:>8.2f} "
                f"{total_rows / r['seconds']:>12,.0f} {r['peak_rss_mb']:>12.0f} "
                f"{'' if impl == 'arrow' else f'{speedup:.1f}x':>8}"
            )
            if r["stats"] != arrow["stats"]:
                agree = False
                print(f"    ! {impl} disagrees: {r['stats']} vs arrow {arrow['stats']}")

    largest, smallest = max(results), min(results)
    speedup = results[largest]["pandas"]["seconds"] / results[largest]["arrow"]["seconds"]
    print()
    print(f"statistics identical across implementations: {'yes' if agree else 'NO'}")
    print(
        f"target >= 3x faster than pandas at {largest:,} rows: {speedup:.1f}x -> "
        f"{'MET' if speedup >= 3 else 'NOT MET'}"
    )
    if largest != smallest:
        grow_rss = results[largest]["arrow"]["peak_rss_mb"] - results[smallest]["arrow"]["peak_rss_mb"]
        grow_file = files[largest] - files[smallest]
        grow_pandas = results[largest]["pandas"]["peak_rss_mb"] - results[smallest]["pandas"]["peak_rss_mb"]
        flat = grow_rss <= 0.25 * grow_file
        print(
            f"target peak RSS roughly flat: files grew {grow_file:+.0f} MB, validate_dataset peak RSS "
            f"{grow_rss:+.0f} MB (pandas {grow_pandas:+.0f} MB) -> {'MET' if flat else 'NOT MET'} "
            f"(criterion: growth <= 25% of the file growth; hashes cost 8 bytes/row by design)"
        )


if __name__ == "__main__":
    main()
