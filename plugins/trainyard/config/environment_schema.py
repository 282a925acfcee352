"""Schema of ``dags/environments/<env>.yaml``: what the platform team sets per deployment."""

from __future__ import annotations

import re
import warnings
from string import Formatter
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from trainer.spec import StrictModel
from trainyard.config.pipeline_schema import EMAIL, check_emails, check_uri, quantity
from trainyard.config.yaml_source import YamlLimits

NAMING_FIELDS = ("pipeline", "environment", "team")


class AirflowDefaults(StrictModel):
    schedules_enabled: bool = Field(True, description="false = every DAG is manual-only here (e.g. dev).")
    retries: int = Field(1, ge=0, le=20)
    retry_delay_minutes: float = Field(5, ge=0, le=24 * 60)
    execution_timeout_minutes: float = Field(
        360, gt=0, le=7 * 24 * 60, description="Upper bound for the train task."
    )
    task_timeout_minutes: float = Field(
        60, gt=0, le=24 * 60, description="Upper bound for validate_data and promote."
    )


def _bucket(value: str) -> str:
    check_uri(value.rstrip("/") + "/x")
    return value


def _without_credentials(value: str | None) -> str | None:
    """Credentials come from Kubernetes Secrets / the environment, never from a URL in YAML."""
    if value and urlsplit(value).password is not None:
        raise ValueError("must not contain a password; provide credentials through Secrets or env vars")
    return value


class MlflowSettings(StrictModel):
    tracking_uri: str = Field(min_length=1, description="sqlite:///..., http(s)://mlflow-server, ...")
    artifact_location: str | None = Field(
        None, description="Artifact root for new experiments on a local store; omit for a server."
    )
    experiment_name: str = Field("{pipeline}", description="Template over {pipeline}, {environment}, {team}.")
    registered_model_name: str = Field("{pipeline}", description="Template, same fields.")

    @field_validator("experiment_name", "registered_model_name")
    @classmethod
    def _template(cls, value: str) -> str:
        allowed = ", ".join("{" + name + "}" for name in NAMING_FIELDS)
        try:
            fields = [
                (name, spec, conv) for _, name, spec, conv in Formatter().parse(value) if name is not None
            ]
        except ValueError as exc:
            raise ValueError(f"bad template '{value}' ({exc}); use only {allowed}") from None
        for name, spec, conversion in fields:
            if name not in NAMING_FIELDS or spec or conversion:
                raise ValueError(f"bad template '{value}': '{{{name}}}' is not allowed; use only {allowed}")
        return value

    @field_validator("registered_model_name")
    @classmethod
    def _one_model_per_pipeline(cls, value: str) -> str:
        if "{pipeline}" not in value:
            raise ValueError(f"'{value}' must contain {{pipeline}}: each pipeline needs its own champion")
        if any(char in value for char in "/:%"):
            raise ValueError(f"'{value}' contains '/', ':' or '%', which MLflow model names cannot")
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_without_credentials(cls, value: str) -> str:
        return _without_credentials(value)


class Storage(StrictModel):
    data_root: str = Field(description="Relative dataset paths in pipelines resolve under this.")
    models_root: str = Field(description="Relative base-model paths resolve under this.")
    checkpoint_root: str = Field(description="Checkpoints go to <root>/<pipeline>/<dag run>/<inputs>.")
    s3_endpoint_url: str | None = Field(None, description="For MinIO or another S3-compatible store.")
    keep_checkpoints: bool = Field(False, description="Keep checkpoints after a successful run.")

    @field_validator("data_root", "models_root", "checkpoint_root")
    @classmethod
    def _root(cls, value: str) -> str:
        if value.startswith("s3://"):
            return (
                check_uri(value.rstrip("/") + "/x").removesuffix("/x") if "/" in value[5:] else _bucket(value)
            )
        if "://" in value or not value.startswith("/"):
            raise ValueError(f"'{value}' must be an absolute path or an s3://bucket[/prefix] URI")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)


DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
PINNED_IMAGE = re.compile(r"^[^\s@]+(@sha256:[0-9a-f]{64}|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")


class SecretKey(StrictModel):
    secret: str = Field(pattern=DNS_SUBDOMAIN, description="Name of the Kubernetes Secret.")
    key: str = Field(min_length=1, description="Key inside the Secret.")


class Secrets(StrictModel):
    """Credentials reach the pod only as references to Kubernetes Secrets, never as values."""

    env_from: tuple[str, ...] = Field((), description="Secrets whose keys all become env vars (envFrom).")
    env: dict[str, SecretKey] = Field(default_factory=dict, description="ENV_VAR -> secretKeyRef.")

    @field_validator("env_from")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not re.match(DNS_SUBDOMAIN, name):
                raise ValueError(f"'{name}' is not a valid Secret name")
        return names

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, SecretKey]) -> dict[str, SecretKey]:
        for name in env:
            if not re.match(ENV_NAME, name):
                raise ValueError(f"'{name}' is not a valid environment variable name")
        return env


class Toleration(StrictModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Caps(StrictModel):
    """The most one training pod may ask for here; pipelines above it fail to load."""

    gpus: int = Field(8, ge=0, le=64)
    cpu: str = "64"
    memory: str = "512Gi"
    shm_size: str = "64Gi"

    _quantities = field_validator("cpu", "memory", "shm_size", mode="before")(quantity)


GPU_RESOURCE = "nvidia.com/gpu"
#: Kueue's labels on a pod: which LocalQueue it waits in, and its WorkloadPriorityClass.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKLOAD_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


class GpuType(StrictModel):
    """One kind of GPU node: a pipeline's ``resources.gpu_type`` and, under Kueue, a ResourceFlavor."""

    node_labels: dict[str, str] = Field(min_length=1, description="Labels every node of this type has.")
    tolerations: tuple[Toleration, ...] | None = Field(
        None, description="Taints of these nodes that training pods tolerate; null = kubernetes.tolerations."
    )


class KueueSettings(StrictModel):
    """Names of the Kueue objects the trainyard-cluster chart creates from this file."""

    cohort: str = Field(
        "trainyard", pattern=DNS_SUBDOMAIN, description="Every ClusterQueue of every environment."
    )
    workload_priority_class: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, description="null = the same name as kubernetes.priority_class."
    )
    status_interval_seconds: float = Field(
        60, ge=1, le=3600, description="How often a waiting train task logs its place in the queue."
    )


#: Plain variables an environment may add to its training pods: communication and runtime knobs
#: (NCCL, torch.distributed, CUDA, thread counts, the CUDA caching allocator) that a cluster can
#: need without a new image. Everything else is the trainer's own (TRAINYARD_*, HF_*, MLFLOW_*,
#: PYTHON*), a credential (kubernetes.secrets), or changes what code runs (LD_PRELOAD, PATH).
POD_ENV_FAMILIES = (
    "NCCL_*",
    "TORCH_NCCL_*",
    "TORCH_DISTRIBUTED_*",
    "CUDA_*",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTORCH_CUDA_ALLOC_CONF",
)
POD_ENV_NAME = re.compile(
    "^(" + "|".join(re.escape(f).replace(r"\*", "[A-Z0-9_]+") for f in POD_ENV_FAMILIES) + ")$"
)
#: Names inside those families that are still not an environment's to set, and why.
POD_ENV_REFUSED = {
    "CUDA_VISIBLE_DEVICES": "the device plugin gives the pod its GPUs; each rank takes one by local rank",
    "CUDA_INJECTION64_PATH": "it loads a library into every CUDA process; build tools into the image",
}
#: What every training pod gets unless ``kubernetes.env`` says otherwise: unset, NCCL prints none
#: of its warnings and errors, and a failing collective leaves only PyTorch's one-line NCCL error.
POD_ENV_DEFAULTS = {"NCCL_DEBUG": "WARN"}


def check_pod_env(env: dict[str, Any]) -> dict[str, str]:
    """``kubernetes.env``: allow-listed names, string values (YAML numbers are written as text)."""
    checked = {}
    for name, value in env.items():
        if name in POD_ENV_REFUSED or not POD_ENV_NAME.match(str(name)):
            why = POD_ENV_REFUSED.get(name) or (
                "training pods take only " + ", ".join(POD_ENV_FAMILIES) + " from the environment: the "
                "trainer sets its own variables and credentials go in kubernetes.secrets"
            )
            raise ValueError(f"'{name}' cannot be set here: {why}")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"{name}: {value!r} is not a string or number; quote it (e.g. '1')")
        checked[name] = str(value)
    return checked


class KubernetesSettings(StrictModel):
    namespace: str = Field(pattern=DNS_LABEL)
    image: str = Field(description="Trainer image, pinned by tag (not 'latest') or by digest.")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    service_account: str = Field(pattern=DNS_SUBDOMAIN)
    priority_class: str = Field(pattern=DNS_SUBDOMAIN)
    scheduling: Literal["kueue", "priority"] = Field(
        "priority",
        description="kueue: pods wait in their team's LocalQueue for quota; priority: PriorityClass only.",
    )
    kueue: KueueSettings = KueueSettings()
    max_queue_wait_minutes: float = Field(
        24 * 60, gt=0, le=30 * 24 * 60, description="How long a run may wait for GPU quota (kueue)."
    )
    gpu_types: dict[str, GpuType] = Field(
        default_factory=dict, description="Pipeline gpu_type -> its nodes (a ResourceFlavor under Kueue)."
    )
    tolerations: tuple[Toleration, ...] = ()
    secrets: Secrets = Secrets()
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Plain variables for training pods (NCCL_*, TORCH_NCCL_*, CUDA_*, ...); "
        "NCCL_DEBUG defaults to WARN.",
    )
    caps: Caps = Caps()
    run_as_user: int = Field(1000, ge=1, description="Must match the trainer image's user.")
    run_as_group: int = Field(1000, ge=1)
    startup_timeout_seconds: int = Field(600, ge=10, le=86_400)
    termination_grace_period_seconds: int = Field(300, ge=10, le=3600)
    max_preemption_relaunches: int = Field(3, ge=0, le=50)
    deferrable: bool = False
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod", "keep_pod"] = "delete_pod"
    connection_id: str = Field("kubernetes_default", description="Airflow connection to the cluster.")
    in_cluster: bool | None = Field(None, description="None = as the Airflow connection says.")

    @model_validator(mode="before")
    @classmethod
    def _old_gpu_node_selectors(cls, data: Any) -> Any:
        """``gpu_node_selectors: {type: labels}`` (before Kueue) still loads, as ``gpu_types``."""
        if isinstance(data, dict) and "gpu_node_selectors" in data:
            data = dict(data)
            old = data.pop("gpu_node_selectors")
            if "gpu_types" in data:
                raise ValueError("set gpu_types only (gpu_node_selectors is its old name)")
            if not isinstance(old, dict):
                raise ValueError("gpu_node_selectors must map GPU types to node labels; write gpu_types")
            warnings.warn(
                "kubernetes.gpu_node_selectors is deprecated; write gpu_types: {<type>: {node_labels: ...}}",
                FutureWarning,  # shown by default, unlike DeprecationWarning
                stacklevel=2,
            )
            data["gpu_types"] = {k: {"node_labels": v} for k, v in old.items()}
        return data

    @field_validator("env", mode="before")
    @classmethod
    def _pod_env(cls, env: Any) -> Any:
        return check_pod_env(env) if isinstance(env, dict) else env

    @model_validator(mode="after")
    def _env_once(self) -> KubernetesSettings:
        twice = sorted(set(self.env) & set(self.secrets.env))
        if twice:
            raise ValueError(
                f"{', '.join(twice)} set in both kubernetes.env and kubernetes.secrets.env; keep one"
            )
        return self

    @property
    def pod_env(self) -> dict[str, str]:
        """The plain variables this environment adds to each training pod, defaults included."""
        return {**POD_ENV_DEFAULTS, **self.env}

    @field_validator("gpu_types")
    @classmethod
    def _flavor_names(cls, types: dict[str, GpuType]) -> dict[str, GpuType]:
        for name in types:
            if not re.match(DNS_LABEL, name) or len(name) > 50:
                raise ValueError(
                    f"GPU type '{name}' must be lowercase letters, digits and '-' (at most 50): it names "
                    "the Kueue ResourceFlavor trainyard-<type>"
                )
        return types

    def gpu_counts(self, team: str, field: str, value: GpuCount | None) -> dict[str, int] | None:
        """A team's GPUs per GPU type; a bare number needs exactly one GPU type (or none declared)."""
        if value is None:
            return None
        if isinstance(value, int):
            if value == 0:
                return dict.fromkeys(self.gpu_types or ("default",), 0)
            if len(self.gpu_types) > 1:
                raise ValueError(
                    f"teams.{team}.{field}: {value} is ambiguous with GPU types "
                    f"{', '.join(sorted(self.gpu_types))}; write {{<gpu_type>: <count>}}"
                )
            return {next(iter(self.gpu_types), "default"): value}
        unknown = sorted(set(value) - set(self.gpu_types))
        if unknown:
            raise ValueError(
                f"teams.{team}.{field}: unknown GPU type(s) {', '.join(unknown)}; "
                f"kubernetes.gpu_types has {', '.join(sorted(self.gpu_types)) or 'none'}"
            )
        return {gpu_type: value.get(gpu_type, 0) for gpu_type in self.gpu_types}

    @property
    def workload_priority_class(self) -> str:
        return self.kueue.workload_priority_class or self.priority_class

    def gpu_tolerations(self, gpu_type: str | None) -> tuple[Toleration, ...]:
        known = self.gpu_types.get(gpu_type or "")
        return self.tolerations if known is None or known.tolerations is None else known.tolerations

    @field_validator("image")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not PINNED_IMAGE.match(value) or value.endswith(":latest"):
            raise ValueError(
                f"image '{value}' must be pinned by a tag other than 'latest' or by @sha256 digest"
            )
        return value


GpuCount = int | dict[str, int]


class TeamStorage(StrictModel):
    """Where a team's pipelines may read data and base models: nobody trains on another team's data."""

    data: tuple[str, ...] = Field(
        min_length=1, description="Dataset prefixes (s3://bucket/prefix/ or /path/)."
    )
    models: tuple[str, ...] = Field(min_length=1, description="Base-model prefixes.")

    @field_validator("data", "models")
    @classmethod
    def _prefixes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        checked = []
        for value in values:
            if value.startswith("s3://"):
                bucket_and_key = value[5:]
                if not bucket_and_key.strip("/"):
                    raise ValueError(f"'{value}' names no bucket")
                check_uri(value.rstrip("/") + "/x")
            elif "://" in value or not value.startswith("/"):
                raise ValueError(f"'{value}' must be an s3://bucket/prefix/ URI or an absolute path")
            # A prefix is a folder: s3://data/nlp must not admit s3://data/nlp-secret/.
            checked.append(value if value.endswith("/") else value + "/")
        return tuple(checked)


class Team(StrictModel):
    """A team's share of this environment: GPU quota (a Kueue ClusterQueue), identity and storage."""

    gpus: GpuCount = Field(
        0, description="Nominal GPUs (guaranteed): a number, or {gpu_type: number} with several GPU types."
    )
    borrow_gpus: GpuCount | None = Field(
        None, description="How many idle GPUs of other teams it may borrow; null = no limit."
    )
    cpu: str = Field("32", description="Nominal CPU of the team's ClusterQueue.")
    memory: str = Field("256Gi", description="Nominal memory of the team's ClusterQueue.")
    storage: TeamStorage | None = Field(None, description="Required when the environment declares teams.")
    service_account: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, description="The team's pods run as this; null = trainyard-<team>."
    )
    credentials_secret: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN,
        description="Secret whose keys become the pod's env (S3 keys); null = trainyard-<team>-credentials.",
    )
    airflow_role: str | None = Field(
        None,
        min_length=1,
        description="Airflow role that may trigger and edit its DAGs; null = trainyard-<team>.",
    )
    workload_identity: bool = Field(
        False, description="true = no credentials Secret: the ServiceAccount carries a cloud role."
    )

    _quantities = field_validator("cpu", "memory", mode="before")(quantity)

    @field_validator("gpus", "borrow_gpus")
    @classmethod
    def _counts(cls, value: GpuCount | None) -> GpuCount | None:
        counts = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(count < 0 for count in counts):
            raise ValueError("GPU counts cannot be negative")
        return value


#: What Trainyard tells people about, by name: the keys of ``notifications.events``.
NOTIFICATION_EVENTS = (
    "run_failed",
    "model_promoted",
    "candidate_rejected",
    "approval_waiting",
    "run_skipped",
)


class EmailChannel(StrictModel):
    """Mail through an Airflow SMTP connection (the smtp provider's notifier)."""

    connection_id: str = Field("smtp_default", min_length=1, description="Airflow SMTP connection id.")
    from_email: str = Field(pattern=EMAIL.pattern, description="The From address.")
    to: tuple[str, ...] = Field((), description="Always mailed; pipelines add their owner and recipients.")

    _addresses = field_validator("to")(check_emails)


class SlackChannel(StrictModel):
    """A Slack incoming webhook through an Airflow connection (the slack provider's notifier)."""

    connection_id: str = Field(min_length=1, description="Airflow Slack incoming-webhook connection id.")


class Notifications(StrictModel):
    """Where the platform's events go. A notifier that fails is logged and never fails a run."""

    email: EmailChannel | None = None
    slack: SlackChannel | None = None
    events: tuple[Literal[NOTIFICATION_EVENTS], ...] = Field(  # type: ignore[valid-type]
        NOTIFICATION_EVENTS, description="Which events are sent (default: all)."
    )


class EnvironmentConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    launcher: Literal["local", "kubernetes"]
    airflow: AirflowDefaults = AirflowDefaults()
    mlflow: MlflowSettings
    storage: Storage
    kubernetes: KubernetesSettings | None = Field(None, description="Required when launcher is kubernetes.")
    teams: dict[str, Team] = Field(
        default_factory=dict,
        description="Teams allowed to train here, with quotas, identity and storage; empty = any team.",
    )
    notifications: Notifications | None = Field(None, description="Email and Slack for run events.")
    gpu_hour_price: dict[str, float] = Field(
        default_factory=dict,
        description="Price of one GPU-hour per GPU type ('default' for pods without a type); "
        "costs of runs and teams are computed from it.",
    )
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code of gpu_hour_price.")
    pipeline_files: YamlLimits = Field(
        YamlLimits(), description="What one pipeline file may cost to parse; a file over it is refused."
    )

    @model_validator(mode="after")
    def _kubernetes_when_needed(self) -> EnvironmentConfig:
        if self.launcher == "kubernetes" and self.kubernetes is None:
            raise ValueError("launcher 'kubernetes' needs a 'kubernetes' section (namespace, image, ...)")
        for name, team in self.teams.items():
            if not re.match(DNS_LABEL, name):
                raise ValueError(f"teams: '{name}' is not a valid team name (lowercase letters, digits, '-')")
            if name == "default":
                # Kueue puts every pod without a queue label into the LocalQueue named "default".
                raise ValueError(
                    "teams: 'default' is reserved (Kueue's default LocalQueue); pick another name"
                )
            if team.storage is None:
                raise ValueError(f"teams.{name}.storage is missing: list the team's data and models prefixes")
            if self.kubernetes is not None:
                if self.kubernetes.secrets.env_from:
                    raise ValueError(
                        "kubernetes.secrets.env_from is shared by every team: with teams declared, each "
                        "team's pods get their own credentials (teams.<team>.credentials_secret); remove it"
                    )
                for field in ("gpus", "borrow_gpus"):
                    self.kubernetes.gpu_counts(name, field, getattr(team, field))
        if self.kubernetes is not None and self.kubernetes.scheduling == "kueue":
            if not self.teams:
                raise ValueError(
                    "kubernetes.scheduling is kueue but no teams are declared: "
                    "add teams: {<team>: {gpus: ...}}"
                )
            if not self.kubernetes.gpu_types:
                raise ValueError(
                    "kubernetes.scheduling is kueue but kubernetes.gpu_types is empty: each GPU type "
                    "becomes a ResourceFlavor; add gpu_types: {<type>: {node_labels: {...}}}"
                )
        return self

    @field_validator("gpu_hour_price")
    @classmethod
    def _prices(cls, prices: dict[str, float]) -> dict[str, float]:
        for gpu_type, price in prices.items():
            if not (price >= 0 and price < 1e6):
                raise ValueError(f"gpu_hour_price.{gpu_type} = {price}: a price is a number from 0 to 1e6")
        return prices

    def price_per_gpu_hour(self, gpu_type: str | None) -> float | None:
        """What one GPU-hour of ``gpu_type`` costs here; None when no price is set for it."""
        prices = self.gpu_hour_price
        return prices.get(gpu_type or "default", prices.get("default"))

    def team(self, name: str) -> Team | None:
        return self.teams.get(name)

    def team_service_account(self, name: str) -> str:
        """Who a team's pods run as: its own ServiceAccount, or the shared one without teams."""
        team = self.teams.get(name)
        assert self.kubernetes is not None
        if team is None:
            return self.kubernetes.service_account
        return team.service_account or f"trainyard-{name}"

    def team_credentials_secrets(self, name: str) -> tuple[str, ...]:
        """Secrets whose keys become the pod's env: the team's own, or the shared ones without teams."""
        team = self.teams.get(name)
        assert self.kubernetes is not None
        if team is None:
            return self.kubernetes.secrets.env_from
        if team.workload_identity:
            return ()
        return (team.credentials_secret or f"trainyard-{name}-credentials",)

    def team_airflow_role(self, name: str) -> str | None:
        """The Airflow role of a declared team; None without teams (then no DAG-level access control)."""
        team = self.teams.get(name)
        if team is None:
            return None
        return team.airflow_role or f"trainyard-{name}"

    def cluster_queue(self, team: str) -> str:
        return f"trainyard-{self.name}-{team}"

    @staticmethod
    def local_queue(team: str) -> str:
        return team
