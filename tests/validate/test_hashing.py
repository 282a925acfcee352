"""``trainyard.validate.hashing``: the dataset fingerprint and the text hash."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.support.datasets import spec_for, train_rows
from tests.support.synthetic_data import write_parquet, write_splits
from trainer.storage import dataset_fingerprint
from trainyard.config.pipeline_schema import DataChecks
from trainyard.validate.dataset import validate_dataset
from trainyard.validate.hashing import TextHasher


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_fingerprint_is_the_storage_fingerprint_and_sees_one_byte(tmp_path, fmt):
    train, validation = write_splits(tmp_path, fmt=fmt)
    spec = spec_for(train, validation, fmt)
    report = validate_dataset(spec, DataChecks())
    assert report.fingerprint == dataset_fingerprint(str(train), str(validation))
    assert report.fingerprint.startswith("sha256:")

    if fmt == "csv":
        # one byte of one text, same length: the data still passes, the fingerprint moves
        content = train.read_bytes()
        position = content.index(b"t17") + 2
        train.write_bytes(content[:position] + b"X" + content[position + 1 :])
    else:
        rows = train_rows()
        rows[17]["text"] = rows[17]["text"][:-1] + "X"
        write_parquet(train, rows)
    changed = validate_dataset(spec, DataChecks())
    assert changed.passed
    assert changed.fingerprint != report.fingerprint
    assert changed.fingerprint == dataset_fingerprint(str(train), str(validation))


def test_text_hash_depends_only_on_the_text():
    hasher = TextHasher(slice_bytes=64)  # tiny slices: exercise slicing and the table growth
    long = "x" * 1000
    texts = ["a", "b", "a", "", "ab", "ba", long, "ü", "a\x00", long + "y", long]
    hashes = hasher.hash(pa.array(texts))
    assert hashes[0] == hashes[2] and hashes[6] == hashes[10]
    assert len(set(hashes.tolist())) == len(set(texts))
    # independent of the array's type, offset and neighbours
    sliced = pa.array(["zzz", *texts])[1:]
    assert hasher.hash(sliced).tolist() == hashes.tolist()
    assert hasher.hash(pa.array(texts, type=pa.large_string())).tolist() == hashes.tolist()
    assert TextHasher().hash(pa.array(texts)).tolist() == hashes.tolist()
