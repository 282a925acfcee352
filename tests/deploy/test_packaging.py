"""The package as the Airflow image installs it: a built wheel, not the editable checkout.

An editable install finds modules in the source tree whether or not pyproject.toml lists their
package, so a subpackage missing from the list passes every other test and breaks only the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import ROOT

SOURCES = {"trainyard": ROOT / "plugins" / "trainyard", "trainer": ROOT / "trainer"}


def _source_modules() -> list[str]:
    modules = []
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = (package, *path.relative_to(directory).with_suffix("").parts)
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


@pytest.mark.slow
def test_a_wheel_holds_every_module_and_each_imports_from_a_fresh_venv(tmp_path):
    # What docker/airflow.Dockerfile copies, and nothing else: a stale build/ in the checkout
    # would otherwise put modules in the wheel that the package list leaves out.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("plugins", "trainer"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, source],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("trainyard-*.whl")
    modules = _source_modules()
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [
        m
        for m in modules
        if f"{m.replace('.', '/')}.py" not in names and f"{m.replace('.', '/')}/__init__.py" not in names
    ]
    assert missing == [], f"modules left out of the wheel (list their package in pyproject.toml): {missing}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = venv / "bin" / "python"
    fresh_site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The dependencies come from the test venv's site-packages as a plain path entry, which (unlike
    # a site dir) does not run its .pth files, so the editable finder for the checkout stays out.
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    # Nothing but the fresh venv's own site-packages (and the .pth above) may supply a module.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    code = (
        "import importlib, json, sys\n"
        "files = {m: importlib.import_module(m).__file__ for m in sys.argv[1:]}\n"
        "print(json.dumps(files))\n"
    )
    done = subprocess.run(
        [python, "-c", code, *modules],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=clean,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    outside = {m: f for m, f in files.items() if not f.startswith(str(fresh_site))}
    assert outside == {}, f"imported from outside the installed wheel: {outside}"

    script = venv / "bin" / "trainyard"
    assert script.exists(), "the wheel installs no `trainyard` command"
    usage = subprocess.run(
        [script, "--help"], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean
    )
    assert usage.returncode == 0 and "lint" in usage.stdout, usage.stderr[-2000:]
