"""The trainer image's Python environment, worked out without Docker.

The image (docker/trainer.Dockerfile) installs docker/trainer-requirements.txt (the pins it shares
with requirements.txt, torch included) and docker/trainer-cuda-requirements.txt (what PyPI's Linux
torch wheel adds: CUDA libraries, triton) with --no-deps, on CPython 3.11 for Linux x86_64. Here:
the markers of that platform, a consistency check of a pinned set against its Requires-Dist, and
pip's own resolution of the two files against PyPI for that platform.

This machine's pip has a global configuration (a constraints file capping torch, a find-links
folder with a CPU torch wheel, extra file:// indexes): the image never sees those, so every pip
call here runs with PIP_CONFIG_FILE=os.devnull (pip then loads no configuration file), --isolated
(no PIP_* variables) and an explicit --index-url of PyPI.

After changing requirements.txt (or ROOTS below), regenerate the pins and the committed metadata:
    .venv/bin/python -m tests.support.trainer_image
It resolves ROOTS at their requirements.txt versions with requirements.txt as constraints, then
rewrites the pin lines of both files (their leading comments stay) and
tests/deploy/trainer_image_metadata.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.support.paths import ROOT

DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "trainer.Dockerfile"
SHARED_FILE = DOCKER / "trainer-requirements.txt"
CUDA_FILE = DOCKER / "trainer-cuda-requirements.txt"
METADATA_FILE = ROOT / "tests" / "deploy" / "trainer_image_metadata.json"
PYPI = "https://pypi.org/simple"

# What the trainer needs directly (trainer/*.py imports, MLflow's GPU metrics, boto3 for MLflow's
# S3 artifact client); every other pin must be reachable from these.
ROOTS = (
    "accelerate",
    "boto3",
    "datasets",
    "fsspec",
    "matplotlib",
    "mlflow",
    "numpy",
    "nvidia-ml-py",
    "packaging",
    "pandas",
    "pydantic",
    "s3fs",
    "scikit-learn",
    "torch",
    "transformers",
)
# glibc of the base image's Ubuntu: the newest manylinux tag a wheel may carry there.
UBUNTU_GLIBC = {"22.04": 35, "24.04": 39}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of a file of `name==version` lines (and comments)."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[A-Za-z0-9_.-]+", name), (
                f"{path.name}: '{line}' is not name==version"
            )
            pins[normalize(name)] = version
    return pins


def image_pins() -> dict[str, str]:
    shared, cuda = read_pins(SHARED_FILE), read_pins(CUDA_FILE)
    assert not shared.keys() & cuda.keys(), f"pinned in both files: {sorted(shared.keys() & cuda.keys())}"
    return shared | cuda


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"{DOCKERFILE.name}: no `ARG {name}=...`"
    return match[1]


def base_image() -> tuple[str, str]:
    """(CUDA version, Ubuntu version) of the image's nvidia/cuda base."""
    match = re.search(
        r"^FROM nvidia/cuda:(\d+\.\d+\.\d+)-base-ubuntu(\d+\.\d+)$", DOCKERFILE.read_text(), re.MULTILINE
    )
    assert match, f"{DOCKERFILE.name}: expected `FROM nvidia/cuda:<x.y.z>-base-ubuntu<yy.mm>`"
    return match[1], match[2]


def marker_environment() -> dict[str, str]:
    """PEP 508 marker values of the image's interpreter (CPython, Linux x86_64)."""
    python = dockerfile_arg("PYTHON_VERSION")
    return {
        "implementation_name": "cpython",
        "implementation_version": python,
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python,
        "python_version": ".".join(python.split(".")[:2]),
        "sys_platform": "linux",
    }


def image_platforms() -> list[str]:
    """pip --platform values for the base image: every manylinux tag its glibc accepts (pip does not
    expand manylinux_2_X to older tags itself)."""
    _, ubuntu = base_image()
    newest = UBUNTU_GLIBC[ubuntu]
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(newest, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def venv_requires(name: str, version: str) -> list[str] | None:
    """Requires-Dist of `name` as installed in this venv, if installed at exactly `version`."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if Version(dist.version) != Version(version):
        return None
    return list(dist.requires or [])


def committed_metadata() -> dict[str, dict[str, Any]]:
    return json.loads(METADATA_FILE.read_text())["packages"]


def image_requires(pins: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """Requires-Dist of every pin: from this venv where it has that version, else from the
    committed metadata of the image-only builds. Returns (requires, problems)."""
    committed = {normalize(k): v for k, v in committed_metadata().items()}
    requires, problems = {}, []
    for name, version in pins.items():
        found = venv_requires(name, version)
        if found is None and name in committed and committed[name]["version"] == version:
            found = committed[name]["requires_dist"]
        if found is None:
            problems.append(
                f"no metadata for {name}=={version}: neither installed in this venv at that version "
                f"(pip install -r requirements.txt) nor in {METADATA_FILE.name} "
                "(python -m tests.support.trainer_image)"
            )
        else:
            requires[name] = found
    return requires, problems


def _applies(requirement: Requirement, environment: dict[str, str], extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**environment, "extra": e}) for e in {"", *extras})


def closure_problems(
    pins: dict[str, str],
    requires: dict[str, list[str]],
    environment: dict[str, str],
    roots: tuple[str, ...] = ROOTS,
) -> list[str]:
    """Every requirement (markers evaluated for `environment`, extras followed) of every pin is
    pinned at a version it accepts, and every pin is needed by a root."""
    problems = [f"root {root} is not pinned" for root in roots if normalize(root) not in pins]
    todo = [(name, frozenset[str]()) for name in requires]
    seen = set(todo)
    needed: dict[str, set[str]] = {}  # dependency -> the pins that require it
    while todo:
        name, extras = todo.pop()
        for text in requires.get(name, []):
            requirement = Requirement(text)
            if not _applies(requirement, environment, extras):
                continue
            dependency = normalize(requirement.name)
            needed.setdefault(dependency, set()).add(name)
            wanted = f"{name}=={pins[name]} requires {text.split(';')[0].strip()}"
            if dependency not in pins:
                problems.append(f"{wanted}, which is not pinned")
                continue
            if not SpecifierSet(str(requirement.specifier)).contains(
                Version(pins[dependency]), prereleases=True
            ):
                problems.append(f"{wanted}, but {dependency}=={pins[dependency]} is pinned")
            item = (dependency, frozenset(requirement.extras))
            if requirement.extras and item not in seen:
                seen.add(item)
                todo.append(item)
    reachable, frontier = set(), [normalize(r) for r in roots if normalize(r) in pins]
    graph: dict[str, set[str]] = {}
    for dependency, dependents in needed.items():
        for dependent in dependents:
            graph.setdefault(dependent, set()).add(dependency)
    while frontier:
        name = frontier.pop()
        if name not in reachable:
            reachable.add(name)
            frontier.extend(graph.get(name, ()))
    problems += [
        f"{name}=={pins[name]} is pinned but no root needs it" for name in sorted(pins.keys() - reachable)
    ]
    return problems


def pip_report(args: list[str], workdir: Path) -> dict[str, Any]:
    """pip's --dry-run --report for the image's platform, PyPI only (no configuration of this machine)."""
    report = workdir / "report.json"
    python = dockerfile_arg("PYTHON_VERSION")
    abi = "cp" + "".join(python.split(".")[:2])
    command = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed"]
    command += ["--quiet", "--report", str(report), "--index-url", PYPI, "--only-binary=:all:"]
    command += ["--python-version", ".".join(python.split(".")[:2]), "--implementation", "cp", "--abi", abi]
    command += [f"--platform={tag}" for tag in image_platforms()]
    command += ["--target", str(workdir / "target"), *args]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    environment["PIP_CONFIG_FILE"] = os.devnull
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=900, check=False
    )
    assert result.returncode == 0, f"pip could not resolve {args}:\n{result.stderr[-4000:]}"
    return json.loads(report.read_text())


def report_packages(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{normalized name: {name, version, requires_dist, url}} of a pip report."""
    return {
        normalize(item["metadata"]["name"]): {
            "name": item["metadata"]["name"],
            "version": item["metadata"]["version"],
            "requires_dist": item["metadata"].get("requires_dist", []),
            "url": item["download_info"]["url"],
        }
        for item in report["install"]
    }


def _rewrite(path: Path, lines: list[str]) -> None:
    text = path.read_text().splitlines()
    header = []
    for line in text:
        if line and not line.startswith("#"):
            break
        header.append(line)
    path.write_text("\n".join([*header, *sorted(lines, key=str.lower)]) + "\n")


def main() -> None:
    project = {normalize(k): (k, v) for k, v in _spelled_pins(ROOT / "requirements.txt").items()}
    with tempfile.TemporaryDirectory() as tmp:
        roots = [f"{project[normalize(r)][0]}=={project[normalize(r)][1]}" for r in ROOTS]
        packages = report_packages(pip_report([*roots, "-c", str(ROOT / "requirements.txt")], Path(tmp)))
    shared, cuda, image_only = [], [], {}
    for name, package in packages.items():
        if name in project:
            assert project[name][1] == package["version"], (name, package["version"], project[name])
            shared.append(f"{project[name][0]}=={package['version']}")
        else:
            cuda.append(f"{package['name']}=={package['version']}")
        if venv_requires(name, package["version"]) is None:
            image_only[package["name"]] = {k: package[k] for k in ("version", "requires_dist")}
    _rewrite(SHARED_FILE, shared)
    _rewrite(CUDA_FILE, cuda)
    note = "Requires-Dist of the image's packages the development venv lacks at that version (PyPI)."
    METADATA_FILE.write_text(
        json.dumps({"_comment": note, "packages": image_only}, indent=1, sort_keys=True) + "\n"
    )
    print(f"{len(shared)} shared pins, {len(cuda)} CUDA pins, metadata of {len(image_only)} packages")


def _spelled_pins(path: Path) -> dict[str, str]:
    """{name as written: version} of requirements.txt."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


if __name__ == "__main__":
    main()
