"""The trainer image's Python environment is the tested one, checked without Docker.

Offline (default run): the pins of docker/trainer-requirements.txt and
docker/trainer-cuda-requirements.txt form a closed, consistent set for the image's platform
(CPython 3.11, Linux x86_64): every Requires-Dist of every pin, markers evaluated for that
platform and extras followed, is pinned at a version it accepts. Metadata comes from this venv
where it has the same version (requirements.txt installs it), else from
tests/deploy/trainer_image_metadata.json: PyPI's metadata of the CUDA build of torch and of the
CUDA packages, which no development machine installs. The base image's CUDA must be torch's,
and the nodes' driver new enough for it.

Extended (PyPI, about a minute): pip resolves the two files for the image's platform to exactly
these pins, wheels only, and PyPI's metadata still equals the committed one. This machine's pip
configuration (a torch cap, a local CPU torch wheel, file:// indexes) is bypassed, see
tests/support/trainer_image.py.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.support.deploy_files import load_yaml, requirement_pins
from tests.support.paths import ROOT
from tests.support.trainer_image import (
    CUDA_FILE,
    DOCKERFILE,
    SHARED_FILE,
    base_image,
    closure_problems,
    committed_metadata,
    dockerfile_arg,
    image_pins,
    image_requires,
    marker_environment,
    normalize,
    pip_report,
    report_packages,
)

# Minimum driver of each CUDA major under minor-version compatibility (NVIDIA's CUDA compatibility
# guide): any driver of at least this branch runs every minor release of that major natively.
MIN_DRIVER = {12: 525, 13: 580}
GPU_OPERATOR_CHART = ROOT.parent / "shared" / "upstream-charts" / "gpu-operator-v25.3.2.tgz"


def _problems(pins: dict[str, str], environment: dict[str, str] | None = None) -> list[str]:
    requires, missing = image_requires(pins)
    return missing + closure_problems(pins, requires, environment or marker_environment())


def test_the_image_environment_is_closed_and_consistent() -> None:
    pins = image_pins()
    assert {"torch", "transformers", "triton", "nvidia-cuda-runtime", "nvidia-nccl-cu13"} <= set(pins)
    assert _problems(pins) == []


def test_the_consistency_check_finds_each_kind_of_conflict() -> None:
    pins = image_pins()
    assert any(
        p.startswith("pandas==3.1.1 requires numpy>=2.0.2, but numpy==1.26.4")
        for p in _problems(pins | {"numpy": "1.26.4"})
    ), "a version a dependent refuses"
    without_sympy = {k: v for k, v in pins.items() if k != "sympy"}
    assert "torch==2.13.0 requires sympy>=1.13.3, which is not pinned" in _problems(without_sympy)
    # reached only through an extra: torch -> cuda-toolkit[cublas,...] -> nvidia-cublas
    without_cublas = {k: v for k, v in pins.items() if k != "nvidia-cublas"}
    assert any(
        p.startswith("cuda-toolkit==13.0.3.0 requires nvidia-cublas==13.1.1.3.*, which is not pinned")
        for p in _problems(without_cublas)
    )
    assert "moto==5.2.5 is pinned but no root needs it" in _problems(pins | {"moto": "5.2.5"})
    assert any("no metadata for numpy==0.0.1" in p for p in _problems(pins | {"numpy": "0.0.1"}))
    # markers are evaluated for the image's platform: on Windows tqdm would also need colorama
    windows = marker_environment() | {"platform_system": "Windows", "sys_platform": "win32", "os_name": "nt"}
    assert any("requires colorama" in p for p in _problems(pins, windows))


def test_the_image_runs_the_tested_python_and_torchs_cuda() -> None:
    python = dockerfile_arg("PYTHON_VERSION")
    assert tuple(int(p) for p in python.split(".")[:2]) == sys.version_info[:2], (
        f"the image's Python {python} is not the minor the tests run on ({sys.version.split()[0]})"
    )
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^PYTHON \?= python{re.escape(python.rsplit('.', 1)[0])}$", makefile, re.MULTILINE)
    cuda, _ = base_image()
    pins = image_pins()
    runtime = pins["nvidia-cuda-runtime"]
    assert runtime.split(".")[:2] == cuda.split(".")[:2], (
        f"base image CUDA {cuda}, but torch's CUDA runtime is nvidia-cuda-runtime=={runtime}: "
        "use the nvidia/cuda tag of that CUDA minor"
    )
    assert pins["cuda-toolkit"].split(".")[:2] == cuda.split(".")[:2]
    assert committed_metadata()["torch"]["version"] == pins["torch"], (
        "the CUDA build's metadata is torch's pin"
    )


def test_the_nodes_driver_runs_the_images_cuda_natively() -> None:
    """The GPU Operator's driver is at least the minimum of the image's CUDA major, so the image
    needs no forward-compatibility libraries (and no entrypoint that would enable them)."""
    values = load_yaml(ROOT / "helm-values" / "gpu-operator" / "values.yaml")
    assert values["driver"]["enabled"] is True
    version = values["driver"].get("version")
    if version is None:  # the chart's default
        with tarfile.open(GPU_OPERATOR_CHART) as archive:
            chart_values = archive.extractfile("gpu-operator/values.yaml")
            assert chart_values is not None
            version = yaml.safe_load(chart_values)["driver"]["version"]
    cuda, _ = base_image()
    needed = MIN_DRIVER[int(cuda.split(".")[0])]
    assert int(str(version).split(".")[0]) >= needed, (
        f"helm-values/gpu-operator/values.yaml runs driver {version}; CUDA {cuda} needs >= {needed}: "
        f"set driver.version to an R{needed} (or newer) release"
    )


@pytest.mark.skipif(
    not GPU_OPERATOR_CHART.exists(), reason=f"{GPU_OPERATOR_CHART} is not here (a clone outside CI)"
)
def test_the_charts_default_driver_is_too_old_for_the_image() -> None:
    """Why values.yaml sets driver.version: without it the operator installs a CUDA 12 driver."""
    with tarfile.open(GPU_OPERATOR_CHART) as archive:
        chart_values = archive.extractfile("gpu-operator/values.yaml")
        assert chart_values is not None
        default = yaml.safe_load(chart_values)["driver"]["version"]
    assert int(default.split(".")[0]) < MIN_DRIVER[int(base_image()[0].split(".")[0])]


def test_the_dockerfile_installs_exactly_the_pins_and_checks_the_result() -> None:
    text = DOCKERFILE.read_text()
    install = re.search(r"^RUN uv pip install (.+?)(?<!\\)\n", text, re.MULTILINE | re.DOTALL)
    assert install, "the pins are installed with uv pip install"
    command = install[1]
    assert (
        "--no-deps" in command
        and "--only-binary :all:" in command
        and "--index-url https://pypi.org/simple" in command
    )
    assert f"/opt/trainyard/{SHARED_FILE.name}" in command and f"/opt/trainyard/{CUDA_FILE.name}" in command
    assert f"COPY docker/{SHARED_FILE.name} docker/{CUDA_FILE.name} /opt/trainyard/" in text
    makefile_pip = re.search(r"pip==(\S+)", (ROOT / "Makefile").read_text())
    assert makefile_pip and dockerfile_arg("PIP_VERSION") == makefile_pip[1], "the pip of the Makefile's venv"
    assert re.search(r"^FROM ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ AS uv$", text, re.MULTILINE), "uv pinned"
    assert 'uv python install --no-bin "${PYTHON_VERSION}"' in text
    for check in (
        "python -m pip check",
        "torch.version.cuda == cuda",
        "torch.__version__.split('+')[0] == sys.argv[1]",
        "torch.from_numpy(a)",
        "python -m torch.distributed.run --help",
        "--standalone",
        "--nproc[-_]per[-_]node",
    ):
        assert check in text, f"build-time check missing: {check}"
    # NGC images override TF32 through the environment; this one leaves it to the trainer
    variables = re.findall(r"(\w+)=", "".join(re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.MULTILINE)))
    assert {"HF_HOME", "PYTHONPATH", "VIRTUAL_ENV"} <= set(variables)
    assert not [v for v in variables if "TF32" in v], "no TF32 override in the image"


def test_part_2_is_only_the_cuda_build_of_torch() -> None:
    """Part 1 equals requirements.txt where they overlap (tests/deploy/test_deploy.py); part 2 holds
    only what the CUDA build of torch adds, which the compose stack's CPU image must not install."""
    assert all(re.match(r"(nvidia-|cuda-|triton$)", name) for name in requirement_pins(CUDA_FILE))


@pytest.mark.extended
def test_pip_resolves_the_image_environment_to_exactly_the_pins(tmp_path: Path) -> None:
    """The real resolver, for the image's platform, from PyPI (about a minute: the metadata of 144
    distributions): no missing, extra or different version, wheels only."""
    packages = report_packages(pip_report(["-r", str(SHARED_FILE), "-r", str(CUDA_FILE)], tmp_path))
    resolved = {name: package["version"] for name, package in packages.items()}
    assert resolved == image_pins()
    foreign = [
        p["url"] for p in packages.values() if not p["url"].startswith("https://files.pythonhosted.org/")
    ]
    assert not foreign, f"not from PyPI (is this machine's pip configuration leaking in?): {foreign[:3]}"
    assert all(p["url"].endswith(".whl") for p in packages.values())
    for name, committed in committed_metadata().items():
        package = packages[normalize(name)]
        assert (package["version"], package["requires_dist"]) == (
            committed["version"],
            committed["requires_dist"],
        ), (
            f"PyPI's metadata of {name} differs from tests/deploy/trainer_image_metadata.json: "
            "python -m tests.support.trainer_image"
        )
