"""Schema of ``dags/pipelines/<name>.yaml``: what a model owner writes."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trainer.spec import EVAL_METRICS, Hyperparameters, ModelSpec, StrictModel, unique_labels

PIPELINE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
AIRFLOW_PRESETS = (
    "@once",
    "@continuous",
    "@hourly",
    "@daily",
    "@weekly",
    "@monthly",
    "@quarterly",
    "@yearly",
)
URI_SCHEMES = ("s3://", "file://")
EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+$")
K8S_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def check_uri(value: str) -> str:
    """A dataset location: s3://bucket/key, file:// or a local path (relative = under the data root)."""
    if ".." in PurePosixPath(value.split("://", 1)[-1]).parts:
        raise ValueError(f"'{value}' contains '..'; locations may not climb out of their root")
    if "://" in value and not value.startswith(URI_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise ValueError(f"unsupported URI scheme '{scheme}://'; use s3://bucket/key or a local path")
    if value.startswith("s3://"):
        bucket, _, key = value[len("s3://") :].partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) or not key:
            raise ValueError(f"'{value}' is not a valid s3:// URI; expected s3://<bucket>/<key>")
    return value


def quantity(value: Any) -> str:
    """A Kubernetes resource quantity such as 4, 500m or 16Gi (YAML may give a number)."""
    text = str(value)
    if not K8S_QUANTITY.match(text):
        raise ValueError(f"'{text}' is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    return text


def check_emails(values: tuple[str, ...]) -> tuple[str, ...]:
    """Mail addresses (name@domain), as given."""
    for value in values:
        if not EMAIL.match(value):
            raise ValueError(f"'{value}' is not an email address (name@domain)")
    return values


def file_format(uri: str) -> Literal["csv", "parquet"] | None:
    suffix = PurePosixPath(uri).suffix.lower()
    return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix)  # type: ignore[return-value]


class DataChecks(StrictModel):
    """Thresholds for ``validate_data``; a run stops before training when any is breached."""

    min_rows: int = Field(100, ge=1, description="Minimum rows in the training split.")
    min_validation_rows: int = Field(20, ge=1, description="Minimum rows in the validation split.")
    max_null_fraction: float = Field(0.0, ge=0, le=1, description="Rows with a null text or label.")
    max_empty_text_fraction: float = Field(0.01, ge=0, le=1, description="Rows whose text is blank.")
    min_class_share: float = Field(
        0.01, ge=0, lt=1, description="Each label's minimum share of rows (below it the run stops)."
    )
    warn_class_share: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="A label under this share of the training rows gets a warning (skewed labels).",
    )
    max_duplicate_fraction: float = Field(0.05, ge=0, le=1, description="Repeated texts within a split.")
    max_overlap_fraction: float = Field(
        0.0, ge=0, le=1, description="Validation texts also in train (leakage)."
    )


class DatasetConfig(StrictModel):
    train: str = Field(min_length=1, description="Training split: s3:// URI or path (relative = data root).")
    validation: str = Field(min_length=1, description="Validation split, same forms as train.")
    format: Literal["csv", "parquet"] | None = Field(None, description="Inferred from the file extension.")
    text_column: str = Field("text", min_length=1)
    label_column: str = Field("label", min_length=1)
    label_names: tuple[str, ...] = Field(min_length=2, description="Label values, in class-id order.")
    checks: DataChecks = DataChecks()

    @field_validator("train", "validation")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value)

    @model_validator(mode="after")
    def _format_known(self) -> DatasetConfig:
        if self.format is None:
            formats = {file_format(self.train), file_format(self.validation)}
            if None in formats or len(formats) != 1:
                raise ValueError(
                    "cannot infer the file format from the extensions of train/validation; "
                    "set dataset.format to csv or parquet"
                )
        return self

    _unique_labels = field_validator("label_names")(unique_labels)

    @property
    def resolved_format(self) -> Literal["csv", "parquet"]:
        return self.format or file_format(self.train)  # type: ignore[return-value]


#: What one rank (one GPU) needs from its pod when ``resources`` leaves cpu/memory/shm_size unset.
#: cpu: the rank's Python step loop plus its 2 DataLoader workers (the trainer's default on GPU)
#: and its pin-memory thread. memory: a CUDA process holds several GiB of host RSS, the rank has a
#: CPU copy of the model while loading it (BERT-large in fp32: 1.3 GB), the workers hold tokenized
#: batches, rank 0 stages the checkpoint (weights plus AdamW moments) on the host, and the
#: memory-backed /dev/shm counts against the same limit. shm_size: NCCL's shared-memory buffers and
#: the workers' collated batches, which are small for text. Scaled by max(gpus, 1): a CPU-only pod
#: (gpus: 0) gets what one rank gets. 8 GPUs get 32 CPUs and 128Gi: well inside the 96+ vCPUs and
#: 680+ GiB of the usual 8-GPU node types, so the pod still fits beside the node's daemons.
PER_GPU_DEFAULTS: dict[str, str] = {"cpu": "4", "memory": "16Gi", "shm_size": "2Gi"}
#: A derived /dev/shm is at most this share of the pod's memory (it counts against that limit).
SHM_SHARE_OF_MEMORY = Decimal(1) / 4
RESOURCE_FIELDS = tuple(PER_GPU_DEFAULTS)

_SUFFIXES = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity_value(text: str) -> Decimal:
    """A quantity accepted by ``quantity`` as a number (cores or bytes)."""
    match = K8S_QUANTITY.match(text)
    if match is None:
        raise ValueError(f"'{text}' is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(3) or ""]


def _bytes_quantity(value: Decimal) -> str:
    """Bytes as the largest binary unit that writes them whole (Gi, Mi, else Ki or bytes)."""
    whole = int(value)
    for suffix in ("Gi", "Mi", "Ki"):
        unit = _SUFFIXES[suffix]
        if whole >= unit and whole % unit == 0:
            return f"{whole // unit}{suffix}"
    return str(whole)


def _optional_quantity(value: Any) -> str | None:
    return None if value is None else quantity(value)


class Resources(StrictModel):
    """The training pod's size. cpu, memory and shm_size left out (null) scale with ``gpus``."""

    gpus: int = Field(1, ge=0, le=64, description="GPUs per training pod (one rank per GPU when > 1).")
    gpu_type: str | None = Field(None, description="Key into the environment's GPU node-selector map.")
    cpu: str | None = Field(
        None, description="CPU request and limit (Kubernetes quantity); null = 4 per GPU (4 without GPUs)."
    )
    memory: str | None = Field(
        None,
        description="Memory request and limit (Kubernetes quantity); null = 16Gi per GPU (16Gi without).",
    )
    shm_size: str | None = Field(
        None,
        description="Size of /dev/shm (memory-backed, counts against memory); null = 2Gi per GPU, "
        "at most a quarter of memory.",
    )

    _quantities = field_validator("cpu", "memory", "shm_size", mode="before")(_optional_quantity)

    @model_validator(mode="after")
    def _shm_fits_in_memory(self) -> Resources:
        shm, memory = self.resolved("shm_size"), self.resolved("memory")
        if quantity_value(shm) > quantity_value(memory):
            raise ValueError(
                f"shm_size {shm} is more than memory {memory}: /dev/shm is memory-backed and counts "
                "against the pod's memory limit; lower shm_size or raise memory"
            )
        return self

    def is_derived(self, field: str) -> bool:
        """Whether ``field`` (cpu, memory or shm_size) was left out and follows ``gpus``."""
        return getattr(self, field) is None

    def resolved(self, field: str) -> str:
        """The quantity the pod gets for ``field``: as written, else derived from ``gpus``."""
        written = getattr(self, field)
        if written is not None:
            return written
        per_gpu = quantity_value(PER_GPU_DEFAULTS[field])
        scaled = per_gpu * max(self.gpus, 1)
        if field == "cpu":
            return str(int(scaled)) if scaled == int(scaled) else f"{int(scaled * 1000)}m"
        if field == "shm_size":
            scaled = min(scaled, quantity_value(self.resolved("memory")) * SHM_SHARE_OF_MEMORY)
        return _bytes_quantity(scaled)

    def derivation(self, field: str) -> str:
        """How the default of ``field`` follows ``gpus``, for messages ("4 per GPU x 8 GPUs")."""
        count = f"{self.gpus} GPUs" if self.gpus > 1 else "1 GPU" if self.gpus else "no GPU, counted as 1"
        rule = f"{PER_GPU_DEFAULTS[field]} per GPU x {count}"
        return f"{rule}, at most a quarter of memory" if field == "shm_size" else rule

    @property
    def effective(self) -> dict[str, str]:
        """cpu, memory and shm_size as the pod gets them (what ``trainyard render`` shows)."""
        return {field: self.resolved(field) for field in RESOURCE_FIELDS}


#: Old field names still accepted, with what to write instead (``trainyard lint`` and the DAG
#: processor warn about each use).
DEPRECATED_FIELDS: dict[tuple[str, str], str] = {
    ("promotion", "min_value"): "must_reach",
}


class ApprovalPolicy(StrictModel):
    """A person signs off before the alias moves (only ever asked once the rule said "better")."""

    required: bool = Field(True, description="false = the alias moves as soon as the rule says so.")
    approvers: tuple[str, ...] = Field(
        (), description="Airflow user names who may approve; empty = anyone who may edit the DAG."
    )
    timeout_hours: float = Field(
        48, gt=0, le=24 * 30, description="Without an answer by then the candidate is not promoted."
    )

    @field_validator("approvers")
    @classmethod
    def _distinct(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name.strip() for name in names):
            raise ValueError("approver names must not be blank")
        return tuple(dict.fromkeys(names))


class Promotion(StrictModel):
    metric: str = Field("eval_f1_macro", description=f"One of: {', '.join(EVAL_METRICS)}.")
    must_reach: float | None = Field(
        None,
        description="The value the candidate's metric must reach: at least it for accuracy and F1, "
        "at most it for eval_loss.",
    )
    min_improvement: float = Field(0.0, ge=0, description="Required margin over the current champion.")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
    if_champion_unscorable: Literal["reject", "compare_recorded"] = Field(
        "reject",
        description="When the champion cannot be scored on the candidate's validation split (other "
        "labels, missing model): reject the candidate, or compare with the champion's recorded metric.",
    )
    approval: ApprovalPolicy | None = Field(None, description="Human sign-off before the alias moves.")

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data: Any) -> Any:
        """``min_value`` read wrongly for eval_loss, where it is a maximum; it still works."""
        if not isinstance(data, dict):
            return data
        for (section, old), new in DEPRECATED_FIELDS.items():
            if section == "promotion" and old in data:
                if new in data:
                    raise ValueError(f"{old} is the old name of {new}: set only {new}")
                data = {(new if k == old else k): v for k, v in data.items()}
        return data

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in EVAL_METRICS:
            raise ValueError(f"unknown metric '{value}'; the trainer reports: {', '.join(EVAL_METRICS)}")
        return value

    @property
    def direction(self) -> Literal["max", "min"]:
        return EVAL_METRICS[self.metric]


def check_cron(value: str) -> str:
    """A cron expression or one of Airflow's presets."""
    if value.startswith("@"):
        if value not in AIRFLOW_PRESETS:
            raise ValueError(f"unknown preset '{value}'; use one of {', '.join(AIRFLOW_PRESETS)}")
        return value
    from croniter import croniter

    if not croniter.is_valid(value):
        raise ValueError(f"'{value}' is not a valid cron expression (e.g. '0 3 * * 1')")
    return value


class Schedule(StrictModel):
    """When runs start besides manual triggers: a cron, new data (Airflow Assets), or both."""

    cron: str | None = Field(None, description="Cron expression or Airflow preset.")
    on_dataset_update: bool = Field(
        False, description="Run when an Airflow asset event names one of the dataset's locations."
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @model_validator(mode="after")
    def _combinable(self) -> Schedule:
        if self.on_dataset_update and self.cron in ("@once", "@continuous"):
            raise ValueError(f"cron '{self.cron}' cannot be combined with on_dataset_update; use a cron")
        return self


class PipelineNotifications(StrictModel):
    """Who else hears about this pipeline's runs (the environment decides the channels)."""

    email: tuple[str, ...] = Field((), description="Extra recipients of the environment's mail.")

    @field_validator("email")
    @classmethod
    def _addresses(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(check_emails(values)))


class PipelineConfig(StrictModel):
    name: str = Field(description="The DAG id; lowercase letters, digits and dashes.")
    description: str = ""
    owner: str = Field(min_length=1, description="Person or mailbox accountable for the model.")
    team: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")
    schedule: str | Schedule | None = Field(
        None,
        description="Cron expression, Airflow preset, {cron, on_dataset_update}, or null (manual only).",
    )
    dataset: DatasetConfig
    model: ModelSpec
    training: Hyperparameters = Hyperparameters()
    resources: Resources = Resources()
    promotion: Promotion = Promotion()
    overridable: tuple[str, ...] = Field((), description="Hyperparameters a trigger may override.")
    notifications: PipelineNotifications = PipelineNotifications()
    environments: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-environment overrides, merged over this file."
    )

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError(
                f"'{value}' is not a valid pipeline name; use lowercase letters, digits and dashes "
                "(at most 63 characters, starting and ending with a letter or digit)"
            )
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | Schedule | None) -> str | Schedule | None:
        return check_cron(value) if isinstance(value, str) else value

    @property
    def cron(self) -> str | None:
        """The time-based part of the schedule, whichever way it was written."""
        return self.schedule.cron if isinstance(self.schedule, Schedule) else self.schedule

    @property
    def on_dataset_update(self) -> bool:
        return isinstance(self.schedule, Schedule) and self.schedule.on_dataset_update

    @field_validator("overridable")
    @classmethod
    def _overridable_fields(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        allowed = Hyperparameters.model_fields
        for name in names:
            if name not in allowed:
                raise ValueError(
                    f"'{name}' cannot be overridden at trigger time; only training hyperparameters "
                    f"can: {', '.join(allowed)}"
                )
        return names
