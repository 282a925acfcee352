"""Schema of ``dags/environments/<env>.yaml``: what the platform team sets per deployment."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAMING_FIELDS = ("pipeline", "environment", "team")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AirflowDefaults(_Strict):
    schedules_enabled: bool = Field(True, description="false = every DAG is manual-only here (e.g. dev).")
    retries: int = Field(1, ge=0, le=20)
    retry_delay_minutes: float = Field(5, ge=0, le=24 * 60)
    execution_timeout_minutes: float = Field(
        360, gt=0, le=7 * 24 * 60, description="Upper bound for the train task."
    )


class MlflowSettings(_Strict):
    tracking_uri: str = Field(min_length=1, description="sqlite:///..., http(s)://mlflow-server, ...")
    artifact_location: str | None = Field(
        None, description="Artifact root for new experiments on a local store; omit for a server."
    )
    experiment_name: str = Field("{pipeline}", description="Template over {pipeline}, {environment}, {team}.")
    registered_model_name: str = Field("{pipeline}", description="Template, same fields.")

    @field_validator("experiment_name", "registered_model_name")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(**dict.fromkeys(NAMING_FIELDS, "x"))
        except (KeyError, IndexError, ValueError) as exc:
            allowed = ", ".join("{" + name + "}" for name in NAMING_FIELDS)
            raise ValueError(f"bad template '{value}' ({exc!r}); use only {allowed}") from None
        return value


class Storage(_Strict):
    data_root: str = Field(description="Relative dataset paths in pipelines resolve under this.")
    models_root: str = Field(description="Relative base-model paths resolve under this.")
    checkpoint_root: str = Field(description="Checkpoints go to <root>/<pipeline>/<dag run>.")
    s3_endpoint_url: str | None = Field(None, description="For MinIO or another S3-compatible store.")
    keep_checkpoints: bool = Field(False, description="Keep checkpoints after a successful run.")


class EnvironmentConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    launcher: Literal["local", "kubernetes"]
    airflow: AirflowDefaults = AirflowDefaults()
    mlflow: MlflowSettings
    storage: Storage
