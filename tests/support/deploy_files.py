"""The deployment files read strictly (duplicate YAML keys and unpinned requirements fail), and
our cluster chart rendered as docs/deploy.md installs it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import ROOT

DOCKER = ROOT / "docker"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (YAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", line)
        assert match, f"{path.name}: '{line}' is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


# --------------------------------------------------------------------------- trainyard-cluster chart

HELM = ROOT / "helm-values"
CHART = HELM / "trainyard-cluster"
ENVIRONMENTS = ROOT / "dags" / "environments"
CLUSTER_ENVS = ("dev", "prod")
KUEUE_GROUP = "kueue.x-k8s.io"


def environment_text(name: str, mode: str = "kueue") -> str:
    """dags/environments/<name>.yaml as shipped (kueue), in priority mode with its teams
    (priority), or as it was before teams and Kueue (no-teams: one shared S3 Secret)."""
    text = (ENVIRONMENTS / f"{name}.yaml").read_text()
    if mode == "kueue":
        return text
    data = yaml.safe_load(text)
    data["kubernetes"]["scheduling"] = "priority"
    if mode == "no-teams":
        del data["kubernetes"]["scheduling"]
        data.pop("teams", None)
        data["kubernetes"].setdefault("secrets", {})["env_from"] = ["trainyard-s3-credentials"]
    else:
        assert mode == "priority", mode
    return yaml.safe_dump(data, sort_keys=False)


def chart_values(files: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    """The chart's values as docs/deploy.md installs it; `files` replaces environment YAML texts."""
    values = load_yaml(CHART / "values.yaml")
    for name in CLUSTER_ENVS:
        values = deep_merge(values, load_yaml(CHART / f"values-{name}.yaml"))
        values["environments"][name]["file"] = (files or {}).get(name) or environment_text(name)
    return deep_merge(values, overrides)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        import helm_python
    except ImportError:
        pytest.fail("helm-python-sdk is not installed: pip install -r requirements.txt")
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values=values, name="trainyard-cluster", namespace="airflow", is_install=True)
    docs = []
    for text in rendered.values():
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def is_kueue(manifest: dict[str, Any]) -> bool:
    return manifest["apiVersion"].split("/")[0] == KUEUE_GROUP


# --------------------------------------------------------------------------- strict CRD schemas


def closed_schema(schema: Any) -> Any:
    """An OpenAPI schema that, like kubernetes-validate's strict mode, refuses unknown fields.

    Every object schema with properties and no ``x-kubernetes-preserve-unknown-fields`` is closed,
    and defaulted fields are not required (the API server fills them before it validates). For
    the CRDs of the upstream charts and Kueue's.
    """
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if "(?i)" in schema.get("pattern", "")[1:]:  # Go allows inline flags anywhere, Python at the start
        schema["pattern"] = "(?i)" + schema["pattern"].replace("(?i)", "")
    if "properties" in schema:
        schema["properties"] = {k: closed_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        # the API server fills a defaulted field before it validates
        defaulted = {k for k, v in schema["properties"].items() if isinstance(v, dict) and "default" in v}
        if "required" in schema:
            schema["required"] = [k for k in schema["required"] if k not in defaulted]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed_schema(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [closed_schema(s) for s in schema[key]]
    return schema
