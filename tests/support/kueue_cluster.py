"""The cluster a test's environment files describe, built from the real trainyard-cluster chart.

Tests that queue through Kueue do not write ClusterQueues by hand: they render our chart (Helm,
through helm-python-sdk) for their own environment files, exactly as docs/deploy.md installs it
for dev and prod, and install what it renders into the emulator. So a queueing test also tests
the quotas, cohort, flavors and priorities the chart derives from the YAML.
"""

from __future__ import annotations

from typing import Any

from tests.support.deploy_files import CHART, deep_merge, is_kueue, load_yaml, render
from tests.support.k8s_emulator import KubernetesEmulator


def render_cluster(environments: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """The chart for ``{environment name: (its YAML text, "dev" or "prod")}``.

    The second element picks which shipped values file (priorities, preemption settings) the
    environment takes. NetworkPolicies (which need in-cluster URLs) and Secret placeholders
    (tests add their Secrets with values) are left out.
    """
    values = load_yaml(CHART / "values.yaml")
    chosen = {}
    for name, (text, like) in environments.items():
        shipped = load_yaml(CHART / f"values-{like}.yaml")["environments"][like]
        chosen[name] = {**shipped, "file": text}
    values = deep_merge(values, {"networkPolicy": {"enabled": False}, "secrets": {"create": False}})
    values["environments"] = chosen
    return render(values)


def install(emulator: KubernetesEmulator, manifests: list[dict[str, Any]]) -> dict[str, int]:
    """Namespaces, PriorityClasses and every Kueue object of the chart, into the emulator.

    Returns how many of each kind were installed; the rest (RBAC, ServiceAccounts, quotas) has no
    effect on the emulated cluster.
    """
    installed: dict[str, int] = {}
    # As `helm install` orders them: namespaces first, a queue after what it points to.
    order = ["Namespace", "PriorityClass", "ResourceFlavor", "WorkloadPriorityClass", "ClusterQueue"]
    for manifest in sorted(manifests, key=lambda m: order.index(m["kind"]) if m["kind"] in order else 99):
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if is_kueue(manifest):
            emulator.apply_kueue(manifest)
        elif kind == "Namespace":
            emulator.add_namespace(name)
        elif kind == "PriorityClass":
            emulator.add_priority_class(name, manifest["value"], manifest.get("preemptionPolicy", "Never"))
        else:
            continue
        installed[kind] = installed.get(kind, 0) + 1
    return installed
