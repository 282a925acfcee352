"""The Kueue side of the trainyard-cluster chart (kubernetes.scheduling: kueue), against Kueue v0.19.2.

Every ResourceFlavor, ClusterQueue, LocalQueue and WorkloadPriorityClass the chart renders from
the shipped environment YAML is validated against Kueue's own v1beta2 CRD schemas, closed like
kubernetes-validate's strict mode (an unknown field fails), and the CRDs' CEL rules are checked by
hand (a rule this file does not know fails the test, so a Kueue bump is noticed). The CRDs come
from ../shared/upstream-crds/kueue, never copied into the repository; where that folder is absent
(a clone outside CI) those tests skip. The same holds for Kueue's chart archive in
../shared/upstream-charts: without kueue-0.19.2.tgz there, helm-values/kueue/values.yaml is
checked for its contract only, not rendered through the chart.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy_files import (
    CHART,
    CLUSTER_ENVS,
    HELM,
    KUEUE_GROUP,
    chart_values,
    closed_schema,
    environment_text,
    is_kueue,
    load_yaml,
    of_kind,
    render,
)
from tests.support.paths import ROOT
from trainyard.config.environment_schema import (
    GPU_RESOURCE,
    QUEUE_LABEL,
    WORKLOAD_PRIORITY_LABEL,
    EnvironmentConfig,
)
from trainyard.config.loading import load_environment, load_pipeline, pipeline_files
from trainyard.train.pod import pod_kwargs

SHARED = ROOT / ".." / "shared"
CRDS = SHARED / "upstream-crds" / "kueue"
KUEUE_CHART = SHARED / "upstream-charts" / "kueue-0.19.2.tgz"
KUEUE_VALUES = HELM / "kueue" / "values.yaml"
KUEUE_VERSION = "v1beta2"
KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
CPU_FLAVOR = "trainyard-cpu-memory"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


# --------------------------------------------------------------------------- helpers


def shipped(name: str) -> EnvironmentConfig:
    return load_environment(name, ROOT / "dags" / "environments")


def edited(edit: Callable[[dict[str, dict[str, Any]]], None]) -> dict[str, str]:
    """The shipped environment YAML texts after `edit({env: parsed YAML})`."""
    data = {name: yaml.safe_load(environment_text(name)) for name in CLUSTER_ENVS}
    edit(data)
    return {name: yaml.safe_dump(doc, sort_keys=False) for name, doc in data.items()}


def by_name(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in of_kind(manifests, kind)}


def chart_env_values(name: str) -> dict[str, Any]:
    return chart_values()["environments"][name]


def kueue_config() -> dict[str, Any]:
    """The Kueue Configuration (config.kueue.x-k8s.io) that helm-values/kueue/values.yaml installs."""
    return yaml.safe_load(load_yaml(KUEUE_VALUES)["managerConfig"]["controllerManagerConfigYaml"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against a label set."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def gpu_group(queue: dict[str, Any]) -> dict[str, Any]:
    (group,) = [g for g in queue["spec"]["resourceGroups"] if g["coveredResources"] == [GPU_RESOURCE]]
    return group


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return render(chart_values())


# --------------------------------------------------------------------------- Kueue's CRDs


def requires_crds() -> None:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS.resolve()} is absent: Kueue's CRDs come with shared/ (CI has it)")


@functools.cache
def crds() -> dict[str, dict[str, Any]]:
    """kind -> the CRD (v1beta2 only) as Kueue v0.19.2 ships it."""
    requires_crds()
    found = {}
    for path in sorted(CRDS.glob(f"{KUEUE_GROUP}_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == KUEUE_VERSION]
        found[crd["spec"]["names"]["kind"]] = {"scope": crd["spec"]["scope"], "version": version}
    return found


def schema_of(kind: str) -> dict[str, Any]:
    return crds()[kind]["version"]["schema"]["openAPIV3Schema"]


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(closed_schema(schema_of(manifest["kind"])))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


# The CEL rules (x-kubernetes-validations) of the v1beta2 schemas, in Python: rule -> check(self).
# Transition rules (oldSelf) only run on update and are left out; any other rule on a field the
# chart renders must be here, or the test fails.
def _no_borrowing_without_cohort(spec: dict[str, Any]) -> bool:
    if "cohortName" in spec or "resourceGroups" not in spec:
        return True
    resources = [r for g in spec["resourceGroups"] for f in g["flavors"] for r in f["resources"]]
    return all("borrowingLimit" not in r for r in resources)


def _preference_needs_try_next(fungibility: dict[str, Any]) -> bool:
    return "preference" not in fungibility or (
        fungibility.get("whenCanBorrow", "MayStopSearch") == "TryNextFlavor"
        and fungibility.get("whenCanPreempt", "TryNextFlavor") == "TryNextFlavor"
    )


def _borrow_preemption_needs_reclaim(preemption: dict[str, Any]) -> bool:
    borrow = preemption.get("borrowWithinCohort", {})
    return not (
        preemption.get("reclaimWithinCohort", "Never") == "Never" and borrow.get("policy", "Never") != "Never"
    )


EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
CEL: dict[str, Callable[[Any], bool]] = {
    # ClusterQueue
    "!has(self.cohortName) && has(self.resourceGroups) ? self.resourceGroups.all(rg, rg.flavors.all(f, "
    "f.resources.all(r, !has(r.borrowingLimit)))) : true": _no_borrowing_without_cohort,
    "!has(self.preference) || (self.whenCanBorrow == 'TryNextFlavor' && self.whenCanPreempt == "
    "'TryNextFlavor')": _preference_needs_try_next,
    "!(self.reclaimWithinCohort == 'Never' && has(self.borrowWithinCohort) && "
    "self.borrowWithinCohort.policy != 'Never')": _borrow_preemption_needs_reclaim,
    "self.flavors.all(x, size(x.resources) == size(self.coveredResources))": lambda group: all(
        len(f["resources"]) == len(group["coveredResources"]) for f in group["flavors"]
    ),
    # ResourceFlavor
    "!has(self.topologyName) || self.nodeLabels.size() >= 1": lambda spec: (
        "topologyName" not in spec or len(spec.get("nodeLabels", {})) >= 1
    ),
    "self.all(x, !has(x.key) ? x.operator == 'Exists' : true)": lambda ts: all(
        "key" in t or t.get("operator") == "Exists" for t in ts
    ),
    "self.all(x, has(x.tolerationSeconds) ? x.effect == 'NoExecute' : true)": lambda ts: all(
        "tolerationSeconds" not in t or t.get("effect") == "NoExecute" for t in ts
    ),
    "self.all(x, !has(x.operator) || x.operator in ['Equal', 'Exists'])": lambda ts: all(
        t.get("operator", "Equal") in ("Equal", "Exists") for t in ts
    ),
    "self.all(x, has(x.operator) && x.operator == 'Exists' ? !has(x.value) : true)": lambda ts: all(
        t.get("operator") != "Exists" or "value" not in t for t in ts
    ),
    "self.all(x, !has(x.effect) || x.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])": lambda ts: (
        all(t.get("effect", EFFECTS[0]) in EFFECTS for t in ts)
    ),
    "self.all(x, x.effect in ['NoSchedule', 'PreferNoSchedule', 'NoExecute'])": lambda ts: all(
        t.get("effect") in EFFECTS for t in ts
    ),
}


def cel_problems(manifest: dict[str, Any]) -> list[str]:
    """The CEL rules `manifest` breaks, walking its CRD schema along the fields it sets."""
    problems: list[str] = []

    def walk(schema: dict[str, Any], value: Any, path: str) -> None:
        for validation in schema.get("x-kubernetes-validations", []):
            rule = " ".join(validation["rule"].split())
            if "oldSelf" in rule:
                continue
            if rule not in CEL:
                problems.append(f"{path}: no hand check for CEL rule {rule!r}")
            elif not CEL[rule](value):
                problems.append(f"{path}: {validation['message']}")
        if isinstance(value, dict):
            for key, item in value.items():
                if key in schema.get("properties", {}):
                    walk(schema["properties"][key], item, f"{path}.{key}")
                elif isinstance(schema.get("additionalProperties"), dict):
                    walk(schema["additionalProperties"], item, f"{path}.{key}")
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                walk(schema["items"], item, f"{path}[{index}]")

    walk(schema_of(manifest["kind"]), manifest, manifest["kind"])
    return problems


# --------------------------------------------------------------------------- tests: the CRDs


def test_every_kueue_object_is_valid_against_kueue_crds(manifests: list[dict[str, Any]]) -> None:
    objects = [m for m in manifests if is_kueue(m)]
    assert {m["kind"] for m in objects} == KUEUE_KINDS
    for manifest in objects:
        assert manifest["apiVersion"] == f"{KUEUE_GROUP}/{KUEUE_VERSION}"
        where = f"{manifest['kind']} {manifest['metadata']['name']}"
        assert not schema_errors(manifest), (where, schema_errors(manifest))
        assert not cel_problems(manifest), (where, cel_problems(manifest))
        namespaced = crds()[manifest["kind"]]["scope"] == "Namespaced"
        assert ("namespace" in manifest["metadata"]) == namespaced, where
        assert DNS_SUBDOMAIN.match(manifest["metadata"]["name"]), where
        assert len(manifest["metadata"]["name"]) <= 253, where


@pytest.mark.parametrize(
    ("kind", "mutate", "caught_by"),
    [
        ("ClusterQueue", lambda m: m["spec"].__setitem__("bogus", True), "schema"),
        ("ClusterQueue", lambda m: m["spec"].__setitem__("cohort", m["spec"].pop("cohortName")), "schema"),
        (
            "ClusterQueue",
            lambda m: m["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0].__setitem__(
                "nominalQuta", 1
            ),
            "schema",
        ),
        (
            "ClusterQueue",
            lambda m: m["spec"]["preemption"].__setitem__("reclaimWithinCohort", "Sometimes"),
            "schema",
        ),
        ("ClusterQueue", lambda m: m["spec"].__setitem__("queueingStrategy", "FIFO"), "schema"),
        ("ClusterQueue", lambda m: m["spec"].pop("cohortName"), "cel"),
        (
            "ClusterQueue",
            lambda m: m["spec"]["preemption"].__setitem__("reclaimWithinCohort", "Never"),
            "cel",
        ),
        ("ClusterQueue", lambda m: m["spec"]["resourceGroups"][1]["coveredResources"].append("pods"), "cel"),
        (
            "ResourceFlavor",
            lambda m: m["spec"].__setitem__("nodeSelector", m["spec"].pop("nodeLabels")),
            "schema",
        ),
        ("ResourceFlavor", lambda m: m["spec"]["tolerations"][0].__setitem__("value", "x"), "cel"),
        ("LocalQueue", lambda m: m["spec"].__setitem__("clusterQueueName", "x"), "schema"),
        ("WorkloadPriorityClass", lambda m: m.__setitem__("spec", {"value": 1}), "schema"),
        ("WorkloadPriorityClass", lambda m: m.__setitem__("value", "high"), "schema"),
    ],
)
def test_the_strict_checks_catch_a_bad_field(
    manifests: list[dict[str, Any]], kind: str, mutate: Callable[[dict[str, Any]], None], caught_by: str
) -> None:
    """Mutation check: the validation above is not vacuous (the prod ClusterQueue borrows while
    preempting, so dropping its cohort or its reclaim policy breaks a CEL rule)."""
    import copy

    candidates = [
        m for m in of_kind(manifests, kind) if "tolerations" in m.get("spec", {}) or kind != "ResourceFlavor"
    ]
    manifest = copy.deepcopy(
        max(candidates, key=lambda m: m["metadata"]["name"])
    )  # prod's, for a ClusterQueue
    assert not schema_errors(manifest) and not cel_problems(manifest)
    mutate(manifest)
    if caught_by == "schema":
        assert schema_errors(manifest)
    else:
        assert not schema_errors(manifest) and cel_problems(manifest)


# --------------------------------------------------------------------------- tests: the YAML


@pytest.mark.parametrize("name", CLUSTER_ENVS)
def test_queues_follow_the_environment_yaml(manifests: list[dict[str, Any]], name: str) -> None:
    environment = shipped(name)
    k8s = environment.kubernetes
    assert k8s is not None and k8s.scheduling == "kueue"
    queues = by_name(manifests, "ClusterQueue")
    local = {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in of_kind(manifests, "LocalQueue")}
    mine = {n for n, q in queues.items() if q["metadata"]["labels"]["trainyard.io/environment"] == name}
    assert mine == {environment.cluster_queue(team) for team in environment.teams}
    for team_name, team in environment.teams.items():
        spec = queues[environment.cluster_queue(team_name)]["spec"]
        assert spec["cohortName"] == k8s.kueue.cohort
        assert spec["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": k8s.namespace}}
        nominal = k8s.gpu_counts(team_name, "gpus", team.gpus)
        borrow = k8s.gpu_counts(team_name, "borrow_gpus", team.borrow_gpus)
        flavors = {f["name"]: f["resources"] for f in gpu_group({"spec": spec})["flavors"]}
        assert list(flavors) == [f"trainyard-{t}" for t in sorted(k8s.gpu_types)]
        for gpu_type in k8s.gpu_types:
            (resource,) = flavors[f"trainyard-{gpu_type}"]
            assert resource["name"] == GPU_RESOURCE
            assert resource["nominalQuota"] == nominal[gpu_type]  # type: ignore[index]
            if borrow is None:
                assert "borrowingLimit" not in resource, "null borrow_gpus = no limit"
            else:
                assert resource["borrowingLimit"] == borrow[gpu_type]
        (other,) = [g for g in spec["resourceGroups"] if g["coveredResources"] != [GPU_RESOURCE]]
        assert other["coveredResources"] == ["cpu", "memory"]
        (cpu_flavor,) = other["flavors"]
        assert cpu_flavor["name"] == CPU_FLAVOR
        assert {r["name"]: r["nominalQuota"] for r in cpu_flavor["resources"]} == {
            "cpu": team.cpu,
            "memory": team.memory,
        }
        queue = local[(k8s.namespace, environment.local_queue(team_name))]
        assert queue["spec"] == {"clusterQueue": environment.cluster_queue(team_name)}
    # the flavors: node labels and tolerations of each GPU type, as the pod gets them
    flavors = by_name(manifests, "ResourceFlavor")
    assert set(flavors) == {f"trainyard-{t}" for t in k8s.gpu_types} | {CPU_FLAVOR}
    assert flavors[CPU_FLAVOR]["spec"] == {}
    for gpu_type, gpu in k8s.gpu_types.items():
        spec = flavors[f"trainyard-{gpu_type}"]["spec"]
        assert spec["nodeLabels"] == gpu.node_labels
        tolerations = [t.model_dump(exclude_none=True) for t in k8s.gpu_tolerations(gpu_type)]
        assert spec.get("tolerations", []) == tolerations
    # the WorkloadPriorityClass the pods name, valued from the chart values
    wpc = by_name(manifests, "WorkloadPriorityClass")[k8s.workload_priority_class]
    assert wpc["value"] == chart_env_values(name)["workloadPriorityClass"]["value"]
    assert wpc["metadata"]["labels"]["trainyard.io/environment"] == name


def test_dev_and_prod_share_flavors_and_one_cohort(manifests: list[dict[str, Any]]) -> None:
    queues = of_kind(manifests, "ClusterQueue")
    assert {q["spec"]["cohortName"] for q in queues} == {
        shipped(n).kubernetes.kueue.cohort for n in CLUSTER_ENVS
    }  # type: ignore[union-attr]
    assert len({q["spec"]["cohortName"] for q in queues}) == 1, (
        "one cohort: dev and prod lend each other GPUs"
    )
    referenced = {f["name"] for q in queues for g in q["spec"]["resourceGroups"] for f in g["flavors"]}
    assert referenced == set(by_name(manifests, "ResourceFlavor")), "every flavor used, none missing"
    assert not of_kind(manifests, "Cohort"), "a cohortName needs no Cohort object"


def test_prod_outranks_dev_under_kueue(manifests: list[dict[str, Any]]) -> None:
    dev, prod = shipped("dev"), shipped("prod")
    classes = by_name(manifests, "WorkloadPriorityClass")
    dev_value = classes[dev.kubernetes.workload_priority_class]["value"]  # type: ignore[union-attr]
    prod_value = classes[prod.kubernetes.workload_priority_class]["value"]  # type: ignore[union-attr]
    assert prod_value > dev_value
    queues = by_name(manifests, "ClusterQueue")
    for team in prod.teams:
        preemption = queues[prod.cluster_queue(team)]["spec"]["preemption"]
        assert preemption["reclaimWithinCohort"] == "Any", "a prod team's quota comes back at once"
        borrow = preemption["borrowWithinCohort"]
        assert borrow["policy"] == "LowerPriority"
        # while borrowing, prod may preempt dev's borrowing runs, never another prod run
        assert dev_value <= borrow["maxPriorityThreshold"] < prod_value
    for team in dev.teams:
        preemption = queues[dev.cluster_queue(team)]["spec"]["preemption"]
        # dev never evicts: nothing is below dev, and it does not preempt while borrowing
        assert preemption["reclaimWithinCohort"] in ("Never", "LowerPriority")
        assert preemption["borrowWithinCohort"] == {"policy": "Never"}
    for queue in queues.values():
        assert queue["spec"]["preemption"]["withinClusterQueue"] in ("Never", "LowerPriority")
        assert queue["spec"]["queueingStrategy"] in ("BestEffortFIFO", "StrictFIFO")
    # only Kueue preempts: the scheduler would evict admitted pods behind its back
    for name in CLUSTER_ENVS:
        priority_class = by_name(manifests, "PriorityClass")[shipped(name).kubernetes.priority_class]  # type: ignore[union-attr]
        assert priority_class["preemptionPolicy"] == "Never"


def test_pods_find_what_the_chart_renders(manifests: list[dict[str, Any]], tmp_path: Path) -> None:
    """The training pod (trainyard.train.pod) of every pipeline, as written, without a gpu_type and
    with each one, names a LocalQueue, WorkloadPriorityClass, ServiceAccount and Secrets the chart
    renders, asks only for resources its ClusterQueue covers, and a named GPU type's nodeSelector
    is its flavor's node labels (Kueue skips flavors whose labels the nodeSelector contradicts)."""
    flavor_labels = [m["spec"].get("nodeLabels") for m in of_kind(manifests, "ResourceFlavor")]
    queues = by_name(manifests, "ClusterQueue")
    namespaces = by_name(manifests, "Namespace")
    known = sorted(p.stem for p in (ROOT / "dags" / "environments").glob("*.yaml"))
    for name in CLUSTER_ENVS:
        environment = shipped(name)
        k8s = environment.kubernetes
        assert k8s is not None
        in_ns = [m for m in manifests if m["metadata"].get("namespace") == k8s.namespace]
        paths = []
        for path in pipeline_files(ROOT / "dags" / "pipelines"):
            paths.append(path)
            for gpu_type in (None, *k8s.gpu_types):
                data = yaml.safe_load(path.read_text())
                data.setdefault("resources", {})["gpu_type"] = gpu_type
                variant = tmp_path / f"{name}-{gpu_type}" / path.name  # the file name is the pipeline's
                variant.parent.mkdir(exist_ok=True)
                variant.write_text(yaml.safe_dump(data))
                paths.append(variant)
        for path in paths:
            pipeline = load_pipeline(path, environment, known)
            pod = pod_kwargs(pipeline)
            assert pod["namespace"] == k8s.namespace
            (local,) = [
                q for q in of_kind(in_ns, "LocalQueue") if q["metadata"]["name"] == pod["labels"][QUEUE_LABEL]
            ]
            cluster_queue = queues[local["spec"]["clusterQueue"]]
            labels = {
                **namespaces[k8s.namespace]["metadata"]["labels"],
                "kubernetes.io/metadata.name": k8s.namespace,
            }
            assert selects(cluster_queue["spec"]["namespaceSelector"], labels)
            assert pod["labels"][WORKLOAD_PRIORITY_LABEL] in by_name(manifests, "WorkloadPriorityClass")
            assert pod["priority_class_name"] in by_name(manifests, "PriorityClass")
            assert pod["service_account_name"] in {
                a["metadata"]["name"] for a in of_kind(in_ns, "ServiceAccount")
            }
            secrets = {s["metadata"]["name"] for s in of_kind(in_ns, "Secret")}
            assert {e.secret_ref.name for e in pod["env_from"] or []} <= secrets
            assert {v.value_from.secret_key_ref.name for v in pod["env_vars"] if v.value_from} <= secrets
            covered = {r for g in cluster_queue["spec"]["resourceGroups"] for r in g["coveredResources"]}
            assert set(pod["container_resources"].requests) <= covered, (
                "Kueue cannot admit an uncovered resource"
            )
            if pipeline.config.resources.gpu_type:
                assert pod["node_selector"] in flavor_labels
            else:
                assert pod["node_selector"] is None, "Kueue picks the flavor and adds its labels"


# --------------------------------------------------------------------------- tests: the chart's guards


def test_a_gpu_type_defined_differently_in_two_environments_fails() -> None:
    import helm_python

    def relabel(data: dict[str, dict[str, Any]]) -> None:
        data["prod"]["kubernetes"]["gpu_types"]["a100"]["node_labels"] = {
            "nvidia.com/gpu.product": "A100-40GB"
        }

    with pytest.raises(
        helm_python.HelmError, match=r"gpu_types\.a100 differs between environments dev and prod"
    ):
        render(chart_values(edited(relabel)))

    def retaint(data: dict[str, dict[str, Any]]) -> None:
        data["dev"]["kubernetes"]["gpu_types"]["h100"]["tolerations"] = [
            {"key": "dedicated", "operator": "Exists"}
        ]

    with pytest.raises(helm_python.HelmError, match=r"gpu_types\.h100 differs"):
        render(chart_values(edited(retaint)))

    def same(data: dict[str, dict[str, Any]]) -> None:
        # written differently, the same tolerations: operator Exists is the schema's default
        for name in CLUSTER_ENVS:
            data[name]["kubernetes"]["gpu_types"]["h100"]["tolerations"] = [{"key": "dedicated"}]
        data["prod"]["kubernetes"]["gpu_types"]["h100"]["tolerations"][0]["operator"] = "Exists"

    (h100,) = [
        f
        for f in of_kind(render(chart_values(edited(same))), "ResourceFlavor")
        if f["metadata"]["name"] == "trainyard-h100"
    ]
    assert h100["spec"]["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]


def test_team_quotas_read_as_the_schema_reads_them() -> None:
    import helm_python

    def variants(data: dict[str, dict[str, Any]]) -> None:
        dev = data["dev"]
        dev["teams"]["vision"] = {
            "gpus": {"h100": 1},  # a100 omitted: 0
            "borrow_gpus": None,  # no limit
            "storage": {
                "data": ["s3://trainyard-dev-datasets/vision/"],
                "models": ["s3://trainyard-dev-models/vision/"],
            },
        }

    manifests = render(chart_values(edited(variants)))
    queue = by_name(manifests, "ClusterQueue")["trainyard-dev-vision"]
    resources = {f["name"]: f["resources"][0] for f in gpu_group(queue)["flavors"]}
    assert resources["trainyard-a100"] == {"name": GPU_RESOURCE, "nominalQuota": 0}
    assert resources["trainyard-h100"] == {"name": GPU_RESOURCE, "nominalQuota": 1}
    (cpu_group,) = [g for g in queue["spec"]["resourceGroups"] if g["coveredResources"] == ["cpu", "memory"]]
    assert {r["name"]: r["nominalQuota"] for r in cpu_group["flavors"][0]["resources"]} == {
        "cpu": "32",
        "memory": "256Gi",
    }
    assert ("trainyard-dev", "vision") in {
        (q["metadata"]["namespace"], q["metadata"]["name"]) for q in of_kind(manifests, "LocalQueue")
    }

    def ambiguous(data: dict[str, dict[str, Any]]) -> None:
        data["prod"]["teams"]["nlp"]["gpus"] = 4

    with pytest.raises(
        helm_python.HelmError, match=r"teams\.nlp\.gpus: 4 is ambiguous with GPU types a100, h100"
    ):
        render(chart_values(edited(ambiguous)))

    def unknown(data: dict[str, dict[str, Any]]) -> None:
        data["prod"]["teams"]["nlp"]["borrow_gpus"] = {"v100": 1}

    with pytest.raises(helm_python.HelmError, match=r"unknown GPU type v100"):
        render(chart_values(edited(unknown)))


def test_chart_refuses_preemption_that_kueue_refuses() -> None:
    import helm_python

    values = chart_values(
        environments={"prod": {"clusterQueue": {"preemption": {"reclaimWithinCohort": "Never"}}}}
    )
    with pytest.raises(
        helm_python.HelmError, match=r"borrowWithinCohort.policy LowerPriority needs reclaimWithinCohort"
    ):
        render(values)


def test_teams_get_their_own_identity() -> None:
    role = "arn:aws:iam::123456789012:role/trainyard-prod-nlp"

    def identity(data: dict[str, dict[str, Any]]) -> None:
        data["prod"]["teams"]["nlp"]["workload_identity"] = True
        data["dev"]["teams"]["nlp"]["credentials_secret"] = "nlp-dev-s3"
        data["dev"]["teams"]["nlp"]["service_account"] = "nlp-trainer"

    annotations = {"prod": {"teamServiceAccountAnnotations": {"nlp": {"eks.amazonaws.com/role-arn": role}}}}
    manifests = render(chart_values(edited(identity), environments=annotations))
    accounts = {
        (a["metadata"]["namespace"], a["metadata"]["name"]): a for a in of_kind(manifests, "ServiceAccount")
    }
    assert set(accounts) == {("trainyard-dev", "nlp-trainer"), ("trainyard-prod", "trainyard-nlp")}
    assert accounts[("trainyard-prod", "trainyard-nlp")]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": role
    }
    assert "annotations" not in accounts[("trainyard-dev", "nlp-trainer")]["metadata"]
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in of_kind(manifests, "Secret")}
    keys = load_yaml(CHART / "values.yaml")["secrets"]["teamCredentialsKeys"]
    assert sorted(secrets[("trainyard-dev", "nlp-dev-s3")]["data"]) == sorted(keys)
    assert not [s for (ns, s) in secrets if ns == "trainyard-prod" and "nlp" in s], (
        "workload identity: no Secret"
    )

    import helm_python

    typo = {"dev": {"teamServiceAccountAnnotations": {"nlpp": {"eks.amazonaws.com/role-arn": role}}}}
    with pytest.raises(helm_python.HelmError, match=r"teamServiceAccountAnnotations.nlpp: no team nlpp"):
        render(chart_values(environments=typo))


def test_priority_mode_renders_no_kueue_object_and_keeps_the_gpu_quota() -> None:
    for mode in ("priority", "no-teams"):
        manifests = render(chart_values({name: environment_text(name, mode) for name in CLUSTER_ENVS}))
        assert not [m for m in manifests if is_kueue(m)]
        for quota in of_kind(manifests, "ResourceQuota"):
            if "scopeSelector" not in quota["spec"]:
                assert "requests.nvidia.com/gpu" in quota["spec"]["hard"]
        assert all(
            "trainyard.io/scheduling" not in n["metadata"]["labels"] for n in of_kind(manifests, "Namespace")
        )
        rules = [r for role in of_kind(manifests, "Role") for r in role["rules"]]
        assert not [r for r in rules if any("kueue" in g for g in r["apiGroups"])]
        classes = by_name(manifests, "PriorityClass")
        assert (
            classes[shipped("prod").kubernetes.priority_class]["preemptionPolicy"] == "PreemptLowerPriority"
        )  # type: ignore[union-attr]


# --------------------------------------------------------------------------- Kueue's own chart


def test_kueue_manages_exactly_the_kueue_namespaces(manifests: list[dict[str, Any]]) -> None:
    config = kueue_config()
    assert config["apiVersion"] == "config.kueue.x-k8s.io/v1beta2" and config["kind"] == "Configuration"
    assert config["integrations"]["frameworks"] == ["pod"], "one plain pod per run"
    assert config["manageJobsWithoutQueueName"] is True, "a pod without a queue label waits, never bypasses"
    assert "fairSharing" not in config, "classic preemption: prod's borrowWithinCohort needs it"
    assert "admissionFairSharing" not in config and "waitForPodsReady" not in config
    selector = config["managedJobsNamespaceSelector"]
    for namespace in of_kind(manifests, "Namespace"):
        labels = {
            **namespace["metadata"]["labels"],
            "kubernetes.io/metadata.name": namespace["metadata"]["name"],
        }
        assert selects(selector, labels), namespace["metadata"]["name"]
    priority = render(chart_values({name: environment_text(name, "priority") for name in CLUSTER_ENVS}))
    for namespace in of_kind(priority, "Namespace"):
        labels = {
            **namespace["metadata"]["labels"],
            "kubernetes.io/metadata.name": namespace["metadata"]["name"],
        }
        assert not selects(selector, labels), "a namespace in priority mode is not Kueue's"
    for other in ("kube-system", "kueue-system", load_yaml(CHART / "values.yaml")["airflowNamespace"]):
        assert not selects(selector, {"kubernetes.io/metadata.name": other}), other
    values = load_yaml(KUEUE_VALUES)
    assert values["controllerManager"]["manager"]["image"] == {
        "repository": "registry.k8s.io/kueue/kueue",
        "tag": "v0.19.2",
        "pullPolicy": "IfNotPresent",
    }
    assert {"name": "VisibilityOnDemand", "enabled": True} in values["controllerManager"]["featureGates"]


def test_doc_installs_kueue_pinned_before_our_chart() -> None:
    text = DEPLOY_DOC.read_text().replace("\\\n", " ")  # continuation lines joined
    kueue = re.search(
        r"^helm install kueue (oci://registry\.k8s\.io/kueue/charts/kueue) .*$", text, re.MULTILINE
    )
    ours = re.search(r"^helm upgrade --install trainyard-cluster ", text, re.MULTILINE)
    assert kueue and ours and kueue.start() < ours.start(), "Kueue's CRDs and webhooks first"
    command = kueue[0]
    assert "--version 0.19.2" in command and "-f helm-values/kueue/values.yaml" in command
    assert "--wait" in command, "its webhooks must answer before trainyard-cluster creates ClusterQueues"
    header = KUEUE_VALUES.read_text().splitlines()[0]
    assert header.startswith(f"# Chart: {kueue[1]} 0.19.2")
    assert re.search(r"Kubernetes cluster \(>= 1\.(29|[3-9]\d)\)", text), "Kueue 0.19 needs Kubernetes 1.29"


def test_kueue_values_render_through_the_released_chart() -> None:
    if not KUEUE_CHART.exists():
        pytest.skip(
            f"{KUEUE_CHART.resolve()} is absent: add Kueue's released chart to shared/upstream-charts"
        )
    import helm_python

    values = load_yaml(KUEUE_VALUES)
    with helm_python.Chart.load(str(KUEUE_CHART)) as chart:
        rendered = chart.render(values=values, name="kueue", namespace="kueue-system", is_install=True)
    docs = [
        d
        for name, text in rendered.items()
        if not name.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]
    (config_map,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("manager-config")
    ]
    config = yaml.safe_load(config_map["data"]["controller_manager_config.yaml"])
    for key in ("managedJobsNamespaceSelector", "manageJobsWithoutQueueName", "integrations"):
        assert config[key] == kueue_config()[key]
    webhooks = [w for d in docs if d["kind"].endswith("WebhookConfiguration") for w in d["webhooks"]]
    pod_hooks = [w for w in webhooks if w["name"] in ("mpod.kb.io", "vpod.kb.io")]
    assert len(pod_hooks) == 2
    assert all(w["namespaceSelector"] == config["managedJobsNamespaceSelector"] for w in pod_hooks)
    (deployment,) = [
        d for d in docs if d["kind"] == "Deployment" and "controller-manager" in d["metadata"]["name"]
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.k8s.io/kueue/kueue:v0.19.2"
    assert "--feature-gates=VisibilityOnDemand=true" in container["args"]
