"""DAG parsing cost: a dags folder with N generated pipelines, parsed into a DagBag (prod environment).

Airflow re-parses every DAG file every 30 s, so what matters is the marginal cost per pipeline.
Each measurement runs in a fresh interpreter (as Airflow's DAG processor does) and times only
the DagBag fill; the best of several repeats is reported. Target: 200 pipelines within 1 s of one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dags/pipelines/tweet-sentiment.yaml"

CHILD = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
start = time.perf_counter()
bag = DagBag(sys.argv[1])
elapsed = time.perf_counter() - start
assert not bag.import_errors, bag.import_errors
print(json.dumps({"seconds": elapsed, "dags": len(bag.dag_ids)}))
"""


def make_dags_folder(root: Path, count: int) -> Path:
    folder = root / f"dags-{count}"
    (folder / "pipelines").mkdir(parents=True)
    shutil.copy(ROOT / "dags/trainyard_pipelines.py", folder)
    shutil.copy(ROOT / "dags/.airflowignore", folder)
    shutil.copytree(ROOT / "dags/environments", folder / "environments")
    text = DEMO.read_text()
    for i in range(count):
        name = f"bench-pipeline-{i:04d}"
        body = text.replace("name: tweet-sentiment", f"name: {name}")
        (folder / "pipelines" / f"{name}.yaml").write_text(body)
    return folder


def parse_seconds(folder: Path, airflow_home: Path, repeats: int) -> float:
    env = {
        **os.environ,
        "TRAINYARD_ENV": "prod",
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
    }
    env.pop("TRAINYARD_PIPELINES_DIR", None)
    env.pop("TRAINYARD_ENVIRONMENTS_DIR", None)
    best = float("inf")
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder)], env=env, capture_output=True, text=True, check=True
        ).stdout
        best = min(best, json.loads(out.strip().splitlines()[-1])["seconds"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipelines", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-") as tmp:
        root = Path(tmp)
        one = parse_seconds(make_dags_folder(root, 1), root / "airflow", args.repeats)
        many = parse_seconds(make_dags_folder(root, args.pipelines), root / "airflow", args.repeats)
    marginal = many - one
    per_dag_ms = marginal / (args.pipelines - 1) * 1000
    print(f"DAG parsing, environment prod, best of {args.repeats} fresh interpreters")
    print(f"  {'pipelines':>10} {'DagBag fill (s)':>16}")
    print(f"  {1:>10} {one:>16.3f}   (baseline: one pipeline, same run)")
    print(f"  {args.pipelines:>10} {many:>16.3f}")
    extra = args.pipelines - 1
    print(f"  marginal cost: {marginal:.3f} s for {extra} more pipelines = {per_dag_ms:.2f} ms per DAG")
    verdict = "MET" if marginal <= 1.0 else "MISSED"
    print(f"  target: at most 1 s for {args.pipelines} beyond the cost of one -> {verdict}")


if __name__ == "__main__":
    main()
