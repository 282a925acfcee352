"""A strict, in-process emulator of the Kubernetes API server (and a kubelet) for tests.

No cluster, Docker engine or internet exists on the development and CI machines, so the tests point
the *real* ``KubernetesPodOperator`` (sync and deferrable modes, i.e. the ``kubernetes`` and
``kubernetes_asyncio`` clients) at this emulator over plain HTTP through a kubeconfig::

    with KubernetesEmulator() as k8s:
        k8s.add_namespace("ml")
        k8s.add_priority_class("trainyard-dev", 1000)
        kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
        ...  # KubernetesPodOperator(config_file=str(kubeconfig), in_cluster=False, namespace="ml", ...)

What is real and what is emulated:

* **API server.** JSON over HTTP/1.1 with bearer-token auth, real ``Status`` error objects, resource
  versions, label selectors (``=``, ``==``, ``!=``, ``key``, ``!key``, ``in``, ``notin``), field selectors
  (a per-kind whitelist; others are 400 like the real server), watches (``?watch=true``, newline-delimited
  watch events), strategic-merge / merge / JSON patches of ``metadata.labels`` and ``annotations`` (other
  fields: 422 like the real "pod updates may not change fields" rule) and graceful deletion.
* **Admission**, in the real order: schema validation against the bundled Kubernetes OpenAPI schema
  (``kubernetes_validate``, strict: unknown fields are errors) plus a few semantic rules (names,
  duplicate containers, extended resources, requests <= limits) -> 422 ``Invalid`` listing every field
  error; namespace must exist -> 404; PriorityClass must exist -> 403; ResourceQuota ``must specify`` and
  ``exceeded quota`` -> 403 with the real messages; an existing name -> 409 ``AlreadyExists``.
* **Kubelet.** The first container's ``command + args`` runs as a local process (an argv list, never a
  shell) in its own process group, with a minimal environment (``PATH`` with this venv's ``bin`` first,
  so ``python`` is the venv's python; ``HOME``; ``LANG``) plus the pod's ``env`` and ``envFrom``; Secret
  references are resolved from :meth:`KubernetesEmulator.add_secret` values *in the process environment
  only* (a missing Secret or key leaves the container waiting in ``CreateContainerConfigError`` until it
  appears, as a real kubelet does). ``$(VAR)`` references are expanded like Kubernetes does. Init
  containers run first, in order. Other app containers (e.g. a sidecar) are not executed: their status
  mirrors the first container's.
* **Mounts (the emulator's stand-in).** Every volume gets a local directory: ``emptyDir`` one per pod,
  ``persistentVolumeClaim`` one per (namespace, claim) that outlives pods (so a relaunched pod sees the
  previous pod's checkpoints; see :meth:`KubernetesEmulator.add_persistent_volume_claim`), ``secret``
  volumes a directory of files, ``hostPath`` the path itself. Because a process cannot see
  ``/cache/huggingface``, any env value, command/args element or ``workingDir`` that equals a
  volumeMount's ``mountPath`` or lies under it is rewritten to the local directory (``/tmp`` and
  ``/dev/shm`` exist locally and are left alone). The working directory is a per-pod temp dir unless
  ``workingDir`` maps to a mount.
* **Images** are not pulled: an image whose name contains ``does-not-exist`` waits in ``ErrImagePull`` and
  then ``ImagePullBackOff`` forever; any other image "is present". A command that is not found on the
  pod's ``PATH`` fails the container with ``StartError`` / exit code 128, like containerd.
* **Logs** are stdout+stderr merged, one timestamp per line taken when the line is read (a process that
  block-buffers its stdout, as Python does without a TTY, shows its lines late, as in a real container).
* **Disruptions** for tests: :meth:`~KubernetesEmulator.preempt`, :meth:`~KubernetesEmulator.evict`,
  :meth:`~KubernetesEmulator.oom_kill`; ``activeDeadlineSeconds`` is enforced (``DeadlineExceeded``).
  A preempted / evicted pod stays visible in phase ``Failed`` (as if a finalizer held it) so the
  operator and the test can read its final status; a real scheduler would also delete it.

Not emulated: ``exec``/``attach``/``portforward`` (so no ``do_xcom_push`` sidecar), container restarts
(every ``restartPolicy`` behaves like ``Never``), scheduling against node capacity, ConfigMaps, Services.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import secrets as _secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["ApiError", "KubernetesEmulator"]

POLL = 0.05
NODE_NAME = "emulator-node"
K8S_VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-trainyard-emulator"}
BUILTIN_PRIORITY_CLASSES = {"system-cluster-critical": 2000000000, "system-node-critical": 2000001000}
UNMAPPED_PREFIXES = ("/tmp", "/dev/shm")
NATIVE_RESOURCES = {"cpu", "memory", "ephemeral-storage", "hugepages-1Gi", "hugepages-2Mi"}
# Resources for which quota admission demands an explicit value on every container (the real rule).
QUOTA_MUST_SPECIFY = {"cpu", "memory", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_VAR_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


# --------------------------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log_timestamp(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def _parse_time(value: str) -> float:
    value = value.strip()
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
    if not match:
        raise ValueError(value)
    base = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    offset = 0.0
    if match.group(3) != "Z":
        sign = 1 if match.group(3)[0] == "+" else -1
        hours, minutes = match.group(3)[1:].split(":")
        offset = sign * (int(hours) * 3600 + int(minutes) * 60)
    return base.timestamp() + float(match.group(2) or 0) - offset


_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$"
)


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes resource quantity (``"500m"``, ``"1Gi"``, ``2``) as a Decimal; ValueError if invalid."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(value)
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
        raise ValueError(value) from exc
    if match.group(2):
        return number * (Decimal(10) ** int(match.group(2)[1:]))
    return number * _SUFFIXES[match.group(3) or ""]


def format_quantity(value: Decimal, binary: bool = False) -> str:
    """Format like Kubernetes' canonical form (close enough for messages): ``2``, ``500m``, ``1Gi``."""
    if value == value.to_integral_value():
        integer = int(value)
        if binary and integer:
            for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
                unit = int(_SUFFIXES[suffix])
                if integer % unit == 0:
                    return f"{integer // unit}{suffix}"
        return str(integer)
    milli = value * 1000
    if milli == milli.to_integral_value():
        return f"{int(milli)}m"
    return f"{int((value * 10**9).to_integral_value())}n"


def _is_binary_quantity(value: Any) -> bool:
    return isinstance(value, str) and value.endswith("i")


class ApiError(Exception):
    """An error answered as a Kubernetes ``Status`` object."""

    REASONS = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        405: "MethodNotAllowed",
        409: "AlreadyExists",
        410: "Expired",
        415: "UnsupportedMediaType",
        422: "Invalid",
        500: "InternalError",
    }

    def __init__(self, code: int, message: str, reason: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or self.REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _not_found(kind: str, name: str, group: str = "") -> ApiError:
    return ApiError(404, f'{kind} "{name}" not found', details={"name": name, "group": group, "kind": kind})


# ----------------------------------------------------------------------------------------- selectors

_SELECTOR_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<val>[-A-Za-z0-9_.]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<vals>[^)]*)\)"
    r")?\s*$"
)


def _split_selector(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current)
    return [term for term in terms if term.strip()]


def parse_label_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector; ApiError(400) when malformed, as the real server answers."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_selector(selector or ""):
        match = _SELECTOR_TERM.match(term)
        if not match or (match.group("neg") and (match.group("op") or match.group("setop"))):
            raise ApiError(400, f"unable to parse requirement: found '{term.strip()}', invalid selector")
        key, op, val = match.group("key"), match.group("op"), match.group("val")
        if match.group("neg"):
            checks.append(lambda labels, k=key: k not in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=val: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=val: labels.get(k) != v)
        elif match.group("setop"):
            values = {item.strip() for item in match.group("vals").split(",") if item.strip()}
            if match.group("setop") == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels or {}) for check in checks)


FIELD_SELECTABLE = {
    "pods": {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
    },
    "events": {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
}


def parse_field_selector(selector: str, resource: str) -> Callable[[dict], bool]:
    checks = []
    for term in _split_selector(selector or ""):
        match = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not match:
            raise ApiError(400, f"invalid selector: '{selector}'; can't understand '{term}'")
        field, op, value = match.groups()
        if field not in FIELD_SELECTABLE.get(resource, set()):
            raise ApiError(400, f"field label not supported: {field}")

        def get(obj: dict, path: str = field) -> str:
            if path == "source":
                return (obj.get("source") or {}).get("component", "")
            current: Any = obj
            for part in path.split("."):
                current = (current or {}).get(part) if isinstance(current, dict) else None
            return "" if current is None else str(current)

        if op == "!=":
            checks.append(lambda obj, g=get, v=value: g(obj) != v)
        else:
            checks.append(lambda obj, g=get, v=value: g(obj) == v)
    return lambda obj: all(check(obj) for check in checks)


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1", "yes")


# ------------------------------------------------------------------------------------- schema checks

_VALIDATOR = None
_VALIDATOR_LOCK = threading.Lock()


def _schema_validator():
    """A Draft 2020-12 validator over kubernetes_validate's bundled *strict* Pod schema (cached)."""
    global _VALIDATOR
    with _VALIDATOR_LOCK:
        if _VALIDATOR is None:
            import jsonschema
            from kubernetes_validate import utils as kv
            from referencing import Registry, Resource

            version = kv.latest_version()
            schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
            schema = kv.schema_contents(f"{schema_dir}/pod-v1.json", version)
            definitions = kv.schema_contents(f"{schema_dir}/_definitions.json", version)
            registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
            _VALIDATOR = jsonschema.validators.Draft202012Validator(schema, registry=registry)
        return _VALIDATOR


def _field_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_errors(pod: dict) -> list[dict[str, str]]:
    """Field errors of ``pod`` against the strict Kubernetes schema, as Status ``causes``."""
    import kubernetes_validate

    causes = []
    for error in sorted(_schema_validator().iter_errors(pod), key=lambda e: list(map(str, e.path))):
        field = _field_path(error.path)
        if error.validator == "additionalProperties":
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            for name in unknown:
                path = f"{field}.{name}" if field else name
                causes.append(
                    {"reason": "FieldValueInvalid", "message": f'unknown field "{path}"', "field": path}
                )
            continue
        if error.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", error.message)
            for name in missing or [""]:
                path = f"{field}.{name}" if field else name
                causes.append({"reason": "FieldValueRequired", "message": "Required value", "field": path})
            continue
        causes.append(
            {"reason": "FieldValueInvalid", "message": f"Invalid value: {error.message}", "field": field}
        )
    if not causes:  # belt and braces: the library's own strict check must agree
        try:
            kubernetes_validate.validate(pod, kubernetes_validate.utils.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            field = _field_path(exc.path)
            causes.append({"reason": "FieldValueInvalid", "message": exc.message, "field": field})
    return causes


def semantic_errors(pod: dict) -> list[dict[str, str]]:
    """A few of the API server's validation rules that a JSON schema cannot express."""
    causes: list[dict[str, str]] = []

    def bad(field: str, message: str, reason: str = "FieldValueInvalid") -> None:
        causes.append({"reason": reason, "message": message, "field": field})

    metadata = pod.get("metadata") or {}
    name = metadata.get("name")
    if not name and not metadata.get("generateName"):
        bad("metadata.name", "Required value: name or generateName is required", "FieldValueRequired")
    elif name and (len(name) > 253 or not DNS1123_SUBDOMAIN.match(name)):
        bad(
            "metadata.name",
            f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
            "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )
    for key, value in (metadata.get("labels") or {}).items():
        if (
            not isinstance(value, str)
            or len(value) > 63
            or not re.match(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", value)
        ):
            bad(
                f"metadata.labels[{key}]",
                f'Invalid value: "{value}": a valid label must be an empty string or consist '
                "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                "alphanumeric character",
            )
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        bad("spec.containers", "Required value", "FieldValueRequired")
    seen: set[str] = set()
    volume_names = {volume.get("name") for volume in spec.get("volumes") or []}
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            where = f"spec.{kind}[{index}]"
            cname = container.get("name") or ""
            if not DNS1123_LABEL.match(cname) or len(cname) > 63:
                bad(
                    f"{where}.name",
                    f'Invalid value: "{cname}": a lowercase RFC 1123 label must consist of lower '
                    "case alphanumeric characters or '-'",
                )
            if cname in seen:
                bad(f"{where}.name", f'Duplicate value: "{cname}"', "FieldValueDuplicate")
            seen.add(cname)
            if not container.get("image"):
                bad(f"{where}.image", "Required value", "FieldValueRequired")
            for env_index, env in enumerate(container.get("env") or []):
                if not ENV_VAR_NAME.match(env.get("name") or ""):
                    bad(
                        f"{where}.env[{env_index}].name",
                        f'Invalid value: "{env.get("name")}": a valid environment '
                        "variable name must consist of alphabetic characters, digits, '_', '-', or '.'",
                    )
            for mount_index, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in volume_names:
                    bad(
                        f"{where}.volumeMounts[{mount_index}].name",
                        f'Not found: "{mount.get("name")}"',
                        "FieldValueNotFound",
                    )
            resources = container.get("resources") or {}
            limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
            parsed: dict[str, dict[str, Decimal]] = {"limits": {}, "requests": {}}
            for section, values in (("limits", limits), ("requests", requests)):
                for resource, quantity in values.items():
                    try:
                        parsed[section][resource] = parse_quantity(quantity)
                    except ValueError:
                        bad(
                            f"{where}.resources.{section}[{resource}]",
                            f'Invalid value: "{quantity}": quantities must match the regular '
                            "expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                        )
            for resource, quantity in parsed["requests"].items():
                limit = parsed["limits"].get(resource)
                if (
                    resource not in NATIVE_RESOURCES
                    and "/" in resource
                    and not resource.startswith("kubernetes.io/")
                ):
                    if limit is None:
                        bad(
                            f"{where}.resources.limits",
                            "Required value: Limit must be set for non overcommitable resources",
                            "FieldValueRequired",
                        )
                    elif limit != quantity:
                        bad(
                            f"{where}.resources.requests",
                            f'Invalid value: "{requests[resource]}": must be equal to '
                            f"{resource} limit of {limits[resource]}",
                        )
                elif limit is not None and quantity > limit:
                    bad(
                        f"{where}.resources.requests",
                        f'Invalid value: "{requests[resource]}": must be less than or '
                        f"equal to {resource} limit of {limits[resource]}",
                    )
    for index, volume in enumerate(spec.get("volumes") or []):
        sources = [key for key in volume if key != "name"]
        if len(sources) != 1:
            bad(f"spec.volumes[{index}]", "Invalid value: must specify exactly 1 volume type")
    if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never"):
        bad("spec.restartPolicy", f'Unsupported value: "{spec["restartPolicy"]}"', "FieldValueNotSupported")
    return causes


# --------------------------------------------------------------------------------------------- pods


class _ContainerRun:
    """One executed (or waiting) container: its log buffer and process."""

    def __init__(self, name: str):
        self.name = name
        self.lines: list[tuple[int, bytes]] = []
        self.proc: subprocess.Popen | None = None
        self.started = False
        self.finished = False
        self.exit_code: int | None = None
        self.kill_reason: str | None = None  # OOMKilled, or None for Error/Completed


class _PodRuntime:
    def __init__(self, obj: dict, root: Path):
        self.obj = obj
        self.root = root
        self.runs: dict[str, _ContainerRun] = {}
        self.thread: threading.Thread | None = None
        self.terminating = False
        self.disruption: dict | None = None  # status overrides applied when the process ends
        self.gone = False

    @property
    def key(self) -> tuple[str, str]:
        return self.obj["metadata"]["namespace"], self.obj["metadata"]["name"]

    def main_run(self) -> _ContainerRun | None:
        containers = self.obj["spec"]["containers"]
        return self.runs.get(containers[0]["name"]) if containers else None


class KubernetesEmulator:
    """A Kubernetes API server + kubelet emulator on 127.0.0.1 (see the module docstring)."""

    def __init__(self, token: str | None = None, log_requests: bool = False):
        self.token = token or "emulator-" + _secrets.token_hex(8)
        self.log_requests = log_requests
        self.requests_log: list[tuple[str, str]] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._rv = 1
        self._namespaces: dict[str, dict] = {}
        self._priority_classes: dict[str, dict] = {}
        self._quotas: dict[str, dict[str, dict[str, str]]] = {}
        self._secrets: dict[str, dict[str, dict[str, str]]] = {}
        self._pvcs: dict[tuple[str, str], Path] = {}
        self._pods: dict[tuple[str, str], _PodRuntime] = {}
        self._events: list[dict] = []
        self._changes: list[tuple[int, str, str, dict]] = []  # (rv, resource, type, object snapshot)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="k8s-emulator-"))
        self.add_namespace("default")
        for name, value in BUILTIN_PRIORITY_CLASSES.items():
            self.add_priority_class(name, value)

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KubernetesEmulator:
        handler = type("Handler", (_Handler,), {"emulator": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL},
            name="k8s-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            runtimes = list(self._pods.values())
            self._changed.notify_all()
        for runtime in runtimes:
            for run in runtime.runs.values():
                _kill_group(run.proc, signal.SIGKILL)
        for runtime in runtimes:
            for run in runtime.runs.values():
                if run.proc is not None:
                    with contextlib.suppress(Exception):
                        run.proc.wait(timeout=5)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for runtime in runtimes:
            if runtime.thread is not None:
                runtime.thread.join(timeout=2)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> KubernetesEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | os.PathLike) -> Path:
        """Write a kubeconfig (context ``emulator``, bearer token) for this server and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        return path

    # ------------------------------------------------------------------------------- cluster state

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, resource: str, kind: str, obj: dict) -> None:
        self._changes.append((self._rv, resource, kind, copy.deepcopy(obj)))
        self._changed.notify_all()

    def add_namespace(self, name: str) -> None:
        with self._lock:
            self._namespaces[name] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": self._bump(),
                    "creationTimestamp": _now(),
                    "labels": {"kubernetes.io/metadata.name": name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }

    def add_priority_class(
        self,
        name: str,
        value: int,
        preemption_policy: str = "PreemptLowerPriority",
        global_default: bool = False,
    ) -> None:
        with self._lock:
            self._priority_classes[name] = {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": self._bump(),
                    "creationTimestamp": _now(),
                },
                "value": int(value),
                "preemptionPolicy": preemption_policy,
                "globalDefault": global_default,
            }

    def add_resource_quota(self, namespace: str, name: str, hard: dict[str, str]) -> None:
        for resource, quantity in hard.items():
            parse_quantity(quantity)  # raise early on a typo in the test itself
            if "/" in resource and not resource.startswith("requests.") and resource != "count/pods":
                raise ValueError(f"extended resources are quota'd as requests.<name>, not {resource!r}")
        with self._lock:
            self._quotas.setdefault(namespace, {})[name] = {key: str(value) for key, value in hard.items()}

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """A Secret with plain (not base64) values; only the kubelet's process environment sees them."""
        with self._lock:
            self._secrets.setdefault(namespace, {})[name] = dict(data)
            self._changed.notify_all()

    def add_persistent_volume_claim(self, namespace: str, name: str) -> Path:
        """A bound PVC; its local directory persists across pods (returned for assertions)."""
        with self._lock:
            directory = self._pvcs.get((namespace, name))
            if directory is None:
                directory = self._tmp / "pvc" / namespace / name
                directory.mkdir(parents=True, exist_ok=True)
                self._pvcs[(namespace, name)] = directory
                self._changed.notify_all()
            return directory

    def pods(self, namespace: str) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(r.obj) for (ns, _), r in sorted(self._pods.items()) if ns == namespace]

    def pod(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            runtime = self._pods.get((namespace, name))
            return copy.deepcopy(runtime.obj) if runtime else None

    def events(self, namespace: str, name: str | None = None) -> list[dict]:
        with self._lock:
            return [
                copy.deepcopy(e)
                for e in self._events
                if e["metadata"]["namespace"] == namespace
                and (name is None or e["involvedObject"]["name"] == name)
            ]

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        with self._lock:
            runtime = self._pods.get((namespace, name))
            if runtime is None:
                raise KeyError(f"{namespace}/{name}")
            run = runtime.runs.get(container) if container else runtime.main_run()
            return b"".join(line for _, line in (run.lines if run else [])).decode("utf-8", "replace")

    def wait_for_pod(self, namespace: str, predicate: Callable[[dict], bool], timeout: float = 30) -> dict:
        """Block until a pod in ``namespace`` satisfies ``predicate`` (called with a copy); return it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for (ns, _), runtime in sorted(self._pods.items()):
                    if ns == namespace:
                        snapshot = copy.deepcopy(runtime.obj)
                        if predicate(snapshot):
                            return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no pod in {namespace!r} matched within {timeout}s")
                self._changed.wait(min(remaining, POLL * 4))

    # -------------------------------------------------------------------------------- disruptions

    def preempt(
        self, namespace: str, name: str, grace_seconds: float | None = None, wait: bool = True
    ) -> dict:
        """Preempt a pod like the scheduler: DisruptionTarget, SIGTERM, grace period, SIGKILL, Failed."""
        return self._disrupt(
            namespace,
            name,
            grace_seconds,
            wait,
            condition_reason="PreemptionByScheduler",
            condition_message="default-scheduler: preempting to accommodate a higher priority pod",
            event=("Preempted", f"Preempted by pod {uuid.uuid4()} on node {NODE_NAME}", "Normal"),
            status_reason=None,
            status_message="Preempted in order to admit critical pod",
        )

    def evict(self, namespace: str, name: str, grace_seconds: float | None = None, wait: bool = True) -> dict:
        """Evict a pod through the Eviction API: like preempt, with reason ``Evicted``."""
        return self._disrupt(
            namespace,
            name,
            grace_seconds,
            wait,
            condition_reason="EvictionByEvictionAPI",
            condition_message="Eviction API: evicting",
            event=("Evicted", "Evicted by the Eviction API", "Warning"),
            status_reason="Evicted",
            status_message="The pod was evicted through the Eviction API",
        )

    def oom_kill(self, namespace: str, name: str, wait: bool = True) -> dict:
        """SIGKILL the pod's process as the kernel OOM killer would: terminated OOMKilled, exit 137."""
        with self._lock:
            runtime = self._require_running(namespace, name)
            run = runtime.main_run()
            assert run is not None
            run.kill_reason = "OOMKilled"
            self._event(
                runtime, "OOMKilling", f"Memory cgroup out of memory: Killed process in {name}", "Warning"
            )
        _kill_group(run.proc, signal.SIGKILL)
        return self._await_end(runtime, wait)

    def _require_running(self, namespace: str, name: str) -> _PodRuntime:
        runtime = self._pods.get((namespace, name))
        if runtime is None:
            raise KeyError(f"pod {namespace}/{name} not found")
        run = runtime.main_run()
        if run is None or run.proc is None or run.finished:
            raise RuntimeError(f"pod {namespace}/{name} has no running container")
        return runtime

    def _disrupt(
        self,
        namespace,
        name,
        grace_seconds,
        wait,
        *,
        condition_reason,
        condition_message,
        event,
        status_reason,
        status_message,
    ) -> dict:
        with self._lock:
            runtime = self._require_running(namespace, name)
            runtime.disruption = {"reason": status_reason, "message": status_message}
            self._set_condition(runtime.obj, "DisruptionTarget", "True", condition_reason, condition_message)
            self._event(runtime, *event)
            self._touch(runtime)
            grace = runtime.obj["spec"].get("terminationGracePeriodSeconds", 30)
            grace = grace if grace_seconds is None else grace_seconds
        threading.Thread(target=self._terminate, args=(runtime, grace), daemon=True).start()
        return self._await_end(runtime, wait)

    def _await_end(self, runtime: _PodRuntime, wait: bool) -> dict:
        if wait and runtime.thread is not None:
            runtime.thread.join()
        with self._lock:
            return copy.deepcopy(runtime.obj)

    def _terminate(self, runtime: _PodRuntime, grace: float) -> None:
        """SIGTERM the running container's process group, wait up to ``grace`` s, then SIGKILL."""
        with self._lock:
            if runtime.terminating:
                return
            runtime.terminating = True
            run = next((r for r in runtime.runs.values() if r.proc is not None and not r.finished), None)
            if run is not None:
                self._event(
                    runtime, "Killing", f"Stopping container {run.name}", "Normal", container=run.name
                )
        if run is None or run.proc is None:
            return
        if grace > 0:
            _kill_group(run.proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while run.proc.poll() is None and time.monotonic() < deadline and not self._stopping.is_set():
                time.sleep(POLL)
        if run.proc.poll() is None:
            _kill_group(run.proc, signal.SIGKILL)

    # --------------------------------------------------------------------------- object plumbing

    def _touch(self, runtime: _PodRuntime, kind: str = "MODIFIED") -> None:
        runtime.obj["metadata"]["resourceVersion"] = self._bump()
        self._record("pods", kind, runtime.obj)

    def _event(  # noqa: PLR0917
        self,
        runtime: _PodRuntime,
        reason: str,
        message: str,
        type_: str = "Normal",
        container: str | None = None,
        component: str = "kubelet",
    ) -> None:
        meta = runtime.obj["metadata"]
        now = _now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": meta["namespace"],
                "uid": str(uuid.uuid4()),
                "resourceVersion": self._bump(),
                "creationTimestamp": now,
            },
            "involvedObject": {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
                "apiVersion": "v1",
                "resourceVersion": meta["resourceVersion"],
            },
            "reason": reason,
            "message": message,
            "source": {"component": component, **({"host": NODE_NAME} if component == "kubelet" else {})},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": type_,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if component == "kubelet" else "",
        }
        if container:
            event["involvedObject"]["fieldPath"] = f"spec.containers{{{container}}}"
        self._events.append(event)
        self._record("events", "ADDED", event)

    @staticmethod
    def _set_condition(
        obj: dict, type_: str, status: str, reason: str | None = None, message: str | None = None
    ):
        conditions = obj["status"].setdefault("conditions", [])
        for condition in conditions:
            if condition["type"] == type_:
                if condition["status"] != status:
                    condition["lastTransitionTime"] = _now()
                condition["status"] = status
                break
        else:
            condition = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": _now()}
            conditions.append(condition)
        for key, value in (("reason", reason), ("message", message)):
            if value is None:
                condition.pop(key, None)
            else:
                condition[key] = value

    # ------------------------------------------------------------------------------------ admission

    def create_pod(self, namespace: str, body: Any, dry_run: bool = False) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the object provided is unrecognized (must be of type Pod)")
        if body.get("kind", "Pod") != "Pod" or body.get("apiVersion", "v1") != "v1":
            raise ApiError(
                400,
                f"the API version in the data ({body.get('apiVersion')}) does not match the expected "
                "API version (v1)",
            )
        pod = copy.deepcopy(body)
        pod.setdefault("apiVersion", "v1")
        pod.setdefault("kind", "Pod")
        meta = pod.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            raise ApiError(
                400, "the namespace of the provided object does not match the namespace sent on the request"
            )
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + _secrets.token_hex(3)[:5]
        name = meta.get("name") or ""
        causes = schema_errors(pod)
        causes += [] if causes else semantic_errors(pod)
        if causes:
            details = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
            raise ApiError(
                422,
                f'Pod "{name}" is invalid: [{details}]',
                details={"name": name, "kind": "Pod", "causes": causes},
            )
        with self._lock:
            if namespace not in self._namespaces:
                raise _not_found("namespaces", namespace)
            spec = pod["spec"]
            self._apply_defaults(pod, namespace)
            self._admit_priority(pod)
            self._admit_quota(pod, namespace)
            if (namespace, name) in self._pods:
                raise ApiError(409, f'pods "{name}" already exists', details={"name": name, "kind": "pods"})
            if dry_run:
                return pod
            runtime = _PodRuntime(pod, self._tmp / "pods" / namespace / f"{name}-{meta['uid'][:8]}")
            self._pods[(namespace, name)] = runtime
            meta["resourceVersion"] = self._bump()
            self._record("pods", "ADDED", pod)
            response = copy.deepcopy(pod)
            assert spec is pod["spec"]
        # Schedule and start synchronously-ish: the response already says Pending, the kubelet thread
        # brings the pod to Running within milliseconds.
        runtime.thread = threading.Thread(
            target=self._kubelet, args=(runtime,), name=f"kubelet-{name}", daemon=True
        )
        runtime.thread.start()
        return response

    def _apply_defaults(self, pod: dict, namespace: str) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
        meta.pop("resourceVersion", None)
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("securityContext", {})
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault(
            "tolerations",
            [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
        )
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            image = container["image"]
            tag = image.rsplit("/", 1)[-1]
            latest = ":" not in tag or tag.endswith(":latest")
            container.setdefault("imagePullPolicy", "Always" if latest and "@" not in tag else "IfNotPresent")
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            resources = container.setdefault("resources", {})
            # API defaulting: requests default to limits.
            for resource, quantity in (resources.get("limits") or {}).items():
                resources.setdefault("requests", {}).setdefault(resource, quantity)
        pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}

    def _admit_priority(self, pod: dict) -> None:
        spec, name = pod["spec"], pod["metadata"]["name"]
        class_name = spec.get("priorityClassName")
        if class_name:
            priority_class = self._priority_classes.get(class_name)
            if priority_class is None:
                raise ApiError(
                    403,
                    f'pods "{name}" is forbidden: no PriorityClass with name {class_name} was found',
                    details={"name": name, "kind": "pods"},
                )
        else:
            priority_class = next(
                (p for p in self._priority_classes.values() if p.get("globalDefault")), None
            )
            if priority_class is not None:
                spec["priorityClassName"] = priority_class["metadata"]["name"]
        value = priority_class["value"] if priority_class else 0
        if "priority" in spec and spec["priority"] != value:
            raise ApiError(
                403,
                f'pods "{name}" is forbidden: the integer value of priority ({spec["priority"]}) '
                f"must not be provided in pod spec; priority admission controller computed {value} from "
                "the given PriorityClass name",
                details={"name": name, "kind": "pods"},
            )
        spec["priority"] = value
        spec.setdefault(
            "preemptionPolicy",
            priority_class["preemptionPolicy"] if priority_class else "PreemptLowerPriority",
        )

    def _pod_usage(self, pod: dict) -> dict[str, Decimal]:
        usage: dict[str, Decimal] = {"pods": Decimal(1), "count/pods": Decimal(1)}
        spec = pod["spec"]
        for section in ("requests", "limits"):
            totals: dict[str, Decimal] = {}
            for container in spec["containers"]:
                for resource, quantity in ((container.get("resources") or {}).get(section) or {}).items():
                    totals[resource] = totals.get(resource, Decimal(0)) + parse_quantity(quantity)
            for container in spec.get("initContainers") or []:  # effective = max(init, sum(app))
                for resource, quantity in ((container.get("resources") or {}).get(section) or {}).items():
                    totals[resource] = max(totals.get(resource, Decimal(0)), parse_quantity(quantity))
            for resource, total in totals.items():
                usage[f"{section}.{resource}"] = total
                if section == "requests" and resource in NATIVE_RESOURCES:
                    usage[resource] = total
        return usage

    def _admit_quota(self, pod: dict, namespace: str) -> None:
        name = pod["metadata"]["name"]
        for quota_name, hard in sorted(self._quotas.get(namespace, {}).items()):
            missing: dict[str, list[str]] = {}
            for container in pod["spec"]["containers"]:
                resources = container.get("resources") or {}
                for resource in sorted(set(hard) & QUOTA_MUST_SPECIFY):
                    section, _, base = resource.rpartition(".")
                    section = section or "requests"
                    if base not in (resources.get(section) or {}):
                        missing.setdefault(resource, []).append(container["name"])
            if missing:
                detail = "; ".join(
                    f"{res} for: {','.join(sorted(names))}" for res, names in sorted(missing.items())
                )
                raise ApiError(
                    403,
                    f'pods "{name}" is forbidden: failed quota: {quota_name}: must specify {detail}',
                    details={"name": name, "kind": "pods"},
                )
            requested = self._pod_usage(pod)
            used = self._namespace_usage(namespace)
            exceeded = []
            for resource in sorted(hard):
                want = requested.get(resource, Decimal(0))
                if want and used.get(resource, Decimal(0)) + want > parse_quantity(hard[resource]):
                    exceeded.append(resource)
            if exceeded:

                def fmt(values: dict[str, Decimal], hard=hard, exceeded=exceeded) -> str:
                    return ",".join(
                        f"{r}={format_quantity(values.get(r, Decimal(0)), _is_binary_quantity(hard[r]))}"
                        for r in exceeded
                    )

                limited = ",".join(f"{r}={hard[r]}" for r in exceeded)
                raise ApiError(
                    403,
                    f'pods "{name}" is forbidden: exceeded quota: {quota_name}, requested: {fmt(requested)}, '
                    f"used: {fmt(used)}, limited: {limited}",
                    details={"name": name, "kind": "pods"},
                )

    def _namespace_usage(self, namespace: str) -> dict[str, Decimal]:
        """What the namespace's pods that are not finished hold, as quota admission counts it."""
        used: dict[str, Decimal] = {}
        for runtime in self._pods.values():
            if runtime.key[0] == namespace and runtime.obj["status"].get("phase") not in (
                "Succeeded",
                "Failed",
            ):
                for resource, quantity in self._pod_usage(runtime.obj).items():
                    used[resource] = used.get(resource, Decimal(0)) + quantity
        return used

    def quota_status(self, namespace: str, name: str) -> dict:
        with self._lock:
            hard = self._quotas.get(namespace, {}).get(name)
            if hard is None:
                raise _not_found("resourcequotas", name)
            used = self._namespace_usage(namespace)
            return {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(self._rv)},
                "spec": {"hard": dict(hard)},
                "status": {
                    "hard": dict(hard),
                    "used": {
                        r: format_quantity(used.get(r, Decimal(0)), _is_binary_quantity(hard[r]))
                        for r in hard
                    },
                },
            }

    # -------------------------------------------------------------------------------------- kubelet

    def _kubelet(self, runtime: _PodRuntime) -> None:
        try:
            self._run_pod(runtime)
        except Exception as exc:  # never leave a pod silently stuck: surface it as a failed pod
            with self._lock:
                runtime.obj["status"].update(phase="Failed", reason="EmulatorError", message=repr(exc))
                self._touch(runtime)
            raise

    def _run_pod(self, runtime: _PodRuntime) -> None:
        pod = runtime.obj
        spec, meta = pod["spec"], pod["metadata"]
        # ---- scheduling: PVCs must exist
        while True:
            with self._lock:
                if runtime.gone or self._stopping.is_set():
                    return
                missing_claims = [
                    v["persistentVolumeClaim"]["claimName"]
                    for v in spec.get("volumes", [])
                    if "persistentVolumeClaim" in v
                    and (meta["namespace"], v["persistentVolumeClaim"]["claimName"]) not in self._pvcs
                ]
                if not missing_claims:
                    spec["nodeName"] = NODE_NAME
                    self._set_condition(pod, "PodScheduled", "True")
                    self._event(
                        runtime,
                        "Scheduled",
                        f"Successfully assigned {meta['namespace']}/{meta['name']} to {NODE_NAME}",
                        component="default-scheduler",
                    )
                    pod["status"].update(
                        hostIP="127.0.0.1",
                        hostIPs=[{"ip": "127.0.0.1"}],
                        podIP="127.0.0.1",
                        podIPs=[{"ip": "127.0.0.1"}],
                        startTime=_now(),
                    )
                    self._set_condition(pod, "PodReadyToStartContainers", "True")
                    has_init = bool(spec.get("initContainers"))
                    self._set_condition(
                        pod,
                        "Initialized",
                        "False" if has_init else "True",
                        "ContainersNotInitialized" if has_init else None,
                        f"containers with incomplete status: {[c['name'] for c in spec['initContainers']]}"
                        if has_init
                        else None,
                    )
                    names = [c["name"] for c in spec["containers"]]
                    self._set_condition(
                        pod,
                        "Ready",
                        "False",
                        "ContainersNotReady",
                        f"containers with unready status: [{' '.join(names)}]",
                    )
                    self._set_condition(
                        pod,
                        "ContainersReady",
                        "False",
                        "ContainersNotReady",
                        f"containers with unready status: [{' '.join(names)}]",
                    )
                    if has_init:
                        pod["status"]["initContainerStatuses"] = [
                            _waiting_status(c, "PodInitializing") for c in spec["initContainers"]
                        ]
                    pod["status"]["containerStatuses"] = [
                        _waiting_status(c, "PodInitializing" if has_init else "ContainerCreating")
                        for c in spec["containers"]
                    ]
                    self._touch(runtime)
                    break
                if not any(c.get("type") == "PodScheduled" for c in pod["status"].get("conditions", [])):
                    message = (
                        f'0/1 nodes are available: persistentvolumeclaim "{missing_claims[0]}" not found.'
                    )
                    self._set_condition(pod, "PodScheduled", "False", "Unschedulable", message)
                    self._event(
                        runtime, "FailedScheduling", message, "Warning", component="default-scheduler"
                    )
                    self._touch(runtime)
                self._changed.wait(POLL * 4)
        volumes = self._materialize_volumes(runtime)
        deadline = spec.get("activeDeadlineSeconds")
        started_at = time.monotonic()
        if deadline:
            threading.Thread(
                target=self._deadline_watch, args=(runtime, started_at + deadline), daemon=True
            ).start()
        # ---- init containers, then the first app container
        for container in spec.get("initContainers", []):
            code = self._run_container(runtime, container, volumes, init=True)
            if code is None:
                return
            if code != 0:
                self._finish(runtime, failed_init=container["name"])
                return
        with self._lock:
            if spec.get("initContainers"):
                self._set_condition(pod, "Initialized", "True")
                pod["status"]["containerStatuses"] = [
                    _waiting_status(c, "ContainerCreating") for c in spec["containers"]
                ]
                self._touch(runtime)
        if self._run_container(runtime, spec["containers"][0], volumes, init=False) is None:
            return
        self._finish(runtime)

    def _deadline_watch(self, runtime: _PodRuntime, deadline: float) -> None:
        while time.monotonic() < deadline:
            if (
                runtime.gone
                or self._stopping.is_set()
                or runtime.obj["status"].get("phase") in ("Succeeded", "Failed")
            ):
                return
            time.sleep(POLL)
        with self._lock:
            if runtime.obj["status"].get("phase") in ("Succeeded", "Failed") or runtime.gone:
                return
            runtime.disruption = {
                "reason": "DeadlineExceeded",
                "message": "Pod was active on the node longer than the specified deadline",
            }
            self._event(runtime, "DeadlineExceeded", runtime.disruption["message"], "Normal")
            self._touch(runtime)
            grace = runtime.obj["spec"].get("terminationGracePeriodSeconds", 30)
            running = any(r.proc is not None and not r.finished for r in runtime.runs.values())
        if running:
            self._terminate(runtime, grace)
        else:  # still waiting (image pull, config error): fail it directly
            self._finish(runtime)

    def _materialize_volumes(self, runtime: _PodRuntime) -> dict[str, Path]:
        pod = runtime.obj
        namespace = pod["metadata"]["namespace"]
        paths: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes", []):
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                paths[name] = self._pvcs[(namespace, volume["persistentVolumeClaim"]["claimName"])]
            elif "hostPath" in volume:
                paths[name] = Path(volume["hostPath"]["path"])
            else:
                directory = runtime.root / "volumes" / name
                directory.mkdir(parents=True, exist_ok=True)
                if "secret" in volume:
                    with self._lock:
                        data = self._secrets.get(namespace, {}).get(volume["secret"].get("secretName"), {})
                    for key, value in data.items():
                        (directory / key).write_text(value)
                paths[name] = directory
        return paths

    def _container_env(
        self, runtime: _PodRuntime, container: dict, mounts: list[tuple[str, str]]
    ) -> dict[str, str]:
        """The container's environment; _ConfigError like the kubelet's CreateContainerConfigError."""
        pod = runtime.obj
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(runtime.root / "home"),
            "LANG": "C.UTF-8",
            "HOSTNAME": name,
        }
        (runtime.root / "home").mkdir(parents=True, exist_ok=True)
        with self._lock:
            secrets = copy.deepcopy(self._secrets.get(namespace, {}))
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                data = secrets.get(ref.get("name"))
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise _ConfigError(f'secret "{ref.get("name")}" not found')
                env.update(
                    {prefix + key: value for key, value in data.items() if C_IDENTIFIER.match(prefix + key)}
                )
            elif "configMapRef" in source and not source["configMapRef"].get("optional"):
                raise _ConfigError(f'configmap "{source["configMapRef"].get("name")}" not found')
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = _expand(item.get("value", ""), env)
                continue
            source = item["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = secrets.get(ref.get("name"))
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise _ConfigError(f'secret "{ref.get("name")}" not found')
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise _ConfigError(f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}")
                env[item["name"]] = data[ref["key"]]
            elif "fieldRef" in source:
                env[item["name"]] = _field_ref(pod, source["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in source:
                if not source["configMapKeyRef"].get("optional"):
                    raise _ConfigError(f'configmap "{source["configMapKeyRef"].get("name")}" not found')
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                section, _, base = resource.partition(".")
                value = ((container.get("resources") or {}).get(section) or {}).get(base, "0")
                env[item["name"]] = str(value)
        return {key: _map_path(value, mounts) for key, value in env.items()}

    def _run_container(
        self, runtime: _PodRuntime, container: dict, volumes: dict[str, Path], init: bool
    ) -> int | None:
        """Pull, configure, start and wait for one container; the exit code, or None if the pod went away."""
        pod = runtime.obj
        cname, image = container["name"], container["image"]
        status_key = "initContainerStatuses" if init else "containerStatuses"
        run = _ContainerRun(cname)
        with self._lock:
            runtime.runs[cname] = run
        # ---- image pull
        if "does-not-exist" in image:
            with self._lock:
                self._event(runtime, "Pulling", f'Pulling image "{image}"', container=cname)
                error = (
                    f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to '
                    f'resolve reference "{image}": {image}: not found'
                )
                self._event(
                    runtime, "Failed", f'Failed to pull image "{image}": {error}', "Warning", container=cname
                )
                self._event(runtime, "Failed", "Error: ErrImagePull", "Warning", container=cname)
                self._set_container_status(
                    runtime,
                    status_key,
                    cname,
                    state={"waiting": {"reason": "ErrImagePull", "message": error}},
                )
            for _ in range(4):
                if self._wait_gone(runtime, POLL):
                    return None
            with self._lock:
                self._event(
                    runtime, "BackOff", f'Back-off pulling image "{image}"', "Normal", container=cname
                )
                self._event(runtime, "Failed", "Error: ImagePullBackOff", "Warning", container=cname)
                self._set_container_status(
                    runtime,
                    status_key,
                    cname,
                    state={
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": f'Back-off pulling image "{image}": ErrImagePull: {error}',
                        }
                    },
                )
            while not self._wait_gone(runtime, POLL * 4):
                if runtime.disruption:  # activeDeadlineSeconds
                    return None
            return None
        with self._lock:
            self._event(
                runtime, "Pulled", f'Container image "{image}" already present on machine', container=cname
            )
        mounts = [
            (m["mountPath"].rstrip("/") or "/", str(volumes[m["name"]] / m.get("subPath", "")).rstrip("/"))
            for m in container.get("volumeMounts") or []
            if m["name"] in volumes
        ]
        mounts.sort(key=lambda pair: -len(pair[0]))
        # ---- config (secrets); retried like the kubelet until the Secret appears
        reported = None
        while True:
            try:
                env = self._container_env(runtime, container, mounts)
                break
            except _ConfigError as exc:
                if str(exc) != reported:
                    reported = str(exc)
                    with self._lock:
                        self._event(runtime, "Failed", f"Error: {exc}", "Warning", container=cname)
                        self._set_container_status(
                            runtime,
                            status_key,
                            cname,
                            state={"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}},
                        )
                with self._lock:
                    if runtime.gone or runtime.disruption or self._stopping.is_set():
                        return None
                    self._changed.wait(POLL * 4)
        argv = [
            _expand(arg, env) for arg in [*(container.get("command") or []), *(container.get("args") or [])]
        ]
        argv = [_map_path(arg, mounts) for arg in argv]
        workdir = runtime.root / "work"
        if container.get("workingDir"):
            mapped = _map_path(container["workingDir"], mounts)
            workdir = Path(mapped) if mapped != container["workingDir"] or Path(mapped).is_dir() else workdir
        workdir.mkdir(parents=True, exist_ok=True)
        executable = shutil.which(argv[0], path=env.get("PATH")) if argv else None
        if argv and "/" in argv[0] and os.access(argv[0], os.X_OK):
            executable = argv[0]
        started = _now()
        if executable is None:
            message = (
                "emulator: the image's ENTRYPOINT is unknown; give the container a command"
                if not argv
                else "failed to create containerd task: failed to create shim task: OCI runtime create "
                "failed: "
                f'runc create failed: unable to start container process: exec: "{argv[0]}": executable file '
                f"not found in $PATH: unknown"
            )
            with self._lock:
                self._event(runtime, "Failed", f"Error: {message}", "Warning", container=cname)
                run.finished, run.exit_code = True, 128
                self._set_container_status(
                    runtime,
                    status_key,
                    cname,
                    state={
                        "terminated": {
                            "exitCode": 128,
                            "reason": "StartError",
                            "message": message,
                            "startedAt": "1970-01-01T00:00:00Z",
                            "finishedAt": started,
                        }
                    },
                )
            return 128
        with self._lock:
            if runtime.gone or self._stopping.is_set():
                return None
            self._event(runtime, "Created", f"Created container: {cname}", container=cname)
            run.proc = subprocess.Popen(
                [executable, *argv[1:]],
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            run.started = True
            self._event(runtime, "Started", f"Started container {cname}", container=cname)
            image_id = (
                "docker.io/library/"
                + image.split(":")[0]
                + "@sha256:"
                + hashlib.sha256(image.encode()).hexdigest()
            )
            running = {"running": {"startedAt": started}}
            self._set_container_status(
                runtime,
                status_key,
                cname,
                state=running,
                ready=not init,
                started=True,
                imageID=image_id,
                containerID=f"containerd://{uuid.uuid4().hex}",
            )
            if not init:
                pod["status"]["phase"] = "Running"
                for condition in ("ContainersReady", "Ready"):
                    self._set_condition(pod, condition, "True")
                self._touch(runtime)
        assert run.proc.stdout is not None
        for line in iter(run.proc.stdout.readline, b""):
            with self._lock:
                run.lines.append((time.time_ns(), line))
                self._changed.notify_all()
        code = run.proc.wait()
        run.proc.stdout.close()
        exit_code = 128 - code if code < 0 else code
        with self._lock:
            run.finished, run.exit_code = True, exit_code
            reason = run.kill_reason or ("Completed" if exit_code == 0 else "Error")
            terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason}
            if exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                tail = b"".join(line for _, line in run.lines[-80:])[-2048:]
                terminated["message"] = tail.decode("utf-8", "replace")
            self._set_container_status(
                runtime,
                status_key,
                cname,
                ready=False,
                started=False,
                state={
                    "terminated": {
                        **terminated,
                        "startedAt": started,
                        "finishedAt": _now(),
                        "containerID": _find_status(pod, status_key, cname).get("containerID"),
                    }
                },
            )
            self._changed.notify_all()
        return exit_code

    def _wait_gone(self, runtime: _PodRuntime, seconds: float) -> bool:
        with self._lock:
            if not (runtime.gone or self._stopping.is_set()):
                self._changed.wait(seconds)
            return runtime.gone or self._stopping.is_set()

    def _set_container_status(self, runtime: _PodRuntime, key: str, cname: str, **fields) -> None:
        status = _find_status(runtime.obj, key, cname)
        status.update(fields)
        if not runtime.obj["spec"]["containers"] or key != "containerStatuses":
            self._touch(runtime)
            return
        main = runtime.obj["spec"]["containers"][0]["name"]
        if cname == main:  # containers that are not executed mirror the first one
            for other in runtime.obj["status"].get("containerStatuses", []):
                if other["name"] != main:
                    other.update({k: copy.deepcopy(v) for k, v in fields.items() if k != "containerID"})
        self._touch(runtime)

    def _finish(self, runtime: _PodRuntime, failed_init: str | None = None) -> None:
        with self._lock:
            pod = runtime.obj
            status = pod["status"]
            main = runtime.main_run()
            code = main.exit_code if main is not None else None
            if failed_init or runtime.disruption or code is None or code != 0:
                status["phase"] = "Failed"
            else:
                status["phase"] = "Succeeded"
            if runtime.disruption:
                if runtime.disruption.get("reason"):
                    status["reason"] = runtime.disruption["reason"]
                status["message"] = runtime.disruption["message"]
            if main is None or not main.finished:  # never started: mirror a terminated-before-start state
                for cs in status.get("containerStatuses", []):
                    if "terminated" not in cs.get("state", {}):
                        cs["state"] = {
                            "terminated": {
                                "exitCode": 137 if runtime.disruption else 1,
                                "reason": "ContainerStatusUnknown" if not runtime.disruption else "Error",
                                "finishedAt": _now(),
                            }
                        }
                        cs["ready"] = False
            for condition in ("Ready", "ContainersReady"):
                self._set_condition(
                    pod, condition, "False", "PodCompleted" if status["phase"] == "Succeeded" else "PodFailed"
                )
            self._touch(runtime)
            if pod["metadata"].get("deletionTimestamp"):
                self._remove(runtime)

    def _remove(self, runtime: _PodRuntime) -> None:
        runtime.gone = True
        if self._pods.get(runtime.key) is runtime:
            del self._pods[runtime.key]
        runtime.obj["metadata"]["resourceVersion"] = self._bump()
        self._record("pods", "DELETED", runtime.obj)

    # ------------------------------------------------------------------------------------ API verbs

    def get_pod(self, namespace: str, name: str) -> dict:
        with self._lock:
            runtime = self._pods.get((namespace, name))
            if runtime is None:
                raise _not_found("pods", name)
            return copy.deepcopy(runtime.obj)

    def delete_pod(self, namespace: str, name: str, grace: float | None) -> dict:
        with self._lock:
            runtime = self._pods.get((namespace, name))
            if runtime is None:
                raise _not_found("pods", name)
            meta = runtime.obj["metadata"]
            grace = runtime.obj["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
            running = any(r.proc is not None and not r.finished for r in runtime.runs.values())
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                meta["deletionGracePeriodSeconds"] = int(grace)
                self._touch(runtime)
            snapshot = copy.deepcopy(runtime.obj)
            if not running:
                self._remove(runtime)
                return snapshot
        threading.Thread(target=self._terminate, args=(runtime, grace), daemon=True).start()
        return snapshot

    def patch_pod(self, namespace: str, name: str, content_type: str, patch: Any) -> dict:
        with self._lock:
            runtime = self._pods.get((namespace, name))
            if runtime is None:
                raise _not_found("pods", name)
            original = copy.deepcopy(runtime.obj)
            if content_type == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise ApiError(400, "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
                updated = _apply_json_patch(original, patch)
            elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise ApiError(400, "the body of the request was in an unknown format")
                updated = _merge_patch(original, patch)
            else:
                raise ApiError(
                    415,
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/json-patch+json, application/merge-patch+json, "
                    "application/apply-patch+yaml",
                )
            for section in ("spec", "status", "kind", "apiVersion"):
                if updated.get(section) != runtime.obj.get(section):
                    raise ApiError(
                        422,
                        f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change fields '
                        "other than `spec.containers[*].image`, `spec.initContainers[*].image`, "
                        "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing "
                        "tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if "
                        "it was previously negative)",
                        details={"name": name, "kind": "Pod"},
                    )
            for key in ("name", "namespace", "uid", "creationTimestamp", "generateName"):
                if updated["metadata"].get(key) != runtime.obj["metadata"].get(key):
                    raise ApiError(
                        422,
                        f'Pod "{name}" is invalid: metadata.{key}: Invalid value: field is immutable',
                        details={"name": name, "kind": "Pod"},
                    )
            causes = [c for c in semantic_errors(updated) if c["field"].startswith("metadata")]
            if causes:
                raise ApiError(
                    422,
                    f'Pod "{name}" is invalid: {causes[0]["field"]}: {causes[0]["message"]}',
                    details={"name": name, "kind": "Pod", "causes": causes},
                )
            for key in ("labels", "annotations"):
                if updated["metadata"].get(key) is None:
                    runtime.obj["metadata"].pop(key, None)
                else:
                    runtime.obj["metadata"][key] = updated["metadata"][key]
            self._touch(runtime)
            return copy.deepcopy(runtime.obj)

    def list_objects(self, resource: str, namespace: str | None, label_selector: str, field_selector: str):
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector, resource)
        with self._lock:
            if resource == "pods":
                source = [r.obj for (ns, _), r in sorted(self._pods.items()) if namespace in (None, ns)]
            else:
                source = [e for e in self._events if namespace in (None, e["metadata"]["namespace"])]
            items = [
                copy.deepcopy(o) for o in source if labels(o["metadata"].get("labels") or {}) and fields(o)
            ]
            return items, str(self._rv), labels, fields

    def watch(  # noqa: PLR0917
        self,
        resource: str,
        namespace: str | None,
        labels,
        fields,
        since: int | None,
        initial: list[dict],
        timeout: float,
    ) -> Iterator[dict]:
        """Yield watch events (dicts) until ``timeout`` or emulator stop."""
        for obj in initial:
            yield {"type": "ADDED", "object": obj}
        with self._lock:
            position = len(self._changes) if since is None else 0
            since = since or 0
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set() and time.monotonic() < deadline:
            with self._lock:
                batch = self._changes[position:]
                position = len(self._changes)
                if not batch:
                    self._changed.wait(min(POLL * 4, max(0.0, deadline - time.monotonic())))
                    continue
            for rv, res, kind, obj in batch:
                if res != resource or rv <= since:
                    continue
                if namespace is not None and obj["metadata"].get("namespace") != namespace:
                    continue
                if labels(obj["metadata"].get("labels") or {}) and fields(obj):
                    yield {"type": kind, "object": obj}
            yield {}  # heartbeat: lets the writer notice a closed connection

    def read_log(self, namespace: str, name: str, query: dict[str, str]) -> tuple[_PodRuntime, _ContainerRun]:
        with self._lock:
            runtime = self._pods.get((namespace, name))
            if runtime is None:
                raise _not_found("pods", name)
            spec = runtime.obj["spec"]
            all_names = [c["name"] for c in spec["containers"]]
            init_names = [c["name"] for c in spec.get("initContainers") or []]
            container = query.get("container")
            if not container:
                if len(all_names) != 1:
                    raise ApiError(
                        400,
                        f"a container name must be specified for pod {name}, choose one of: "
                        f"[{' '.join(all_names)}] or one of the init containers: [{' '.join(init_names)}]",
                    )
                container = all_names[0]
            if container not in all_names + init_names:
                raise ApiError(400, f"container {container} is not valid for pod {name}")
            if _truthy(query.get("previous")):
                raise ApiError(400, f'previous terminated container "{container}" in pod "{name}" not found')
            main = runtime.main_run()
            run = runtime.runs.get(container)
            if run is None and container in all_names and main is not None:  # mirrored, never executed
                run = _ContainerRun(container)
                run.finished = True
            if run is None or not (run.started or run.finished):
                status = _find_status(
                    runtime.obj,
                    "initContainerStatuses" if container in init_names else "containerStatuses",
                    container,
                )
                reason = (status.get("state", {}).get("waiting") or {}).get("reason", "ContainerCreating")
                raise ApiError(400, f'container "{container}" in pod "{name}" is waiting to start: {reason}')
            return runtime, run

    def stream_log(self, runtime: _PodRuntime, run: _ContainerRun, query: dict[str, str]) -> Iterator[bytes]:
        timestamps, follow = _truthy(query.get("timestamps")), _truthy(query.get("follow"))
        try:
            since_ns = None
            if query.get("sinceSeconds"):
                since_ns = time.time_ns() - int(query["sinceSeconds"]) * 1_000_000_000
            elif query.get("sinceTime"):
                since_ns = int(_parse_time(query["sinceTime"]) * 1_000_000_000)
            tail = int(query["tailLines"]) if query.get("tailLines") else None
            limit = int(query["limitBytes"]) if query.get("limitBytes") else None
        except ValueError as exc:
            raise ApiError(400, f"invalid log options: {exc}") from exc
        with self._lock:
            lines = [entry for entry in run.lines if since_ns is None or entry[0] >= since_ns]
            if tail is not None:
                lines = lines[-tail:] if tail > 0 else []
            position = len(run.lines)
        sent = 0

        def render(entry: tuple[int, bytes]) -> bytes:
            return (_log_timestamp(entry[0]).encode() + b" " + entry[1]) if timestamps else entry[1]

        for entry in lines:
            chunk = render(entry)
            if limit is not None:
                if sent >= limit:
                    return
                chunk = chunk[: limit - sent]
            sent += len(chunk)
            yield chunk
        if not follow:
            return
        while not self._stopping.is_set():
            with self._lock:
                batch = run.lines[position:]
                position = len(run.lines)
                done = run.finished or runtime.gone
                if not batch and not done:
                    self._changed.wait(POLL * 4)
                    continue
            for entry in batch:
                yield render(entry)
            if done and not batch:
                return
            if not batch:
                yield b""


class _ConfigError(Exception):
    pass


def _waiting_status(container: dict, reason: str) -> dict:
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": {"waiting": {"reason": reason}},
        "lastState": {},
    }


def _find_status(pod: dict, key: str, cname: str) -> dict:
    for status in pod["status"].setdefault(key, []):
        if status["name"] == cname:
            return status
    containers = pod["spec"].get("initContainers" if key == "initContainerStatuses" else "containers") or []
    container = next(c for c in containers if c["name"] == cname)
    status = _waiting_status(container, "ContainerCreating")
    pod["status"][key].append(status)
    return status


def _qos_class(spec: dict) -> str:
    containers = spec["containers"]
    requests = [(c.get("resources") or {}).get("requests") or {} for c in containers]
    limits = [(c.get("resources") or {}).get("limits") or {} for c in containers]
    if not any(requests) and not any(limits):
        return "BestEffort"
    guaranteed = all(
        lim.get(r) is not None and req.get(r, lim[r]) == lim[r]
        for req, lim in zip(requests, limits, strict=True)
        for r in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: ``$$`` escapes, unknown references stay as written."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


def _map_path(value: str, mounts: list[tuple[str, str]]) -> str:
    """Rewrite a container path under a volumeMount's mountPath to the emulator's local directory."""
    for mount_path, local in mounts:
        if mount_path in ("/", *UNMAPPED_PREFIXES) or mount_path.startswith(
            tuple(p + "/" for p in UNMAPPED_PREFIXES)
        ):
            continue
        if value == mount_path or value.startswith(mount_path + "/"):
            return local + value[len(mount_path) :]
    return value


def _field_ref(pod: dict, path: str) -> str:
    match = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
    if match:
        return (pod["metadata"].get(match.group(1)) or {}).get(match.group(2), "")
    current: Any = pod
    for part in path.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    return "" if current is None else str(current)


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):  # strategic-merge directives ($patch, $retainKeys, ...)
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _apply_json_patch(document: dict, operations: list) -> dict:
    document = copy.deepcopy(document)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path", "")
        parts = [unquote(p).replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
        if not parts:
            raise ApiError(422, f"json patch: invalid path {path!r}")
        parent: Any = document
        for part in parts[:-1]:
            if not isinstance(parent, dict) or part not in parent:
                if op == "add" and isinstance(parent, dict):
                    parent = parent.setdefault(part, {})
                    continue
                raise ApiError(
                    422,
                    f"the server rejected our request due to an error in our request: "
                    f"doc is missing path: {path!r}",
                )
            parent = parent[part]
        leaf = parts[-1]
        if op in ("add", "replace"):
            if op == "replace" and leaf not in parent:
                raise ApiError(422, f"replace operation does not apply: doc is missing key: {path}")
            parent[leaf] = operation.get("value")
        elif op == "remove":
            if leaf not in parent:
                raise ApiError(422, f"remove operation does not apply: doc is missing path: {path}")
            del parent[leaf]
        elif op == "test":
            if parent.get(leaf) != operation.get("value"):
                raise ApiError(422, f"testing value {path} failed")
        else:
            raise ApiError(422, f"json patch: unsupported operation {op!r}")
    return document


def _kill_group(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# --------------------------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "trainyard-k8s-emulator"
    emulator: KubernetesEmulator

    def log_message(self, format: str, *args: Any) -> None:
        if self.emulator.log_requests:
            sys.stderr.write("k8s-emulator: " + format % args + "\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ---------------------------------------------------------------------------------- plumbing

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"couldn't get version/kind; json parse error: {exc}") from exc

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, content_type: str, chunks: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
                elif self.emulator._stopping.is_set():
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass

    def _dispatch(self, method: str) -> None:
        emulator = self.emulator
        self._body_read = False
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = {key: values[-1] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        with emulator._lock:
            emulator.requests_log.append((method, self.path))
        try:
            if self.headers.get("Authorization") != f"Bearer {emulator.token}":
                raise ApiError(401, "Unauthorized")
            self._route(method, path, query)
        except ApiError as exc:
            if exc.code == 404 and exc.details is None:
                with emulator._lock:
                    emulator.unknown_routes.append((method, self.path))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._read_rest()
                self._send_json(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug in the emulator: answer 500 and make it visible
            import traceback

            traceback.print_exc()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._send_json(500, ApiError(500, f"emulator error: {exc!r}").status())

    def _read_rest(self) -> None:
        if not getattr(self, "_body_read", False):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self._body_read = True

    def _body(self) -> Any:
        self._body_read = True
        return self._read_body()

    # ------------------------------------------------------------------------------------ routes

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        emulator = self.emulator
        parts = path.strip("/").split("/") if path != "/" else []
        if method == "GET" and path == "/version":
            return self._send_json(
                200,
                {
                    **K8S_VERSION,
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                },
            )
        if method == "GET" and path == "/api":
            return self._send_json(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{emulator.port}"}
                    ],
                },
            )
        if method == "GET" and path == "/api/v1":
            return self._send_json(200, _api_resource_list())
        if method == "GET" and path == "/apis":
            return self._send_json(
                200,
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": "scheduling.k8s.io",
                            "versions": [{"groupVersion": "scheduling.k8s.io/v1", "version": "v1"}],
                            "preferredVersion": {"groupVersion": "scheduling.k8s.io/v1", "version": "v1"},
                        }
                    ],
                },
            )
        if parts[:4] == ["apis", "scheduling.k8s.io", "v1", "priorityclasses"] and method == "GET":
            with emulator._lock:
                if len(parts) == 4:
                    return self._send_json(
                        200,
                        {
                            "kind": "PriorityClassList",
                            "apiVersion": "scheduling.k8s.io/v1",
                            "metadata": {"resourceVersion": str(emulator._rv)},
                            "items": copy.deepcopy(list(emulator._priority_classes.values())),
                        },
                    )
                if len(parts) == 5:
                    if parts[4] not in emulator._priority_classes:
                        raise _not_found("priorityclasses", parts[4], "scheduling.k8s.io")
                    return self._send_json(200, copy.deepcopy(emulator._priority_classes[parts[4]]))
        if parts[:2] != ["api", "v1"]:
            raise ApiError(404, "the server could not find the requested resource")
        rest = parts[2:]
        # cluster-scoped lists
        if method == "GET" and rest in (["pods"], ["events"]):
            return self._list(rest[0], None, query)
        if rest == ["namespaces"] and method == "GET":
            with emulator._lock:
                return self._send_json(
                    200,
                    {
                        "kind": "NamespaceList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(emulator._rv)},
                        "items": copy.deepcopy(list(emulator._namespaces.values())),
                    },
                )
        if len(rest) < 2 or rest[0] != "namespaces":
            raise ApiError(404, "the server could not find the requested resource")
        namespace = rest[1]
        if len(rest) == 2 and method == "GET":
            with emulator._lock:
                if namespace not in emulator._namespaces:
                    raise _not_found("namespaces", namespace)
                return self._send_json(200, copy.deepcopy(emulator._namespaces[namespace]))
        resource, sub = rest[2] if len(rest) > 2 else "", rest[3:]
        if resource == "pods":
            return self._pods(method, namespace, sub, query)
        if resource == "events" and not sub and method == "GET":
            return self._list("events", namespace, query)
        if resource == "resourcequotas" and method == "GET":
            if not sub:
                with emulator._lock:
                    names = sorted(emulator._quotas.get(namespace, {}))
                items = [emulator.quota_status(namespace, n) for n in names]
                return self._send_json(
                    200,
                    {
                        "kind": "ResourceQuotaList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(emulator._rv)},
                        "items": items,
                    },
                )
            if len(sub) == 1:
                return self._send_json(200, emulator.quota_status(namespace, sub[0]))
        if resource in ("events", "resourcequotas", "secrets", "configmaps", "services", "serviceaccounts"):
            raise ApiError(405, f"the emulator does not support {method} on {resource}")
        raise ApiError(404, "the server could not find the requested resource")

    def _list(self, resource: str, namespace: str | None, query: dict[str, str]) -> None:
        emulator = self.emulator
        items, rv, labels, fields = emulator.list_objects(
            resource, namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
        )
        if _truthy(query.get("watch")):
            since = query.get("resourceVersion")
            try:
                since_rv = int(since) if since not in (None, "", "0") else None
            except ValueError as exc:
                raise ApiError(400, f"invalid resourceVersion {since!r}") from exc
            timeout = float(query.get("timeoutSeconds") or 1800)
            initial = [] if since_rv is not None else items
            events = emulator.watch(resource, namespace, labels, fields, since_rv, initial, timeout)
            return self._send_stream(
                "application/json",
                ((json.dumps(event).encode() + b"\n") if event else b"" for event in events),
            )
        kind = "PodList" if resource == "pods" else "EventList"
        return self._send_json(
            200, {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}
        )

    def _pods(self, method: str, namespace: str, sub: list[str], query: dict[str, str]) -> None:
        emulator = self.emulator
        if not sub:
            if method == "GET":
                return self._list("pods", namespace, query)
            if method == "POST":
                body = self._body()
                return self._send_json(
                    201, emulator.create_pod(namespace, body, dry_run=bool(query.get("dryRun")))
                )
            raise ApiError(405, f"{method} is not supported on a pod collection")
        name = sub[0]
        if len(sub) == 1:
            if method == "GET":
                return self._send_json(200, emulator.get_pod(namespace, name))
            if method == "DELETE":
                body = self._body() or {}
                grace = body.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
                return self._send_json(
                    200, emulator.delete_pod(namespace, name, None if grace is None else float(grace))
                )
            if method == "PATCH":
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                return self._send_json(200, emulator.patch_pod(namespace, name, content_type, self._body()))
            raise ApiError(405, f"the emulator does not support {method} on pods")
        if sub[1:] == ["status"] and method == "GET":
            return self._send_json(200, emulator.get_pod(namespace, name))
        if sub[1:] == ["log"] and method == "GET":
            runtime, run = emulator.read_log(namespace, name, query)
            return self._send_stream("text/plain", emulator.stream_log(runtime, run, query))
        if sub[1:] == ["eviction"] and method == "POST":
            self._body()
            emulator.get_pod(namespace, name)
            try:
                emulator.evict(namespace, name, wait=False)
            except RuntimeError:  # not running: eviction simply deletes it
                emulator.delete_pod(namespace, name, None)
            return self._send_json(
                201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
            )
        if sub[1:] in (["exec"], ["attach"], ["portforward"]):
            raise ApiError(
                400, f"the Kubernetes emulator does not support pods/{sub[1]} (no websocket upgrade)"
            )
        raise ApiError(404, "the server could not find the requested resource")


def _api_resource_list() -> dict:
    def res(name: str, kind: str, verbs: list[str], namespaced: bool = True) -> dict:
        return {"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs}

    return {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            res("namespaces", "Namespace", ["get", "list"], namespaced=False),
            res("pods", "Pod", ["create", "delete", "get", "list", "patch", "watch"]),
            res("pods/log", "Pod", ["get"]),
            res("pods/status", "Pod", ["get"]),
            res("pods/eviction", "Eviction", ["create"]),
            res("events", "Event", ["get", "list", "watch"]),
            res("resourcequotas", "ResourceQuota", ["get", "list"]),
        ],
    }
