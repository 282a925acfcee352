"""Reading the train/validation files and turning them into model inputs.

Labels arrive as names (``"positive"``) or integer ids; they leave as ids in ``spec.data.label_names``
order, in a ``labels`` column. Nothing is dropped silently: an unknown or empty label is an error that
names the value.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from trainer.errors import TrainerInputError
from trainer.spec import DataSpec, RunSpec, label_id
from trainer.storage import CHUNK_BYTES, HashingReader, combine_fingerprint, is_s3, open_binary

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")


def load_splits(spec: RunSpec):
    """A ``DatasetDict`` of ``train`` and ``validation``, columns ``text`` (str) and ``labels`` (id)."""
    import datasets

    data = spec.data
    files = {"train": data.train_uri, "validation": data.validation_uri}
    raw = datasets.load_dataset(data.format, data_files=staged_files(spec))

    for split in SPLITS:
        columns = raw[split].column_names
        missing = [c for c in (data.text_column, data.label_column) if c not in columns]
        if missing:
            raise TrainerInputError(
                f"{split} data ({files[split]}) has no column {', '.join(map(repr, missing))}; "
                f"its columns are: {', '.join(columns)}"
            )
        if raw[split].num_rows == 0:
            raise TrainerInputError(f"{split} data ({files[split]}) has no rows")

    raw = raw.select_columns([data.text_column, data.label_column])
    mappings = {split: label_mapping(raw[split].unique(data.label_column), data, split) for split in SPLITS}

    def to_ids(batch: dict[str, list], split: str) -> dict[str, list]:
        texts = batch[data.text_column]
        if any(text is None for text in texts):
            raise TrainerInputError(f"{split} data has an empty value in text column {data.text_column!r}")
        return {
            "text": [str(text) for text in texts],
            "labels": [mappings[split][v] for v in batch[data.label_column]],
        }

    features = datasets.Features(
        {"text": datasets.Value("string"), "labels": datasets.ClassLabel(names=list(data.label_names))}
    )
    return datasets.DatasetDict(
        {
            split: raw[split].map(
                to_ids,
                batched=True,
                fn_kwargs={"split": split},
                remove_columns=raw[split].column_names,
                features=features,
                desc=f"labels ({split})",
            )
            for split in SPLITS
        }
    )


def staged_files(spec: RunSpec) -> dict[str, str]:
    """Local files holding exactly the bytes ``validate_data`` approved.

    Remote files are copied once into scratch space while they are hashed, and training reads the
    copies, so an object overwritten after validation can never be trained on under the approved
    fingerprint. Local files are hashed in place.
    """
    data = spec.data
    scratch = Path(os.environ.get("TRAINYARD_SCRATCH") or tempfile.gettempdir())
    target_dir = scratch / "trainyard-data" / spec.dataset_fingerprint.removeprefix("sha256:")[:16]
    files: dict[str, str] = {}
    digests: list[tuple[str, str]] = []
    for split, uri in (("train", data.train_uri), ("validation", data.validation_uri)):
        try:
            raw = open_binary(uri, spec.s3_endpoint_url)
        except FileNotFoundError as error:
            raise TrainerInputError(f"dataset file not found: {uri} ({error})") from error
        with raw:
            reader = HashingReader(raw)
            if is_s3(uri):
                target_dir.mkdir(parents=True, exist_ok=True)
                target = target_dir / f"{split}.{data.format}"
                partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
                with partial.open("wb") as out:
                    while chunk := reader.read(CHUNK_BYTES):
                        out.write(chunk)
                partial.replace(target)  # atomic: concurrent ranks write the same bytes
                files[split] = str(target)
            else:
                reader.drain()
                files[split] = uri
        digests.append((split, reader.digest.hexdigest()))
    actual = combine_fingerprint(digests)
    if actual != spec.dataset_fingerprint:
        raise TrainerInputError(
            f"the dataset changed after it was validated: fingerprint is {actual}, "
            f"the spec approved {spec.dataset_fingerprint}; validate the data again"
        )
    return files


def label_mapping(values: list[Any], data: DataSpec, split: str) -> dict[Any, int]:
    """Map each distinct label value of a split to its id; raise naming every value that is not a label."""
    mapping: dict[Any, int] = {}
    unknown = []
    for value in values:
        class_id = label_id(value, data.label_names)
        if class_id is None:
            unknown.append(value)
        else:
            mapping[value] = class_id
    if unknown:
        shown = ", ".join("an empty value" if v is None else repr(v) for v in unknown[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise TrainerInputError(
            f"{split} data has unknown label value {shown}{more} in column {data.label_column!r}; "
            f"expected one of {', '.join(map(repr, data.label_names))} "
            f"or an integer id 0..{len(data.label_names) - 1}"
        )
    return mapping


def tokenize(dataset, tokenizer, max_length: int):
    """Token ids truncated to ``max_length``, and each example's token count (``length``: what the
    length-grouped sampler batches by); padding happens per batch (``DataCollatorWithPadding``)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=["text"], desc="tokenize")
