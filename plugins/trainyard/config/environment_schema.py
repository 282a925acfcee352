"""Schema of ``dags/environments/<env>.yaml``: what the platform team sets per deployment."""

from __future__ import annotations

import re
from string import Formatter
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from trainer.spec import StrictModel
from trainyard.config.pipeline_schema import check_uri, quantity
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


class KubernetesSettings(StrictModel):
    namespace: str = Field(pattern=DNS_LABEL)
    image: str = Field(description="Trainer image, pinned by tag (not 'latest') or by digest.")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    service_account: str = Field(pattern=DNS_SUBDOMAIN)
    priority_class: str = Field(pattern=DNS_SUBDOMAIN)
    gpu_node_selectors: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Pipeline gpu_type -> node selector labels."
    )
    tolerations: tuple[Toleration, ...] = ()
    secrets: Secrets = Secrets()
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

    @field_validator("image")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not PINNED_IMAGE.match(value) or value.endswith(":latest"):
            raise ValueError(
                f"image '{value}' must be pinned by a tag other than 'latest' or by @sha256 digest"
            )
        return value


class EnvironmentConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    launcher: Literal["local", "kubernetes"]
    airflow: AirflowDefaults = AirflowDefaults()
    mlflow: MlflowSettings
    storage: Storage
    kubernetes: KubernetesSettings | None = Field(None, description="Required when launcher is kubernetes.")
    pipeline_files: YamlLimits = Field(
        YamlLimits(), description="What one pipeline file may cost to parse; a file over it is refused."
    )

    @model_validator(mode="after")
    def _kubernetes_when_needed(self) -> EnvironmentConfig:
        if self.launcher == "kubernetes" and self.kubernetes is None:
            raise ValueError("launcher 'kubernetes' needs a 'kubernetes' section (namespace, image, ...)")
        return self
