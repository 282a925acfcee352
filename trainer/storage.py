"""Opening dataset and model URIs (local paths or s3://) and fingerprinting their content.

Shared by the Airflow side (data validation) and the trainer so both agree byte for byte on
what "the dataset" is: promotion refuses a model whose fingerprint differs from the approved one.
Imports only the standard library and fsspec (s3fs is loaded by fsspec on demand).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import IO, Any

CHUNK_BYTES = 8 * 1024 * 1024


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def storage_options(uri: str, s3_endpoint_url: str | None) -> dict[str, Any]:
    """fsspec/``datasets`` storage options for ``uri``; credentials come from the standard AWS env vars."""
    if is_s3(uri) and s3_endpoint_url:
        return {"client_kwargs": {"endpoint_url": s3_endpoint_url}}
    return {}


def open_binary(uri: str, s3_endpoint_url: str | None = None) -> IO[bytes]:
    """Open ``uri`` for streaming reads; the caller closes it."""
    import fsspec

    return fsspec.open(uri, "rb", **storage_options(uri, s3_endpoint_url)).open()


class HashingReader:
    """A read-only file wrapper that hashes every byte it hands out.

    Lets a single streaming pass both parse a file and fingerprint it.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.bytes_read = 0
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.digest.update(data)
        self.bytes_read += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._raw.close()

    def drain(self) -> str:
        """Hash whatever the parser left unread and return the hex digest of the whole file."""
        while self.read(CHUNK_BYTES):
            pass
        return self.digest.hexdigest()


def file_sha256(uri: str, s3_endpoint_url: str | None = None) -> str:
    with open_binary(uri, s3_endpoint_url) as raw:
        reader = HashingReader(raw)
        return reader.drain()


def combine_fingerprint(file_digests: Iterable[tuple[str, str]]) -> str:
    """Fingerprint of a dataset from (role, sha256 hex) pairs, e.g. ("train", ...), ("validation", ...)."""
    outer = hashlib.sha256()
    for role, digest in file_digests:
        outer.update(f"{role}:{digest}\n".encode())
    return f"sha256:{outer.hexdigest()}"


def dataset_fingerprint(train_uri: str, validation_uri: str, s3_endpoint_url: str | None = None) -> str:
    return combine_fingerprint(
        [
            ("train", file_sha256(train_uri, s3_endpoint_url)),
            ("validation", file_sha256(validation_uri, s3_endpoint_url)),
        ]
    )
