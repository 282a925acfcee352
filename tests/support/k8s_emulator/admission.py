"""Admission, in the real API server's order: validation, defaulting, PriorityClass, ResourceQuota.

Each step answers like the real server (422 ``Invalid`` listing every field error, 403 with the
admission plugin's own message), because the operator decides from those answers whether a pod
failure is worth a retry. Validation is against the strict Kubernetes OpenAPI schema that
``kubernetes_validate`` bundles (unknown fields are errors), plus the rules a schema cannot express.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from kubernetes.utils import quantity as k8s_quantity

from .status import ApiError, forbidden, invalid
from .store import now

NATIVE_RESOURCES = {"cpu", "memory", "ephemeral-storage", "hugepages-1Gi", "hugepages-2Mi"}
# Resources for which quota admission demands an explicit value on every container (the real rule).
QUOTA_MUST_SPECIFY = {"cpu", "memory", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ENV_VAR_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# The server's quantity grammar; kubernetes' own parse_quantity is laxer (it takes "1K", "NaN").
_QUANTITY = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_BINARY_SUFFIXES = [
    (2 ** (10 * power), suffix) for power, suffix in enumerate(["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"], 1)
]

# ---------------------------------------------------------------------------------------- quantities


def parse_quantity(value: Any) -> Decimal:
    """A quantity (``"500m"``, ``"1Gi"``, ``2``) as a Decimal; ValueError where the server would refuse it."""
    text = "" if isinstance(value, bool) else str(value).strip()
    if not _QUANTITY.match(text):
        raise ValueError(value)
    return k8s_quantity.parse_quantity(text)


def format_quantity(value: Decimal, binary: bool = False) -> str:
    """Close to the server's canonical form, as its quota messages print it: ``2``, ``500m``, ``4Gi``."""
    if value == value.to_integral_value():
        integer = int(value)
        for unit, suffix in reversed(_BINARY_SUFFIXES if binary and integer else []):
            if integer % unit == 0:
                return f"{integer // unit}{suffix}"
        return str(integer)
    milli = value * 1000
    if milli == milli.to_integral_value():
        return f"{int(milli)}m"
    return f"{int((value * 10**9).to_integral_value())}n"


# ---------------------------------------------------------------------------------------- validation

_VALIDATOR = None
_VALIDATOR_LOCK = threading.Lock()


def _schema_validator():
    """A Draft 2020-12 validator over kubernetes_validate's bundled *strict* Pod schema (built once)."""
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
    causes = []
    for error in sorted(_schema_validator().iter_errors(pod), key=lambda e: list(map(str, e.path))):
        field = _field_path(error.path)
        if error.validator == "additionalProperties":
            for name in sorted(set(error.instance) - set(error.schema.get("properties", {}))):
                path = f"{field}.{name}" if field else name
                causes.append(
                    {"reason": "FieldValueInvalid", "message": f'unknown field "{path}"', "field": path}
                )
        elif error.validator == "required":
            for name in re.findall(r"'([^']+)' is a required property", error.message) or [""]:
                path = f"{field}.{name}" if field else name
                causes.append({"reason": "FieldValueRequired", "message": "Required value", "field": path})
        else:
            message = f"Invalid value: {error.message}"
            causes.append({"reason": "FieldValueInvalid", "message": message, "field": field})
    return causes


def semantic_errors(pod: dict) -> list[dict[str, str]]:
    """The API server's validation rules that a JSON schema cannot express."""
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
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            bad(
                f"metadata.labels[{key}]",
                f'Invalid value: "{value}": a valid label must be an empty string or consist '
                "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                "alphanumeric character",
            )
    spec = pod.get("spec") or {}
    if not spec.get("containers"):
        bad("spec.containers", "Required value", "FieldValueRequired")
    seen: set[str] = set()
    volume_names = {volume.get("name") for volume in spec.get("volumes") or []}
    for index, container in enumerate(spec.get("containers") or []):
        where = f"spec.containers[{index}]"
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
        causes += _resource_errors(where, container.get("resources") or {})
    for index, volume in enumerate(spec.get("volumes") or []):
        if len([key for key in volume if key != "name"]) != 1:
            bad(f"spec.volumes[{index}]", "Invalid value: must specify exactly 1 volume type")
    if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never"):
        bad("spec.restartPolicy", f'Unsupported value: "{spec["restartPolicy"]}"', "FieldValueNotSupported")
    return causes


def _resource_errors(where: str, resources: dict) -> list[dict[str, str]]:
    """Quantities parse; requests <= limits; extended resources (``nvidia.com/gpu``) need request == limit."""
    causes = []
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    parsed: dict[str, dict[str, Decimal]] = {"limits": {}, "requests": {}}
    for section, values in (("limits", limits), ("requests", requests)):
        for resource, quantity in values.items():
            try:
                parsed[section][resource] = parse_quantity(quantity)
            except ValueError:
                causes.append(
                    {
                        "reason": "FieldValueInvalid",
                        "field": f"{where}.resources.{section}[{resource}]",
                        "message": f'Invalid value: "{quantity}": quantities must match the regular '
                        "expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                    }
                )
    for resource, quantity in parsed["requests"].items():
        limit = parsed["limits"].get(resource)
        extended = (
            resource not in NATIVE_RESOURCES and "/" in resource and not resource.startswith("kubernetes.io/")
        )
        if extended and limit is None:
            causes.append(
                {
                    "reason": "FieldValueRequired",
                    "field": f"{where}.resources.limits",
                    "message": "Required value: Limit must be set for non overcommitable resources",
                }
            )
        elif extended and limit != quantity:
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": f"{where}.resources.requests",
                    "message": f'Invalid value: "{requests[resource]}": must be equal to '
                    f"{resource} limit of {limits[resource]}",
                }
            )
        elif not extended and limit is not None and quantity > limit:
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": f"{where}.resources.requests",
                    "message": f'Invalid value: "{requests[resource]}": must be less than or '
                    f"equal to {resource} limit of {limits[resource]}",
                }
            )
    return causes


def not_emulated(pod: dict) -> list[str]:
    """Valid pod features the kubelet here does not run: refused, so no test passes on a half-run pod."""
    spec = pod["spec"]
    found = [f"spec.{key}" for key in ("initContainers", "ephemeralContainers") if spec.get(key)]
    if not pod["metadata"].get("name"):
        found.append("metadata.generateName")
    if len(spec["containers"]) > 1:
        found.append("more than one container")
    for volume in spec.get("volumes") or []:
        found += [
            f"{kind} volumes" for kind in volume if kind not in ("name", "emptyDir", "persistentVolumeClaim")
        ]
    for container in spec["containers"]:
        if container.get("workingDir"):
            found.append("workingDir")
        for source in container.get("envFrom") or []:
            found += [f"envFrom.{kind}" for kind in source if kind not in ("prefix", "secretRef")]
        for item in container.get("env") or []:
            found += [
                f"env.valueFrom.{kind}" for kind in item.get("valueFrom") or {} if kind != "secretKeyRef"
            ]
    return sorted(set(found))


def validate(pod: dict) -> None:
    """422 with every field error, as the server answers; then 400 for what the emulator cannot run."""
    name = pod["metadata"].get("name") or ""
    causes = schema_errors(pod)
    causes += [] if causes else semantic_errors(pod)
    if causes:
        details = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
        raise invalid(name, f"[{details}]", causes)
    unsupported = not_emulated(pod)
    if unsupported:
        raise ApiError(400, f"the Kubernetes emulator does not run {', '.join(unsupported)} (pod {name!r})")


# ---------------------------------------------------------------------------------------- defaulting


def apply_defaults(pod: dict, namespace: str) -> None:
    """What API defaulting adds, visible to the operator in every pod it reads back."""
    meta, spec = pod["metadata"], pod["spec"]
    meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=now())
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
                "key": f"node.kubernetes.io/{taint}",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
            for taint in ("not-ready", "unreachable")
        ],
    )
    for container in spec["containers"]:
        tag = container["image"].rsplit("/", 1)[-1]
        latest = ":" not in tag or tag.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if latest and "@" not in tag else "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        resources = container.setdefault("resources", {})
        for resource, quantity in (resources.get("limits") or {}).items():  # requests default to limits
            resources.setdefault("requests", {}).setdefault(resource, quantity)
    pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}


def _qos_class(spec: dict) -> str:
    requests = [(c.get("resources") or {}).get("requests") or {} for c in spec["containers"]]
    limits = [(c.get("resources") or {}).get("limits") or {} for c in spec["containers"]]
    if not any(requests) and not any(limits):
        return "BestEffort"
    guaranteed = all(
        lim.get(r) is not None and req.get(r, lim[r]) == lim[r]
        for req, lim in zip(requests, limits, strict=True)
        for r in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


# ------------------------------------------------------------------------------ priority and quota


def admit_priority(pod: dict, priority_classes: dict[str, dict]) -> None:
    """The Priority plugin: the class must exist (403), and it sets ``priority`` and the preemption policy."""
    spec, name = pod["spec"], pod["metadata"]["name"]
    class_name = spec.get("priorityClassName")
    priority_class = priority_classes.get(class_name) if class_name else None
    if class_name and priority_class is None:
        raise forbidden(name, f"no PriorityClass with name {class_name} was found")
    value = priority_class["value"] if priority_class else 0
    if "priority" in spec and spec["priority"] != value:
        raise forbidden(
            name,
            f"the integer value of priority ({spec['priority']}) must not be provided in pod spec; "
            f"priority admission controller computed {value} from the given PriorityClass name",
        )
    spec["priority"] = value
    spec.setdefault(
        "preemptionPolicy", priority_class["preemptionPolicy"] if priority_class else "PreemptLowerPriority"
    )


def pod_usage(pod: dict) -> dict[str, Decimal]:
    """What one pod counts against a quota: ``pods``, ``requests.<r>``, ``limits.<r>``, native ``<r>``."""
    usage: dict[str, Decimal] = {"pods": Decimal(1), "count/pods": Decimal(1)}
    for section in ("requests", "limits"):
        totals: dict[str, Decimal] = {}
        for container in pod["spec"]["containers"]:
            for resource, quantity in ((container.get("resources") or {}).get(section) or {}).items():
                totals[resource] = totals.get(resource, Decimal(0)) + parse_quantity(quantity)
        for resource, total in totals.items():
            usage[f"{section}.{resource}"] = total
            if section == "requests" and resource in NATIVE_RESOURCES:
                usage[resource] = total
    return usage


def namespace_usage(pods: Iterable[dict]) -> dict[str, Decimal]:
    """What the pods that are not finished hold, as quota admission counts it."""
    used: dict[str, Decimal] = {}
    for pod in pods:
        if pod["status"].get("phase") not in ("Succeeded", "Failed"):
            for resource, quantity in pod_usage(pod).items():
                used[resource] = used.get(resource, Decimal(0)) + quantity
    return used


def admit_quota(pod: dict, quotas: dict[str, dict[str, str]], used: dict[str, Decimal]) -> None:
    """The ResourceQuota plugin: ``must specify`` and ``exceeded quota`` (403), in quota-name order."""
    name = pod["metadata"]["name"]
    requested = pod_usage(pod)
    for quota_name, hard in sorted(quotas.items()):
        missing: dict[str, list[str]] = {}
        for container in pod["spec"]["containers"]:
            resources = container.get("resources") or {}
            for resource in sorted(set(hard) & QUOTA_MUST_SPECIFY):
                section, _, base = resource.rpartition(".")
                if base not in (resources.get(section or "requests") or {}):
                    missing.setdefault(resource, []).append(container["name"])
        if missing:
            detail = "; ".join(
                f"{res} for: {','.join(sorted(names))}" for res, names in sorted(missing.items())
            )
            raise forbidden(name, f"failed quota: {quota_name}: must specify {detail}")
        exceeded = [
            resource
            for resource in sorted(hard)
            if requested.get(resource)
            and used.get(resource, Decimal(0)) + requested[resource] > parse_quantity(hard[resource])
        ]
        if exceeded:
            requested_text, used_text = (
                ",".join(
                    f"{r}={format_quantity(v.get(r, Decimal(0)), hard[r].endswith('i'))}" for r in exceeded
                )
                for v in (requested, used)
            )
            limited = ",".join(f"{r}={hard[r]}" for r in exceeded)
            raise forbidden(
                name,
                f"exceeded quota: {quota_name}, requested: {requested_text}, used: {used_text}, "
                f"limited: {limited}",
            )
