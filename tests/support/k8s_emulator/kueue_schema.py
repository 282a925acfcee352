"""Kueue's real CRDs (v0.19.2, ``../shared/upstream-crds/kueue``) as strict validators and defaulters.

The files are read where they are, never copied into the repository; a fresh clone without
``../shared`` still runs Kueue in the emulator, only without the schema checks and the schema's
defaults (the controllers read every optional field with Kueue's own default, so behaviour stays).

Strictness: every object schema without ``x-kubernetes-preserve-unknown-fields`` gets
``additionalProperties: false`` (the API server's ``fieldValidation=Strict``, which kubectl uses),
so a typo is refused instead of silently pruned. CEL rules (``x-kubernetes-validations``) are not
evaluated, except the ClusterQueue rules the scheduler's semantics depend on (see ``cel_errors``).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import yaml

from tests.support.paths import ROOT

from .admission import DNS1123_SUBDOMAIN
from .status import ApiError

CRD_DIR = ROOT / ".." / "shared" / "upstream-crds" / "kueue"
GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
# kind -> (plural, namespaced)
KINDS: dict[str, tuple[str, bool]] = {
    "ResourceFlavor": ("resourceflavors", False),
    "ClusterQueue": ("clusterqueues", False),
    "LocalQueue": ("localqueues", True),
    "WorkloadPriorityClass": ("workloadpriorityclasses", False),
    "Cohort": ("cohorts", False),
    "Workload": ("workloads", True),
}
PLURAL_KIND = {plural: kind for kind, (plural, _) in KINDS.items()}

_LOCK = threading.Lock()
_SCHEMAS: dict[str, dict | None] = {}
_VALIDATORS: dict[str, Any] = {}


def available() -> bool:
    """Whether the upstream CRDs are on this machine (CI has them; a fresh clone may not)."""
    return CRD_DIR.is_dir()


def schema(kind: str) -> dict | None:
    """The CRD's v1beta2 ``openAPIV3Schema`` (loaded once; ~0.5 s for Workload), or None if absent."""
    with _LOCK:
        if kind not in _SCHEMAS:
            path = CRD_DIR / f"{GROUP}_{KINDS[kind][0]}.yaml"
            loaded = None
            if path.is_file():
                loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
                with path.open() as handle:
                    crd = yaml.load(handle, Loader=loader)
                version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
                loaded = version["schema"]["openAPIV3Schema"]
            _SCHEMAS[kind] = loaded
        return _SCHEMAS[kind]


def strict(node: Any) -> Any:
    """A JSON-schema copy of an OpenAPI schema where undeclared fields are errors (see module doc)."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: ({name: strict(sub) for name, sub in value.items()} if key == "properties" else strict(value))
        for key, value in node.items()
        if key != "description"
    }
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _validator(kind: str):
    with _LOCK:
        cached = _VALIDATORS.get(kind)
    if cached is None:
        import jsonschema

        loaded = schema(kind)
        if loaded is None:
            return None
        body = strict(loaded)
        body["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server itself
        cached = jsonschema.Draft7Validator(body)
        with _LOCK:
            _VALIDATORS[kind] = cached
    return cached


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate(obj: dict) -> None:
    """Refuse ``obj`` as the API server would: 400 for an unknown field, 422 for any other error.

    ``null`` in a field that is not ``nullable`` is dropped first, as the API server prunes it.
    """
    kind = obj.get("kind")
    if obj.get("apiVersion") != API_VERSION or kind not in KINDS:
        raise ApiError(400, f"the emulator serves Kueue kinds {sorted(KINDS)} of {API_VERSION} only")
    loaded = schema(kind)
    if loaded is not None:
        _prune_nulls(loaded, obj)
    name = (obj.get("metadata") or {}).get("name") or ""
    validator = _validator(kind)
    unknown: list[str] = []
    causes: list[str] = []
    if not name:
        causes.append("metadata.name: Required value: name or generateName is required")
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        causes.append(
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
            "lower case alphanumeric characters, '-' or '.'"
        )
    if validator is not None:
        for error in sorted(validator.iter_errors(obj), key=lambda e: _path(e.path)):
            field = _path(error.path)
            if error.validator == "additionalProperties":
                known = error.schema.get("properties", {})
                unknown += [
                    f"{field}.{key}" if field else key for key in sorted(set(error.instance) - set(known))
                ]
            else:
                causes.append(f"{field or '<root>'}: Invalid value: {error.message}")
    causes += cel_errors(obj)
    if unknown:
        detail = ", ".join(f'unknown field "{field}"' for field in unknown)
        raise ApiError(
            400,
            f'{kind} in version "{VERSION}" cannot be handled as a {kind}: strict decoding error: {detail}',
        )
    if causes:
        raise ApiError(
            422,
            f'{kind}.{GROUP} "{name}" is invalid: [{", ".join(causes)}]',
            details={"name": name, "group": GROUP, "kind": kind},
        )


def _prune_nulls(node: dict, value: Any) -> None:
    if isinstance(value, dict):
        properties = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key in list(value):
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                continue
            if value[key] is None and not sub.get("nullable"):
                del value[key]
            else:
                _prune_nulls(sub, value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _prune_nulls(node["items"], item)


def cel_errors(obj: dict) -> list[str]:
    """The ClusterQueue CEL rules whose violation would change scheduling (messages from the CRD)."""
    if obj.get("kind") != "ClusterQueue":
        return []
    spec = obj.get("spec") or {}
    errors = []
    preemption = spec.get("preemption") or {}
    borrow_policy = (preemption.get("borrowWithinCohort") or {}).get("policy", "Never")
    if preemption.get("reclaimWithinCohort", "Never") == "Never" and borrow_policy != "Never":
        errors.append(
            "spec.preemption: Invalid value: reclaimWithinCohort=Never and borrowWithinCohort.Policy!=Never"
        )
    if not spec.get("cohortName") and any(
        "borrowingLimit" in resource
        for group in spec.get("resourceGroups") or []
        for flavor in group.get("flavors") or []
        for resource in flavor.get("resources") or []
    ):
        errors.append("spec: Invalid value: borrowingLimit must be nil when cohort is empty")
    return errors


def apply_defaults(obj: dict) -> dict:
    """The schema's ``default`` values filled in, as the API server does on every write."""
    loaded = schema(obj["kind"])
    if loaded is not None:
        _default(loaded, obj)
    return obj


def _default(node: dict, value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in (node.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default(sub, value[key])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in (node.get("properties") or {}):
                    _default(extra, value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _default(node["items"], item)
