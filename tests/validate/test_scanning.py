"""``trainyard.validate.scanning``: batch boundaries, S3, no pandas, and the memory bound.

All datasets are written by the tests; nothing is mocked: the real validator reads real CSV/parquet
files, locally and through moto's S3 server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from tests.support.datasets import LABELS, check, failed, spec_for, train_rows, validation_rows, write
from tests.support.paths import ROOT
from tests.support.s3 import CREDENTIALS, MotoS3
from tests.support.synthetic_data import write_csv, write_splits
from trainer.storage import dataset_fingerprint
from trainyard.config.pipeline_schema import DataChecks
from trainyard.validate.dataset import validate_dataset


def test_small_block_size_gives_the_same_report(tmp_path):
    """Batches split rows at block boundaries; counts and hashes must not depend on where."""
    rows = train_rows(2000)
    rows += [dict(r, text=f"  {r['text']} ") for r in rows[:30]]  # duplicates with padding
    spec = write(tmp_path, rows, validation_rows() + rows[:4])
    big = validate_dataset(spec, DataChecks())
    small = validate_dataset(spec, DataChecks(), block_size=4096)
    assert big.to_dict()["splits"] == small.to_dict()["splits"]
    assert big.overlap_rows == small.overlap_rows == 4
    assert big.train.duplicate_rows == 30


def test_validation_does_not_import_pandas(tmp_path):
    """pyarrow imports pandas whenever it converts Python values; the validator avoids it (~0.3 s)."""
    train, validation = write_splits(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        from trainer.spec import DataSpec
        from trainyard.validate.dataset import validate_dataset
        from trainyard.config.pipeline_schema import DataChecks
        spec = DataSpec(train_uri={str(train)!r}, validation_uri={str(validation)!r}, format="csv",
                        text_column="text", label_column="label", label_names=("negative", "positive"))
        assert validate_dataset(spec, DataChecks()).passed
        print("pandas" in sys.modules, "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


# -- S3 (moto's S3 server) -------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with MotoS3("trainyard") as server:
        yield server.endpoint, server.client


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_s3_dataset(tmp_path, s3, fmt):
    endpoint, client = s3
    train, validation = write_splits(tmp_path, fmt=fmt)
    client.upload_file(str(train), "trainyard", f"data/train.{fmt}")
    client.upload_file(str(validation), "trainyard", f"data/validation.{fmt}")
    spec = spec_for(f"s3://trainyard/data/train.{fmt}", f"s3://trainyard/data/validation.{fmt}", fmt)

    report = validate_dataset(spec, DataChecks(), s3_endpoint_url=endpoint)
    assert report.passed, report.summary()
    assert report.train.rows == 400 and report.validation.rows == 100
    assert report.fingerprint == dataset_fingerprint(spec.train_uri, spec.validation_uri, endpoint)
    assert report.fingerprint == dataset_fingerprint(str(train), str(validation))  # same bytes

    missing = spec_for("s3://trainyard/data/missing.csv", spec.validation_uri, fmt)
    report = validate_dataset(missing, DataChecks(), s3_endpoint_url=endpoint)
    assert failed(report) == {("readable", "train")}
    assert "s3://trainyard/data/missing.csv" in check(report, "readable", "train").message


# -- memory ----------------------------------------------------------------------------------------

MEMORY_CHILD = """
import json, sys
from trainer.spec import DataSpec
from trainyard.validate.dataset import validate_dataset
from trainyard.config.pipeline_schema import DataChecks

def high_water_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

spec = DataSpec(train_uri=sys.argv[1], validation_uri=sys.argv[2], format="csv", text_column="text",
                label_column="label", label_names=("negative", "positive"))
before = high_water_kib()
report = validate_dataset(spec, DataChecks())
print(json.dumps({"before_kib": before, "peak_kib": high_water_kib(), "report": report.to_dict()}))
"""


def write_big_csv(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    """Unique tweet-like texts, written vectorised (a Python csv loop would take minutes)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    from tests.support.synthetic_data import FILLER, NEGATIVE, POSITIVE

    vocab = pa.array(FILLER + POSITIVE + NEGATIVE)
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.string())])
    with pcsv.CSVWriter(str(path), schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            words = [
                pa.DictionaryArray.from_arrays(
                    pa.array(rng.integers(0, len(vocab), n, dtype=np.int32)), vocab
                ).cast(pa.string())
                for _ in range(8)
            ]
            ids = pa.array(np.arange(start, start + n))
            text = pc.binary_join_element_wise(*words, ids.cast(pa.string()), " ")
            labels = pa.DictionaryArray.from_arrays(
                pa.array((np.arange(start, start + n) % 2).astype(np.int32)), pa.array(list(LABELS))
            ).cast(pa.string())
            writer.write(pa.record_batch([ids, text, labels], schema=schema))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_csv_larger_than_a_memory_limit_validates_under_it(tmp_path):
    """A ~420 MB CSV validates with a peak RSS under a 320 MiB limit (and far less than the file).

    About 6 s on 2 cores (writing the file is half of it), so not marked slow. Measured peak: ~255 MiB,
    of which ~78 MiB is the interpreter with pyarrow and numpy.

    The limit is checked against the child's own peak resident memory (``VmHWM`` in
    /proc/self/status, the kernel's high-water mark for the process's address space), not enforced:

    * ``setrlimit(RLIMIT_RSS)`` is ignored by Linux, and ``RLIMIT_AS`` counts address space that is
      reserved but never touched (Arrow's mimalloc arenas, ~10 thread stacks of 8 MiB), so it fails
      at a value unrelated to the memory really used;
    * ``ru_maxrss`` is no good either: ``RUSAGE_SELF`` keeps the high-water mark of the process
      image before ``exec`` (here the pytest process that forked it, which just wrote the file) and
      ``RUSAGE_CHILDREN`` reports the largest of all children pytest ever ran.

    The child validates in a fresh interpreter; the file reaches it through read(), so the page
    cache is not part of its RSS.
    """
    train = tmp_path / "train.csv"
    write_big_csv(train, 5_500_000)
    size_mib = train.stat().st_size / 2**20
    validation = write_csv(tmp_path / "validation.csv", validation_rows())
    limit_mib = 320
    assert size_mib > limit_mib + 60, size_mib

    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(train), str(validation)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    report = result["report"]
    assert report["passed"], report["failed"]
    assert report["splits"]["train"]["rows"] == 5_500_000
    peak_mib = result["peak_kib"] / 1024
    assert peak_mib < limit_mib, f"peak RSS {peak_mib:.0f} MiB for a {size_mib:.0f} MiB file"
    # what validation itself added beyond the interpreter and imports
    assert (result["peak_kib"] - result["before_kib"]) / 1024 < size_mib / 2
