"""What a training run is made of, as one key: equal keys mean training again would change nothing.

Pipeline caches in the field key on parameters, so pointing a pipeline at new data can skip the
training it needed. This key hashes content instead: the dataset fingerprint (the bytes
``validate_data`` approved), the resolved training section and data mapping, the base model's
identity (its location plus a hash of its ``config.json``) and the trainer build (the pinned image,
or for the local launcher the trainer package's version and a hash of its source). Pure apart from
reading the base model's config, which takes the storage options it needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.spec import Hyperparameters
    from trainyard.config.loading import ResolvedPipeline

log = logging.getLogger(__name__)

KEY_PREFIX = "sha256:"
#: The file that pins what a base model is (architecture, sizes, vocabulary size); weights files
#: are too large to hash on every run, and a changed checkpoint at the same path is expected to
#: come with a new location (or a forced run).
MODEL_CONFIG = "config.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_model_identity(base: str, s3_endpoint_url: str | None) -> str:
    """``<location> config:<sha256 of config.json>``; a Hub id is its name (the Hub is not reachable
    from every machine); a missing config is named in the key, so it never matches a real model."""
    if base.startswith("hf://"):
        return base
    config_uri = f"{base.rstrip('/')}/{MODEL_CONFIG}"
    try:
        if base.startswith("s3://"):
            import fsspec

            from trainer.storage import storage_options

            with fsspec.open(config_uri, "rb", **storage_options(config_uri, s3_endpoint_url)) as handle:
                data = handle.read()
        else:
            data = Path(config_uri).read_bytes()
    except (FileNotFoundError, OSError) as exc:
        log.warning(
            "base model %s: cannot read %s (%s); the run's key names it as missing", base, config_uri, exc
        )
        return f"{base} config:missing"
    return f"{base} config:{_sha256(data)}"


@cache
def _trainer_source_hash() -> str:
    import trainer

    root = Path(trainer.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def trainer_identity(pipeline: ResolvedPipeline) -> str:
    """The trainer that would run: the pinned image on Kubernetes, else this package's trainer."""
    kubernetes = pipeline.environment.kubernetes
    if pipeline.environment.launcher == "kubernetes" and kubernetes is not None:
        return f"image {kubernetes.image}"
    try:
        package = version("trainyard")
    except PackageNotFoundError:
        package = "unknown"
    return f"trainer {package} source:{_trainer_source_hash()}"


def key_inputs(
    pipeline: ResolvedPipeline, fingerprint: str, hyperparameters: Hyperparameters
) -> dict[str, Any]:
    """Everything the key covers, readable: logged with the key so a mismatch can be explained."""
    data = pipeline.data_spec
    return {
        "dataset_fingerprint": fingerprint,
        "data": {
            "format": data.format,
            "text_column": data.text_column,
            "label_column": data.label_column,
            "label_names": list(data.label_names),
        },
        "training": hyperparameters.model_dump(mode="json"),
        "model": {
            "base": base_model_identity(pipeline.model_base, pipeline.environment.storage.s3_endpoint_url),
            "max_length": pipeline.config.model.max_length,
        },
        "trainer": trainer_identity(pipeline),
    }


def content_key(inputs: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``key_inputs``."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return KEY_PREFIX + _sha256(canonical.encode())
