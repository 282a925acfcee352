"""One pipeline file can never take the others down: limits on size, alias expansion and nesting.

Every hostile file here is what anyone who can commit to ``dags/pipelines/`` could write. Without
the limits the alias bomb alone made the DAG file run past Airflow's 30 s import timeout (and
``trainyard lint`` past 2 GB), so every pipeline's DAG disappeared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.paths import DAGS, ROOT
from trainyard.config.errors import MAX_PROBLEMS, ConfigError
from trainyard.config.loading import available_environments, load_environment, load_pipeline, load_pipelines
from trainyard.config.yaml_source import YamlLimits, parse

DEMO = "tweet-sentiment.yaml"


def alias_bomb(levels: int = 8, width: int = 9) -> str:
    """Nine lines that expand to width**levels (43 million) strings: "billion laughs"."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "name: bomb\n" + "\n".join(lines) + "\n"


def _write_hostile(pipelines: Path) -> None:
    (pipelines / "bomb.yaml").write_text(alias_bomb())
    with (pipelines / "huge.yaml").open("w") as handle:
        handle.write("name: huge\ndescription: |\n")
        line = "  " + "x" * 98 + "\n"
        handle.write(line * (20 * 1024 * 1024 // len(line)))  # 20 MiB


def _error(path: Path, env: str = "local", environments: Path | None = None) -> ConfigError:
    environments = environments or path.parent.parent / "environments"
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, load_environment(env, environments), available_environments(environments))
    return info.value


def test_an_alias_bomb_is_refused_before_it_is_expanded(config_dirs):
    pipelines, _ = config_dirs
    (pipelines / "bomb.yaml").write_text(alias_bomb())
    error = _error(pipelines / "bomb.yaml")
    assert error.file.name == "bomb.yaml"
    text = str(error)
    assert "expands to more than 20,000 YAML nodes" in text and "max_nodes" in text
    assert len(text) < 1000


def test_aliases_within_the_limit_still_work():
    data = parse("base: &base {lr: 1, epochs: 2}\na: *base\nb: [*base, *base]\n", Path("ok.yaml"))
    assert data["a"] == data["b"][1] == {"lr": 1, "epochs": 2}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: x\na: &a [1, *a]\n", "refers to the structure it is part of"),
        ("name: x\nx: " + "[" * 100 + "]" * 100 + "\n", "nested more than 32 levels deep"),
        ("name: x\nx: " + "[" * 5000 + "]" * 5000 + "\n", "nesting depth"),  # libyaml's own limit
    ],
    ids=["recursive-alias", "deep-nesting", "very-deep-nesting"],
)
def test_recursive_and_deeply_nested_documents_are_refused(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse(text, tmp_path / "x.yaml")


def test_a_file_over_the_size_limit_is_refused_unread(config_dirs):
    pipelines, _ = config_dirs
    _write_hostile(pipelines)
    error = _error(pipelines / "huge.yaml")
    assert "file is 20.0 MiB, over the limit of 1.0 MiB" in str(error)
    assert "pipeline_files.max_bytes" in str(error)


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ("{max_bytes: 1024}", "file is {size:,} bytes, over the limit of 1,024 bytes"),
        ("{max_nodes: 100}", "expands to more than 100 YAML nodes"),
        ("{max_depth: 3}", "nested more than 3 levels deep"),
    ],
)
def test_the_limits_are_set_per_environment(config_dirs, limits, fragment):
    pipelines, environments = config_dirs
    # The demo file plus 20 recipients: well over the smallest max_nodes (100) whatever the demo drops.
    recipients = ", ".join(f"r{i}@example.com" for i in range(20))
    (pipelines / DEMO).write_text(
        f"{(pipelines / DEMO).read_text()}notifications: {{email: [{recipients}]}}\n"
    )
    size = (pipelines / DEMO).stat().st_size
    assert 1024 < size < 10 * 1024
    local = (environments / "local.yaml").read_text()
    (environments / "local.yaml").write_text(f"{local}pipeline_files: {limits}\n")
    assert fragment.format(size=size) in str(_error(pipelines / DEMO, environments=environments))
    load_pipeline(  # the other environments keep their own (default) limits
        pipelines / DEMO, load_environment("prod", environments), available_environments(environments)
    )


def test_limits_cannot_be_switched_off():
    with pytest.raises(ValueError, match="less than or equal to 67108864"):
        YamlLimits(max_bytes=10**12)


def test_a_device_or_pipe_is_not_read(config_dirs):
    pipelines, _ = config_dirs
    os.mkfifo(pipelines / "pipe.yaml")  # reading it would block the DAG processor forever
    error = _error(pipelines / "pipe.yaml")
    assert "not a regular file" in str(error)


def test_errors_never_render_a_huge_value(config_dirs):
    pipelines, _ = config_dirs
    text = (pipelines / DEMO).read_text()
    huge = "y" * 600_000
    (pipelines / DEMO).write_text(text.replace("owner: nlp-team@example.com", f"owner: [{huge}]"))
    error = str(_error(pipelines / DEMO))
    assert "owner" in error and "600,000 characters" not in error  # the value is shortened by repr
    assert len(error) < 2000


def test_a_report_lists_the_first_problems_and_counts_the_rest(config_dirs):
    pipelines, _ = config_dirs
    text = (pipelines / DEMO).read_text()
    extra = "".join(f"bogus_{i}: 1\n" for i in range(300))
    (pipelines / DEMO).write_text(text + extra)
    error = _error(pipelines / DEMO)
    assert len(error.problems) == 300
    rendered = str(error)
    assert rendered.count("unknown field") == MAX_PROBLEMS
    assert f"... and {300 - MAX_PROBLEMS} more" in rendered


def test_hostile_files_become_placeholders_and_the_good_dag_keeps_loading(config_dirs):
    """In a fresh interpreter, as the dag-processor parses: fast, and every file accounted for."""
    pipelines, _ = config_dirs
    _write_hostile(pipelines)
    code = textwrap.dedent(
        f"""
        import json, time
        from airflow.dag_processing.dagbag import DagBag
        from tests.support.memory import peak_rss_mb
        start = time.perf_counter()
        bag = DagBag({str(DAGS)!r})
        print(json.dumps({{
            "seconds": time.perf_counter() - start,
            "import_errors": list(bag.import_errors),
            "dags": {{d: sorted(bag.dags[d].tags) for d in bag.dag_ids}},
            "docs": {{d: bag.dags[d].doc_md for d in bag.dag_ids}},
            "rss_mb": peak_rss_mb(),
        }}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, timeout=120
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["import_errors"] == []
    assert set(result["dags"]) == {"tweet-sentiment", "bomb", "huge"}
    assert "trainyard:invalid" not in result["dags"]["tweet-sentiment"]
    for bad, fragment in (("bomb", "YAML nodes"), ("huge", "over the limit of 1.0 MiB")):
        assert "trainyard:invalid" in result["dags"][bad]
        assert f"{bad}.yaml" in result["docs"][bad] and fragment in result["docs"][bad]
    # Unbounded, the bomb alone ran past Airflow's 30 s import timeout and 2 GB.
    assert result["seconds"] < 15, result
    assert result["rss_mb"] < 1024, result


def test_lint_names_every_hostile_file_quickly_and_in_bounded_memory(config_dirs):
    pipelines, _ = config_dirs
    _write_hostile(pipelines)
    code = (
        "import sys\n"
        "from tests.support.memory import peak_rss_mb\n"
        "from trainyard.cli.main import main\n"
        "code = main(['lint'])\n"
        "print(f'peak_mb={peak_rss_mb():.0f}', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    lint = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert lint.returncode == 1
    for env in ("local", "dev", "prod"):
        assert f"[{env}] {pipelines / 'bomb.yaml'}" in lint.stderr
        assert f"[{env}] {pipelines / 'huge.yaml'}" in lint.stderr
    assert len(lint.stderr) < 20_000
    peak_mb = int(lint.stderr.rsplit("peak_mb=", 1)[1])
    assert peak_mb < 512, f"lint peaked at {peak_mb} MB (unbounded, the bomb took over 2 GB)"


def test_the_good_pipelines_load_beside_every_hostile_file(config_dirs):
    pipelines, environments = config_dirs
    _write_hostile(pipelines)
    (pipelines / "deep.yaml").write_text("name: deep\nx: " + "[" * 900 + "]" * 900 + "\n")
    (pipelines / "binary.yaml").write_bytes(b"name: bin\n\xff\xfe\x00")
    good, errors = load_pipelines(load_environment("prod", environments), pipelines, environments)
    assert [p.name for p in good] == ["tweet-sentiment"]
    assert sorted(e.file.name for e in errors) == ["binary.yaml", "bomb.yaml", "deep.yaml", "huge.yaml"]
    assert "not UTF-8" in str(next(e for e in errors if e.file.name == "binary.yaml"))
