"""Which DAG file builds which pipeline: pipelines spread over ``trainyard_pipelines_<k>_of_<n>.py``.

One DAG file for every pipeline makes one slow or broken parse hide every DAG, and makes the
import time grow with the number of pipelines until it crosses ``dagbag_import_timeout``. Several
loader files bound the cost of each, let the dag-processor parse them in parallel
(``[dag_processor] parsing_processes``), and a slow slice can only delay its own DAGs.

A pipeline's loader is a stable hash of its file name, so it always lands in the same file and its
DAG's ``fileloc`` never changes between parses (it does change if ``n`` changes: pick ``n`` once).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

LOADER_FILE = re.compile(r"^trainyard_pipelines_(\d+)_of_(\d+)\.py$")


def loader_file_name(index: int, count: int) -> str:
    return f"trainyard_pipelines_{index}_of_{count}.py"


def shard_index(pipeline_name: str, count: int) -> int:
    """Stable across processes and Python versions (unlike ``hash()``)."""
    return zlib.crc32(pipeline_name.encode("utf-8")) % count


class LoaderFilesError(RuntimeError):
    """The loader files in the DAG folder do not form a complete set: some pipelines have no home."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def holds(self, pipeline_file: Path) -> bool:
        return shard_index(pipeline_file.stem, self.count) == self.index


def check_loader_files(dags_folder: Path) -> int:
    """The number of loader files, or LoaderFilesError naming what is missing or inconsistent."""
    found = {}
    for path in dags_folder.glob("trainyard_pipelines_*.py"):
        match = LOADER_FILE.match(path.name)
        if match is None:
            raise LoaderFilesError(
                f"{path}: not a loader file name; use trainyard_pipelines_<k>_of_<n>.py or remove it"
            )
        found[path.name] = (int(match.group(1)), int(match.group(2)))
    if not found:
        raise LoaderFilesError(f"{dags_folder}: no loader files (trainyard_pipelines_<k>_of_<n>.py)")
    counts = {count for _, count in found.values()}
    if len(counts) != 1:
        raise LoaderFilesError(
            f"{dags_folder}: loader files disagree on how many there are ({', '.join(sorted(found))}); "
            "keep exactly trainyard_pipelines_0_of_<n>.py ... trainyard_pipelines_<n-1>_of_<n>.py"
        )
    (count,) = counts
    expected = {loader_file_name(i, count) for i in range(count)}
    if set(found) != expected:
        missing = ", ".join(sorted(expected - set(found))) or "none"
        extra = ", ".join(sorted(set(found) - expected)) or "none"
        raise LoaderFilesError(
            f"{dags_folder}: incomplete loader files (missing: {missing}; out of range: {extra}); the "
            "pipelines that hash to a missing file would silently disappear"
        )
    return count


def shard_of_loader(loader_file: Path) -> Shard:
    """The slice a loader file builds, after checking that its siblings cover every slice."""
    match = LOADER_FILE.match(loader_file.name)
    if match is None:
        raise LoaderFilesError(f"{loader_file}: loader files are named trainyard_pipelines_<k>_of_<n>.py")
    check_loader_files(loader_file.parent)
    return Shard(index=int(match.group(1)), count=int(match.group(2)))
