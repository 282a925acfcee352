"""DAG parsing cost: dags folders with 1, 200 and 1,000 generated pipelines (prod environment).

Each loader file is parsed the way Airflow's dag-processor parses it: in a fresh process, after the
Airflow modules the file imports were pre-imported (``[dag_processor] parsing_pre_import_modules``,
done once in the parent before it forks a parser per file), timing only the DagBag fill of that
file. The best of several repeats is kept.

Printed per folder: the summed parse time of all loader files (what the dag-processor spends per
refresh), the slowest loader file (what bounds ``dagbag_import_timeout``), and the marginal cost
per DAG beyond the one-pipeline baseline measured in the same run. Each size is measured with the
parse cache cold (first parse after a change of every file) and warm (every later parse).
Targets: at most 2 ms per DAG beyond the first at 1,000 pipelines, no loader file over 10 s.
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
PER_DAG_TARGET_MS = 2.0
FILE_TARGET_S = 10.0

CHILD = """
import importlib, json, sys, time
from airflow.utils.file import iter_airflow_imports
for module in iter_airflow_imports(sys.argv[1]):
    importlib.import_module(module)
from airflow.dag_processing.dagbag import DagBag
start = time.perf_counter()
bag = DagBag(sys.argv[1])
elapsed = time.perf_counter() - start
assert not bag.import_errors, bag.import_errors
print(json.dumps({"seconds": elapsed, "dags": len(bag.dag_ids)}))
"""


def make_dags_folder(root: Path, count: int, loaders: list[Path] | None = None) -> Path:
    folder = root / f"dags-{count}"
    (folder / "pipelines").mkdir(parents=True)
    for loader in loaders or sorted(ROOT.glob("dags/trainyard_pipelines_*.py")):
        shutil.copy(loader, folder)
    shutil.copy(ROOT / "dags/.airflowignore", folder)
    shutil.copytree(ROOT / "dags/environments", folder / "environments")
    text = DEMO.read_text()
    for i in range(count):
        name = f"bench-pipeline-{i:04d}"
        body = text.replace("name: tweet-sentiment", f"name: {name}")
        (folder / "pipelines" / f"{name}.yaml").write_text(body)
    return folder


def parse_file(loader: Path, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(loader)], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(folder: Path, root: Path, repeats: int, warm: bool) -> dict:
    """{'total': s, 'slowest': s, 'dags': n} for the folder's loader files."""
    env = {
        **os.environ,
        "TRAINYARD_ENV": "prod",
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
        "TRAINYARD_CACHE_DIR": str(root / "cache"),
    }
    for var in ("TRAINYARD_PIPELINES_DIR", "TRAINYARD_ENVIRONMENTS_DIR"):
        env.pop(var, None)
    loaders = sorted(folder.glob("trainyard_pipelines_*.py"))
    best = {loader: float("inf") for loader in loaders}
    dags = 0
    for _ in range(repeats):
        dags = 0
        for loader in loaders:
            if not warm:
                shutil.rmtree(root / "cache", ignore_errors=True)
            result = parse_file(loader, env)
            best[loader] = min(best[loader], result["seconds"])
            dags += result["dags"]
    return {"total": sum(best.values()), "slowest": max(best.values()), "dags": dags, "files": len(loaders)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 200, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = sorted(set(args.sizes) | {1})
    results: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-") as tmp:
        root = Path(tmp)
        for count in sizes:
            folder = make_dags_folder(root, count)
            for mode in ("cold", "warm"):
                if mode == "warm":
                    measure(folder, root, 1, warm=True)  # fill the cache
                results[count, mode] = measure(folder, root, args.repeats, warm=mode == "warm")
                assert results[count, mode]["dags"] == count
            shutil.rmtree(folder)
    files = results[1, "cold"]["files"]
    print(f"DAG parsing, environment prod, {files} loader files, best of {args.repeats} fresh processes")
    header = ("pipelines", "cache", "all files (s)", "slowest file (s)", "ms per DAG")
    print("  {:>9} {:>5} {:>13} {:>16} {:>10}".format(*header))
    verdicts = []
    for count in sizes:
        for mode in ("cold", "warm"):
            r, base = results[count, mode], results[1, mode]
            per_dag = (r["total"] - base["total"]) / (count - 1) * 1000 if count > 1 else float("nan")
            note = "   (baseline: one pipeline, same run)" if count == 1 else ""
            per_dag_text = f"{per_dag:>10.2f}" if count > 1 else f"{'-':>10}"
            print(f"  {count:>9} {mode:>5} {r['total']:>13.3f} {r['slowest']:>16.3f} {per_dag_text}{note}")
            if count == max(sizes):
                verdicts.append((mode, per_dag, r["slowest"]))
    for count in sizes[1:]:
        cold, warm = results[count, "cold"]["total"], results[count, "warm"]["total"]
        print(f"  parse cache at {count}: saves {cold - warm:.3f} s per refresh ({1 - warm / cold:.0%})")
    for mode, per_dag, slowest in verdicts:
        met = per_dag <= PER_DAG_TARGET_MS and slowest <= FILE_TARGET_S
        print(
            f"  target at {max(sizes)} pipelines, cache {mode}: <= {PER_DAG_TARGET_MS} ms per DAG and no "
            f"file over {FILE_TARGET_S:.0f} s -> {'MET' if met else 'MISSED'} "
            f"({per_dag:.2f} ms, slowest {slowest:.2f} s)"
        )


if __name__ == "__main__":
    main()
