"""helm-values/ rendered through the released upstream charts, and the runtime contracts checked.

A values file can render schema-valid objects that still break pods at runtime: a Secret key
nobody creates, a git-sync flag combination git-sync v4 refuses, a server flag the image's MLflow
rejects, a ServiceMonitor aimed at a port no pod exposes, an Airflow option Airflow ignores. These
tests render every chart that docs/deploy.md installs, from the archive of the version it names
in ../shared/upstream-charts/ (never copied into the repository), with our values for dev and
prod, and check each contract against what the doc's own commands create. Where that folder is
absent (a fresh clone outside CI) they skip.
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import inspect
import json
import os
import re
import shlex
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy_files import DOCKER, closed_schema, deep_merge, load_yaml, requirement_pins
from tests.support.paths import ROOT

UPSTREAM = ROOT / ".." / "shared" / "upstream-charts"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# Rendering all charts takes several seconds (the Airflow chart alone ~2 s per release).
pytestmark = pytest.mark.slow

# Services every cluster has without any chart: the API server's, and the kubelet's that the
# Prometheus operator maintains (kube-prometheus-stack's kubelet ServiceMonitor selects it).
CLUSTER_SERVICES = [
    {
        "kind": "Service",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"},
        },
        "spec": {"ports": [{"name": "https", "port": 443}]},
    },
    {
        "kind": "Service",
        "metadata": {
            "name": "kube-prometheus-stack-kubelet",
            "namespace": "kube-system",
            "labels": {"app.kubernetes.io/name": "kubelet", "k8s-app": "kubelet"},
        },
        "spec": {
            "ports": [
                {"name": "https-metrics", "port": 10250},
                {"name": "http-metrics", "port": 10255},
                {"name": "cadvisor", "port": 4194},
            ]
        },
    },
]
# API groups the cluster serves when these charts install: kube-prometheus-stack (installed
# first, docs/deploy.md step 3) brings the monitoring CRDs.
CLUSTER_API_VERSIONS = ["monitoring.coreos.com/v1"]
CREDENTIAL_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_key|api_key)")
DEFAULT_CREDENTIAL_KEY = re.compile(r"(?i)(password|passwd|secretkey|secret_key|token)$")
POD_SPEC_PATHS = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """safe_load (libyaml's where built: the CRDs are megabytes), but a plain `=` stays a string
    (PyYAML resolves it to the unsupported !!value tag)."""


_Loader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


# --------------------------------------------------------------------------- docs/deploy.md


def _tokens(line: str) -> list[str]:
    """One shell command line as argv, cut at the first pipe or command separator."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|;&")
    lexer.whitespace_split = True
    tokens = []
    for token in lexer:
        if token in {"|", "||", "&&", ";", "&"}:
            break
        tokens.append(token)
    return tokens


@functools.cache
def doc_commands() -> tuple[tuple[str, ...], ...]:
    """Every command of the doc's bash blocks, continuation lines joined, `for` loops unrolled."""
    text = DEPLOY_DOC.read_text()
    commands: list[tuple[str, ...]] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        lines = block.replace("\\\n", " ").splitlines()
        index = 0
        while index < len(lines):
            loop = re.match(r"\s*for (\w+) in ([^;]+); do\b", lines[index])
            if not loop:
                commands.append(tuple(_tokens(lines[index])))
                index += 1
                continue
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "done")
            variable = re.compile(r"\$\{?" + loop[1] + r"\}?(?!\w)")
            for value in loop[2].split():
                commands.extend(tuple(_tokens(variable.sub(value, body))) for body in lines[index + 1 : end])
            index = end + 1
    return tuple(command for command in commands if command)


def _option(command: tuple[str, ...], *names: str) -> list[str]:
    values = []
    for index, token in enumerate(command):
        for name in names:
            if token == name and index + 1 < len(command):
                values.append(command[index + 1])
            elif token.startswith(name + "=") and name.startswith("--"):
                values.append(token.split("=", 1)[1])
    return values


@functools.cache
def documented_secrets() -> dict[tuple[str, str], frozenset[str]]:
    """(namespace, name) -> keys of every `kubectl create secret generic` in docs/deploy.md."""
    secrets: dict[tuple[str, str], frozenset[str]] = {}
    for command in doc_commands():
        if command[0] != "kubectl" or "create" not in command:
            continue
        at = command.index("create")
        if command[at + 1 : at + 3] != ("secret", "generic"):
            continue
        namespace = (_option(command, "-n", "--namespace") or ["default"])[0]
        keys = set()
        for spec in _option(command, "--from-literal"):
            keys.add(spec.split("=", 1)[0])
        for spec in _option(command, "--from-file"):
            keys.add(spec.split("=", 1)[0] if "=" in spec else Path(spec).name)
        assert not _option(command, "--from-env-file"), "list the keys: --from-literal/--from-file"
        key = (namespace, command[at + 3])
        assert secrets.get(key, frozenset(keys)) == keys, f"{key} is created twice with other keys"
        secrets[key] = frozenset(keys)
    return secrets


@dataclass(frozen=True)
class Release:
    """One `helm upgrade --install` of an upstream chart, as docs/deploy.md runs it."""

    name: str
    namespace: str
    chart: str  # repo/name
    version: str
    values: tuple[str, ...]
    set_files: tuple[str, ...]
    environment: str | None

    @property
    def id(self) -> str:
        if self.environment is None or self.name.endswith(self.environment):
            return self.name
        return f"{self.name}-{self.environment}"

    @property
    def archive(self) -> Path:
        return UPSTREAM / f"{self.chart.split('/')[-1]}-{self.version}.tgz"


def _environment(values: tuple[str, ...]) -> str | None:
    found = {m[1] for v in values if (m := re.search(r"values-(\w+)\.yaml$", v))}
    assert len(found) <= 1, values
    return found.pop() if found else None


@functools.cache
def releases() -> dict[str, Release]:
    """The doc's upstream chart installs; one with a values-prod.yaml also renders values-dev.yaml."""
    found: dict[str, Release] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for command in doc_commands():
        if command[:3] != ("helm", "upgrade", "--install") or (ROOT / command[4]).exists():
            continue  # our own chart (helm-values/trainyard-cluster) is tested in test_deploy.py
        values = tuple(_option(command, "-f", "--values"))
        (version,) = _option(command, "--version")
        (namespace,) = _option(command, "-n", "--namespace")
        variants = [values]
        if any(v.endswith("values-prod.yaml") for v in values):
            dev = tuple(v.replace("values-prod.yaml", "values-dev.yaml") for v in values)
            if all((ROOT / v).exists() for v in dev):
                variants.append(dev)
        for files in variants:
            release = Release(
                command[3], namespace, command[4], version, files, tuple(_option(command, "--set-file")),
                _environment(files),
            )  # fmt: skip
            if (release.chart, files) not in seen:
                seen.add((release.chart, files))
                found.setdefault(release.id, release)
    return found


RELEASE_IDS = sorted(releases())


def requires_upstream() -> None:
    if not UPSTREAM.is_dir():
        pytest.skip(f"{UPSTREAM.resolve()} is absent: the released charts come with shared/ (CI has it)")


# --------------------------------------------------------------------------- rendering


def release_values(release: Release) -> dict[str, Any]:
    """The -f files merged as Helm merges them, plus the --set-file values."""
    import helm_python

    values: dict[str, Any] = {}
    for path in release.values:
        values = deep_merge(values, load_yaml(ROOT / path) or {})
    for expression in release.set_files:
        key, path = expression.split("=", 1)
        values = deep_merge(values, helm_python.parse_set_file(f"{key}={ROOT / path}"))
    return values


def minimum_kubernetes() -> str:
    match = re.search(r"Kubernetes cluster \(>= (\d+\.\d+)\)", DEPLOY_DOC.read_text())
    assert match, "docs/deploy.md: state the minimum as 'a Kubernetes cluster (>= X.Y)'"
    return f"{match[1]}.0"


@functools.cache
def rendered(release_id: str) -> tuple[dict[str, Any], ...]:
    """Every object the chart renders for this release, at the documented minimum Kubernetes."""
    requires_upstream()
    import helm_python
    from helm_python import _native

    release = releases()[release_id]
    assert release.archive.exists(), f"{release.archive.name} is missing from {UPSTREAM}"
    options = {
        "name": release.name,
        "namespace": release.namespace,
        "is_install": True,
        "kube_version": minimum_kubernetes(),
        "api_versions": CLUSTER_API_VERSIONS,
    }
    with helm_python.Chart.load(str(release.archive)) as chart:
        # Chart.render() of helm-python-sdk 0.2.2 does not pass the cluster's capabilities
        # (kube_version, api_versions) that the native call it wraps accepts; without them no
        # ServiceMonitor renders. test_monitors_scrape_ports_that_exist guards against silence.
        payload = _native.call_string(
            "helm_render", chart._raw(), json.dumps(release_values(release)), json.dumps(options)
        )
    objects: list[dict[str, Any]] = []
    for path, text in sorted(json.loads(payload).items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.load_all(text, Loader=_Loader):  # a SafeLoader
            if document:
                objects.extend(document["items"] if document["kind"].endswith("List") else [document])
    return tuple(objects)


def namespace_of(obj: dict[str, Any], release: Release) -> str:
    return obj["metadata"].get("namespace") or release.namespace


def _walk_path(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def pod_templates(
    objects: tuple[dict[str, Any], ...],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, owning object, pod template) for workloads and for pod templates kept in ConfigMaps
    (the Airflow chart's KubernetesExecutor pod_template_file is how every task pod starts)."""
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in POD_SPEC_PATHS:
            yield where, obj, _walk_path(obj, POD_SPEC_PATHS[obj["kind"]])
        elif obj["kind"] == "Pod":
            yield where, obj, obj
        elif obj["kind"] == "ConfigMap":
            for key, text in (obj.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    try:
                        document = yaml.safe_load(text)
                    except yaml.YAMLError:
                        continue
                    if isinstance(document, dict) and document.get("kind") == "Pod":
                        yield f"{where}[{key}]", obj, document


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]


def secret_references(pod: dict[str, Any]) -> Iterator[tuple[str, str, str | None, bool]]:
    """(what, Secret name, key or None for the whole Secret, optional) for env, envFrom, volumes."""
    for container in containers(pod):
        for variable in container.get("env") or []:
            ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                what = f"{container['name']} env {variable['name']}"
                yield what, ref["name"], ref["key"], bool(ref.get("optional"))
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if ref:
                yield f"{container['name']} envFrom", ref["name"], None, bool(ref.get("optional"))
    for volume in pod["spec"].get("volumes") or []:
        sources = [(volume["secret"], "secretName")] if "secret" in volume else []
        sources += [
            (s["secret"], "name") for s in (volume.get("projected") or {}).get("sources", []) if "secret" in s
        ]
        for secret, name_field in sources:
            what = f"volume {volume['name']}"
            items = secret.get("items") or [{"key": None}]
            for item in items:
                yield what, secret[name_field], item["key"], bool(secret.get("optional"))


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["value"] for v in container.get("env") or [] if "value" in v}


# --------------------------------------------------------------------------- strict schemas


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> closed schema, from the CRDs the upstream charts ship."""
    requires_upstream()
    import helm_python

    schemas = {}
    for archive in sorted(UPSTREAM.glob("*.tgz")):
        with helm_python.Chart.load(str(archive)) as chart:
            for crd_file in chart.crds:
                for crd in yaml.load_all(crd_file["data"], Loader=_Loader):  # a SafeLoader
                    if not crd or crd.get("kind") != "CustomResourceDefinition":
                        continue
                    for version in crd["spec"]["versions"]:
                        api_version = f"{crd['spec']['group']}/{version['name']}"
                        schema = version["schema"]["openAPIV3Schema"]
                        schemas[(api_version, crd["spec"]["names"]["kind"])] = closed_schema(schema)
    return schemas


def _pruned(node: Any) -> Any:
    """What the API server validates: it prunes null fields of custom resources (not nullable)."""
    if isinstance(node, dict):
        return {k: _pruned(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_pruned(v) for v in node]
    return node


# --------------------------------------------------------------------------- tests: the doc


def test_doc_installs_what_the_values_files_name() -> None:
    """The doc's --version, the values files' header and the archive tested are one version."""
    assert {r.chart.split("/")[-1] for r in releases().values()} >= {
        "airflow", "mlflow", "minio", "gpu-operator", "kube-prometheus-stack",
    }  # fmt: skip
    for release in releases().values():
        for path in release.values:
            header = re.search(r"^# Chart: (\S+) (v?\d+\.\d+\.\d+)", (ROOT / path).read_text(), re.MULTILINE)
            assert header, f"{path}: name chart and version at the top"
            assert (header[1], header[2]) == (release.chart, release.version), (
                f"{path} is written for {header[1]} {header[2]}, docs/deploy.md installs "
                f"{release.chart} {release.version}"
            )
    requires_upstream()
    for release in releases().values():
        assert release.archive.exists(), f"no {release.archive.name} in {UPSTREAM}: add the released chart"


def test_doc_states_the_versions_the_charts_need() -> None:
    requires_upstream()
    minimum = tuple(int(p) for p in minimum_kubernetes().split(".")[:2])
    helm = re.search(r"`helm` \(>= (\d+)\.(\d+)\)", DEPLOY_DOC.read_text())
    assert helm, "docs/deploy.md: state the minimum as '`helm` (>= X.Y)'"
    for release in releases().values():
        with tarfile.open(release.archive) as tar:
            name = release.chart.split("/")[-1]
            readme = tar.extractfile(f"{name}/README.md") if f"{name}/README.md" in tar.getnames() else None
            chart = yaml.safe_load(tar.extractfile(f"{name}/Chart.yaml"))  # type: ignore[arg-type]
            needs = [
                tuple(map(int, m)) for m in re.findall(r">=\s*(\d+)\.(\d+)", chart.get("kubeVersion", ""))
            ]
            if readme is not None:
                text = readme.read().decode()
                needs += [tuple(map(int, m)) for m in re.findall(r"Kubernetes (\d+)\.(\d+)\+", text)]
            for need in needs:
                assert minimum >= need, f"{release.chart} needs Kubernetes >= {need}, the doc says {minimum}"
            annotations = json.dumps(chart.get("annotations", {}))
            for need in re.findall(r"Minimum Helm version was updated to (\d+)\.(\d+)", annotations):
                assert (int(helm[1]), int(helm[2])) >= tuple(map(int, need)), (
                    f"{release.chart} needs Helm {need}"
                )


# --------------------------------------------------------------------------- tests: per release


@pytest.mark.parametrize("release_id", RELEASE_IDS)
def test_renders_strictly_valid_objects(release_id: str) -> None:
    import jsonschema
    import kubernetes_validate

    objects = rendered(release_id)
    assert objects
    problems = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        schema = crd_schemas().get((obj["apiVersion"], obj["kind"]))
        try:
            if schema is not None:
                error = jsonschema.exceptions.best_match(
                    jsonschema.Draft7Validator(schema).iter_errors(_pruned(obj))
                )
                if error is not None:
                    raise error
            else:
                kubernetes_validate.validate(obj, minimum_kubernetes(), strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
            problems.append(f"{name}: {'.'.join(map(str, error.absolute_path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema ({obj['apiVersion']} is neither built in nor a chart CRD)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("release_id", RELEASE_IDS)
def test_every_secret_reference_is_created(release_id: str) -> None:
    """Each Secret and key a pod needs is rendered by the chart or created by the doc's commands
    (a missing non-optional key is CreateContainerConfigError on every pod that needs it)."""
    release = releases()[release_id]
    objects = rendered(release_id)
    available = dict(documented_secrets())
    for obj in objects:
        if obj["kind"] == "Secret":
            keys = {*(obj.get("data") or {}), *(obj.get("stringData") or {})}
            available[(namespace_of(obj, release), obj["metadata"]["name"])] = frozenset(keys)
    whole = set()  # Secrets a chart's own hook Job creates (kube-webhook-certgen's TLS Secret)
    for _, owner, pod in pod_templates(objects):
        for container in containers(pod) if owner["kind"] == "Job" else []:
            argv = _argv(container)
            if "create" in argv:
                whole |= {
                    (namespace_of(owner, release), a.split("=", 1)[1])
                    for a in argv
                    if a.startswith("--secret-name=")
                }
    problems = []
    for where, owner, pod in pod_templates(objects):
        namespace = namespace_of(owner, release)
        for what, secret, key, optional in secret_references(pod):
            keys = available.get((namespace, secret))
            if optional or (namespace, secret) in whole:
                continue
            if keys is None:
                problems.append(f"{where} {what}: Secret {namespace}/{secret} is created nowhere")
            elif key is not None and key not in keys:
                problems.append(f"{where} {what}: key {key} not in {namespace}/{secret} ({sorted(keys)})")
    assert not problems, "docs/deploy.md must create these:\n" + "\n".join(sorted(set(problems)))


def git_sync_releases() -> list[str]:
    return [
        r
        for r in RELEASE_IDS
        if ((release_values(releases()[r]).get("dags") or {}).get("gitSync") or {}).get("enabled")
    ]


@pytest.mark.parametrize("release_id", git_sync_releases())
def test_git_sync_gets_one_coherent_ref(release_id: str) -> None:
    """git-sync v4 takes GITSYNC_REF; the deprecated GIT_SYNC_BRANCH/GIT_SYNC_REV override it
    (and a branch with a rev is a fatal flag combination), so they must be empty."""
    release = releases()[release_id]
    syncs = [(w, c) for w, _, pod in pod_templates(rendered(release_id)) for c in containers(pod)]
    syncs = [(f"{w} {c['name']}", c) for w, c in syncs if "/git-sync:" in c["image"]]
    assert syncs, "git-sync is enabled but no container runs it"
    problems, refs = [], set()
    for where, container in syncs:
        if not re.search(r":v4\.", container["image"]):
            problems.append(f"{where}: runs {container['image']}; these rules are git-sync v4's")
        env = literal_env(container)
        deprecated = {k: env[k] for k in ("GIT_SYNC_BRANCH", "GIT_SYNC_REV") if env.get(k)}
        if deprecated:
            problems.append(
                f"{where}: {deprecated} override GITSYNC_REF={env.get('GITSYNC_REF')!r} "
                "(set dags.gitSync.branch and rev to '' and use dags.gitSync.ref)"
            )
        refs.add(env.get("GITSYNC_REF", ""))
    if len(refs) != 1:
        problems.append(f"containers of one release sync different refs: {sorted(refs)}")
    elif release.environment == "prod" and not re.fullmatch(r"v\d+\.\d+\.\d+", ref := next(iter(refs))):
        problems.append(f"prod runs a reviewed release tag, not {ref!r}")
    elif release.environment != "prod" and (ref := next(iter(refs))) != "main":
        problems.append(f"{release.environment} follows main, not {ref!r}")
    assert not problems, "\n".join(sorted(set(problems)))


@functools.cache
def chart_default_credentials(archive: Path) -> frozenset[str]:
    """Password-like defaults of every values.yaml in a chart archive, subcharts included."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if (
                    isinstance(value, str)
                    and value
                    and "{{" not in value
                    and DEFAULT_CREDENTIAL_KEY.search(key)
                ):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.endswith("/values.yaml"):
                walk(yaml.safe_load(tar.extractfile(member)))  # type: ignore[arg-type]
    return frozenset(found)


def _strings(node: Any, secret: bool = False) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if secret and key == "data" and isinstance(value, dict):
                yield from (base64.b64decode(v).decode(errors="replace") for v in value.values() if v)
            else:
                yield from _strings(value, secret)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, secret)
    elif isinstance(node, str):
        yield node


def _argv(container: dict[str, Any]) -> list[str]:
    tokens = []
    for arg in [*(container.get("command") or []), *(container.get("args") or [])]:
        try:
            tokens.extend(shlex.split(arg))
        except ValueError:
            tokens.extend(arg.split())
    return tokens


@pytest.mark.parametrize("release_id", RELEASE_IDS)
def test_no_default_credentials(release_id: str) -> None:
    """No password the chart ships as a default (admin/admin, console123, ...) reaches the cluster,
    and no password is written into a pod spec: passwords on a command line name an env var that
    comes from a Secret."""
    release = releases()[release_id]
    objects = rendered(release_id)
    defaults = chart_default_credentials(release.archive)
    problems = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        for text in _strings(obj, secret=obj["kind"] == "Secret"):
            hits = defaults & set(re.split(r"[\s'\"=:,;]+", text))
            if hits or text in defaults:
                problems.append(f"{name}: the chart's default credential {sorted(hits or {text})}")
    for where, _, pod in pod_templates(objects):
        for container in containers(pod):
            from_secrets = {
                v["name"] for v in container.get("env") or [] if "secretKeyRef" in (v.get("valueFrom") or {})
            }
            for variable, value in literal_env(container).items():
                if CREDENTIAL_NAME.search(variable) and value and not variable.endswith(("_FILE", "_PATH")):
                    problems.append(f"{where} {container['name']}: {variable} is a literal in the pod spec")
            argv = _argv(container)
            flags = {"--password", "--admin-password"} | ({"-p"} if "airflow" in argv else set())
            for index, token in enumerate(argv):
                value = None
                if token in flags and index + 1 < len(argv):
                    value = argv[index + 1]
                elif token.startswith("--password="):
                    value = token.split("=", 1)[1]
                if value is None:
                    continue
                variable = re.fullmatch(r"\$\(?\{?(\w+)\}?\)?", value)
                if not variable or variable[1] not in from_secrets:
                    problems.append(f"{where} {container['name']}: {token} {value!r} is not from a Secret")
    assert not problems, "\n".join(sorted(set(problems)))


def mlflow_releases() -> list[str]:
    return [r for r in RELEASE_IDS if releases()[r].chart.endswith("/mlflow")]


@pytest.mark.parametrize("release_id", mlflow_releases())
def test_mlflow_server_agrees_with_its_version(release_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs the image built here with the MLflow of requirements.txt, the migration
    init container the same image (another version would leave the schema behind or ahead of
    the server), and that MLflow's own CLI accepts the rendered arguments in the pod's env."""
    import click
    from mlflow.cli import _validate_server_args
    from mlflow.cli import server as server_command

    objects = rendered(release_id)
    pin = requirement_pins(ROOT / "requirements.txt")["mlflow"]
    assert importlib.metadata.version("mlflow") == pin, "the CLI parsing the arguments is the server's"
    problems = []
    if requirement_pins(DOCKER / "mlflow-requirements.txt").get("mlflow") != pin:
        problems.append(f"docker/mlflow-requirements.txt does not install mlflow=={pin}")
    builds = {
        (_option(c, "-f") or [""])[0]: _option(c, "-t")
        for c in doc_commands()
        if c[:2] == ("docker", "build")
    }
    image = (builds.get("docker/mlflow.Dockerfile") or [None])[0]
    if not image or not image.endswith(f":{pin}"):
        problems.append(f"docs/deploy.md builds docker/mlflow.Dockerfile as {image}, not tagged {pin}")
    servers = [
        (pod, c)
        for _, _, pod in pod_templates(objects)
        for c in pod["spec"]["containers"]
        if c.get("command") == ["mlflow"] and (c.get("args") or [""])[0] == "server"
    ]
    assert len(servers) == 1, "one MLflow server Deployment"
    ((pod, server),) = servers
    if server["image"] != image:
        problems.append(f"the server runs {server['image']}, docs/deploy.md builds {image}")
    migrations = [c for c in pod["spec"].get("initContainers", []) if "migration" in c["name"]]
    assert migrations, "the chart migrates the database before the server starts"
    problems += [
        f"{c['name']} runs {c['image']}, the server {server['image']}"
        for c in migrations
        if c["image"] != server["image"]
    ]

    args = server["args"][1:]
    options = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    if len(options) != len(set(options)):
        problems.append(f"an option given twice (the last wins silently): {options}")
    env = {}
    for source in server.get("envFrom") or []:
        if "configMapRef" in source:
            (config_map,) = (
                o
                for o in objects
                if o["kind"] == "ConfigMap" and o["metadata"]["name"] == source["configMapRef"]["name"]
            )
            env.update(config_map.get("data") or {})
    env.update(literal_env(server))
    for variable in [v for v in os.environ if v.startswith("MLFLOW_")]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    try:
        context = server_command.make_context("server", list(args))  # unknown options fail here
        accepted = inspect.signature(_validate_server_args).parameters
        _validate_server_args(ctx=context, **{k: context.params.get(k) for k in accepted if k != "ctx"})
    except click.ClickException as error:
        problems.append(f"mlflow {pin} refuses {args}: {error.format_message()}")
    else:
        metrics = context.params.get("expose_prometheus")
        mounts = [m["mountPath"].rstrip("/") for m in server.get("volumeMounts") or []]
        read_only = (server.get("securityContext") or {}).get("readOnlyRootFilesystem")
        if metrics and read_only and not any(metrics == m or metrics.startswith(m + "/") for m in mounts):
            problems.append(f"--expose-prometheus={metrics} is on the read-only root filesystem")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("release_id", git_sync_releases())
def test_every_airflow_config_key_exists(release_id: str) -> None:
    """Airflow ignores an option it does not know; a moved option silently keeps its default."""
    import airflow
    from airflow.configuration import conf

    values = release_values(releases()[release_id])
    assert airflow.__version__ == values["airflowVersion"], "the Airflow checked is the one deployed"
    description = conf.configuration_description
    deprecated = {(old[0], old[1]): new for new, old in conf.deprecated_options.items()}
    wanted = [(s, k) for s, options in (values.get("config") or {}).items() for k in options]
    for variable in values.get("env") or []:
        match = re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+)", variable["name"])
        if match:
            key = re.sub(r"_(CMD|SECRET)$", "", match[2])
            wanted.append((match[1].lower(), key.lower()))
    problems = []
    for section, key in wanted:
        if (section, key) in deprecated:
            problems.append(f"[{section}] {key} is deprecated: use {deprecated[(section, key)]}")
        elif key not in (description.get(section) or {}).get("options", {}):
            problems.append(f"[{section}] {key} is not an Airflow {airflow.__version__} option")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- tests: across releases


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if (
            (operator == "In" and labels.get(key) not in values)
            or (operator == "NotIn" and labels.get(key) in values)
            or (operator == "Exists" and key not in labels)
            or (operator == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def _namespaces(selector: dict[str, Any] | None, own: str) -> set[str] | None:
    """Namespaces a monitor's namespaceSelector names; None = all."""
    if not selector:
        return {own}
    if selector.get("any"):
        return None
    return set(selector.get("matchNames") or [own])


def test_monitors_scrape_ports_that_exist() -> None:
    """Every ServiceMonitor, PodMonitor and Probe selects something real and scrapes a port it has,
    and the Prometheus of kube-prometheus-stack selects every one of them."""
    everything = [(obj, namespace_of(obj, releases()[r])) for r in RELEASE_IDS for obj in rendered(r)]
    services = [(o, n) for o, n in everything if o["kind"] == "Service"]
    services += [(s, s["metadata"]["namespace"]) for s in CLUSTER_SERVICES]
    pods = [
        (pod.get("metadata", {}).get("labels") or {}, n, pod)
        for r in RELEASE_IDS
        for _, owner, pod in pod_templates(rendered(r))
        for n in [namespace_of(owner, releases()[r])]
    ]

    def pod_ports(pod: dict[str, Any]) -> set[Any]:
        return {
            p.get(f) for c in containers(pod) for p in c.get("ports") or [] for f in ("name", "containerPort")
        }

    monitors = [(o, n) for o, n in everything if o["kind"] in {"ServiceMonitor", "PodMonitor", "Probe"}]
    assert any(o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "mlflow" for o, _ in monitors), (
        "MLflow's ServiceMonitor did not render: were the cluster's API versions passed to Helm?"
    )
    problems = []
    for monitor, namespace in monitors:
        name = f"{monitor['kind']} {namespace}/{monitor['metadata']['name']}"
        spec = monitor["spec"]
        allowed = _namespaces(spec.get("namespaceSelector"), namespace)
        if monitor["kind"] == "ServiceMonitor":
            selected = [
                (s, n)
                for s, n in services
                if (allowed is None or n in allowed)
                and _matches(spec["selector"], s["metadata"].get("labels") or {})
            ]
            if not selected:
                problems.append(f"{name}: selects no Service")
            for service, service_ns in selected:
                for endpoint in spec["endpoints"]:
                    if "port" in endpoint and endpoint["port"] not in {
                        p.get("name") for p in service["spec"]["ports"]
                    }:
                        problems.append(
                            f"{name}: Service {service['metadata']['name']} has no port {endpoint['port']}"
                        )
                    if "targetPort" in endpoint:
                        backing = [
                            p
                            for labels, n, p in pods
                            if n == service_ns
                            and _matches({"matchLabels": service["spec"].get("selector")}, labels)
                        ]
                        if not any(endpoint["targetPort"] in pod_ports(p) for p in backing):
                            problems.append(f"{name}: no pod behind it exposes port {endpoint['targetPort']}")
        elif monitor["kind"] == "PodMonitor":
            selected_pods = [
                p
                for labels, n, p in pods
                if (allowed is None or n in allowed) and _matches(spec["selector"], labels)
            ]
            if not selected_pods:
                problems.append(f"{name}: selects no pod")
            for endpoint in spec.get("podMetricsEndpoints", []):
                if not all(endpoint.get("port") in pod_ports(p) for p in selected_pods):
                    problems.append(f"{name}: a selected pod has no port {endpoint.get('port')}")
        else:  # Probe: the prober URL and static targets are Service addresses
            addresses = [spec.get("prober", {}).get("url", "")]
            addresses += spec.get("targets", {}).get("staticConfig", {}).get("static", [])
            for address in addresses:
                host, _, port = re.sub(r"^\w+://", "", address).split("/")[0].partition(":")
                service_name, _, service_ns = host.partition(".")
                service_ns = service_ns.split(".")[0] or namespace
                found = [s for s, n in services if n == service_ns and s["metadata"]["name"] == service_name]
                if not found:
                    problems.append(f"{name}: {address} is no Service")
                elif port and int(port) not in {p["port"] for p in found[0]["spec"]["ports"]}:
                    problems.append(f"{name}: Service {host} has no port {port}")
    prometheuses = [(o, n) for o, n in everything if o["kind"] == "Prometheus"]
    assert prometheuses, "kube-prometheus-stack renders a Prometheus"
    selectors = {"ServiceMonitor": "serviceMonitor", "PodMonitor": "podMonitor", "Probe": "probe"}
    for monitor, namespace in monitors:
        field = selectors[monitor["kind"]]
        if not any(
            _matches(p["spec"].get(f"{field}Selector"), monitor["metadata"].get("labels") or {})
            and (p["spec"].get(f"{field}NamespaceSelector") is not None or namespace == prometheus_ns)
            for p, prometheus_ns in prometheuses
        ):
            problems.append(
                f"{monitor['kind']} {namespace}/{monitor['metadata']['name']}: no Prometheus selects it"
            )
    assert not problems, "\n".join(problems)
