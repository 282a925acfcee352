"""Parsed pipeline YAML, kept between DAG-file parses, keyed by the file's exact content.

The dag-processor re-runs every DAG file in a fresh process every ``min_file_process_interval``,
so nothing survives in memory. Parsing YAML is the largest cost of loading a pipeline that we
control (PyYAML constructs Python objects in Python; ~0.9 ms for a typical pipeline file, against
~0.02 ms to read its cached parse back as JSON): ``make bench`` prints what the cache saves.

Only the *parse* is cached, never the validated result: every load still validates the data
against the current schema and environment, so a change of code or environment can never be
hidden by a stale entry. An entry is used only for the same bytes, the same PyYAML and the same
limits, and only a parse that survives a JSON round trip unchanged is stored (dates, binary or
non-string keys are simply parsed each time). One cache file per loader file keeps exactly the
entries its last parse used, so it never grows beyond the pipelines it holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

_FORMAT = 1


def default_cache_dir() -> Path:
    """``TRAINYARD_CACHE_DIR``, else the user's cache directory (writable wherever Airflow runs)."""
    configured = os.environ.get("TRAINYARD_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainyard"


class ParseCache:
    """{content key: parsed data}, loaded from and saved to one JSON file; failures only cost speed."""

    def __init__(self, file: Path | None, salt: str = "") -> None:
        self.file = file
        self.salt = f"{_FORMAT}:{yaml.__version__}:{salt}"
        self._stored = self._load()
        self._used: dict[str, Any] = {}
        self.hits = self.misses = 0

    def _load(self) -> dict[str, Any]:
        if self.file is None:
            return {}
        try:
            document = json.loads(self.file.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.debug("Ignoring unreadable parse cache %s: %s", self.file, exc)
            return {}
        entries = document.get("entries") if isinstance(document, dict) else None
        return entries if isinstance(entries, dict) else {}

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.salt}\n{text}".encode()).hexdigest()

    def get(self, key: str) -> tuple[bool, Any]:
        if key in self._stored:
            self.hits += 1
            self._used[key] = self._stored[key]
            return True, self._stored[key]
        self.misses += 1
        return False, None

    def put(self, key: str, data: Any) -> None:
        try:
            faithful = json.loads(json.dumps(data)) == data
        except (TypeError, ValueError):
            faithful = False
        if faithful:
            self._used[key] = data

    def save(self) -> None:
        """Write the entries used by this parse, if they differ from what is stored."""
        if self.file is None or self._used == self._stored:
            return
        tmp = None
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.name}.")
            with os.fdopen(fd, "w") as handle:
                json.dump({"format": _FORMAT, "entries": self._used}, handle, separators=(",", ":"))
            os.replace(tmp, self.file)  # atomic: a concurrent reader sees the old or the new file
        except OSError as exc:
            log.debug("Could not write parse cache %s: %s", self.file, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
