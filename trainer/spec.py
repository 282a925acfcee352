"""The trainer's input contract: everything ``python -m trainer`` accepts, as one JSON document.

This module is the single source of truth for what a training run may be told. It imports only
pydantic so the Airflow side (which has no torch) validates pipelines and trigger-time overrides
against the very same models at parse time: the two sides can never disagree on what is valid.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPEC_VERSION = 1

#: Metrics the trainer reports for the validation split, with the direction that is better.
#: Promotion rules may only name these, so a typo is caught when the YAML is loaded.
EVAL_METRICS: dict[str, Literal["max", "min"]] = {
    "eval_accuracy": "max",
    "eval_f1_macro": "max",
    "eval_loss": "min",
}

#: Exit codes of ``python -m trainer``. 2 and 3 mean that retrying the same spec cannot help;
#: 143 (SIGTERM) means a checkpoint was saved and a relaunch resumes from it.
EXIT_OK, EXIT_FAILED, EXIT_INVALID_SPEC, EXIT_BAD_INPUT = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
PERMANENT_EXIT_CODES = frozenset({EXIT_INVALID_SPEC, EXIT_BAD_INPUT})

#: The artifact path under the MLflow run where the trained model is logged.
MODEL_ARTIFACT = "model"

#: A dataset fingerprint: the SHA-256 of the validated bytes.
FINGERPRINT_PATTERN = r"^sha256:[0-9a-f]{64}$"
_FINGERPRINT = re.compile(FINGERPRINT_PATTERN)


#: MLflow tags of a training run: promotion finds the run of a DAG run by them, so their names are
#: a contract between the trainer and the Airflow side.
TAG_PIPELINE = "trainyard.pipeline"
TAG_ENVIRONMENT = "trainyard.environment"
TAG_FINGERPRINT = "trainyard.dataset_fingerprint"
TAG_DAG_ID = "airflow.dag_id"
TAG_RUN_ID = "airflow.run_id"
TAG_TRY_NUMBER = "airflow.try_number"
TAG_MODEL_URI = "trainyard.model_uri"
TAG_RESUMED_FROM_STEP = "trainyard.resumed_from_step"
TAG_TEAM = "trainyard.team"
#: What the run was made of (data, training section, base model, trainer build): a DAG run whose
#: inputs have the same key as the champion's or the last successful run's is skipped.
TAG_CONTENT_KEY = "trainyard.content_key"
#: Set on the MLflow run recorded for a DAG run that trained nothing: ``skipped`` when its inputs
#: were identical to an earlier run's (named by TAG_SKIPPED_FOR, the MLflow run id).
TAG_OUTCOME = "trainyard.outcome"
OUTCOME_SKIPPED = "skipped"
TAG_SKIPPED_FOR = "trainyard.skipped_for"
TAG_SKIP_REASON = "trainyard.skip_reason"

#: The champion, re-scored by the trainer on the candidate's validation split with the same code:
#: its metrics are logged on the candidate run as CHAMPION_METRIC_PREFIX + the EVAL_METRICS name
#: (``champion_eval_f1_macro``) and promotion decides on that pair. The tags say which version was
#: scored, or why it could not be (then no champion_* metric exists).
CHAMPION_METRIC_PREFIX = "champion_"
TAG_CHAMPION_SCORED_VERSION = "trainyard.champion.version"
TAG_CHAMPION_UNSCORABLE = "trainyard.champion.unscorable"  # the reason, as a sentence
#: Artifacts of the evaluation on the candidate run: per-class precision/recall/F1 and support of
#: both models as one JSON document, and one confusion-matrix image per model.
EVALUATION_ARTIFACT_DIR = "evaluation"
PER_CLASS_ARTIFACT = f"{EVALUATION_ARTIFACT_DIR}/per_class.json"
CONFUSION_CANDIDATE_ARTIFACT = f"{EVALUATION_ARTIFACT_DIR}/confusion_candidate.png"
CONFUSION_CHAMPION_ARTIFACT = f"{EVALUATION_ARTIFACT_DIR}/confusion_champion.png"

#: Why a run ended FAILED or KILLED, set by the trainer as it stops; ``trainyard summary`` reads them
#: and a later successful attempt of the same run removes them.
TAG_ERROR = "trainyard.error"  # "<ExceptionType>: <message>", truncated to ERROR_TAG_CHARS
TAG_ERROR_STAGE = "trainyard.error_stage"  # one of STAGES
TAG_EXIT_CODE = "trainyard.exit_code"  # what ``python -m trainer`` exits with (see EXIT_*)
TAG_CHECKPOINT_STEP = "trainyard.checkpoint_step"  # the newest complete checkpoint kept, if any
ERROR_TAGS = (TAG_ERROR, TAG_ERROR_STAGE, TAG_EXIT_CODE, TAG_CHECKPOINT_STEP)
ERROR_TAG_CHARS = 1000

#: The stages of a run, in order. A failure after "training" keeps the final checkpoint, so a
#: retry resumes at the last step and repeats only the stage that failed and those after it.
STAGE_SETUP, STAGE_TRAINING, STAGE_EVALUATION, STAGE_MODEL_LOGGING, STAGE_FINISHING = (
    "setup",
    "training",
    "evaluation",
    "model logging",
    "finishing",
)
#: Scoring the champion on this run's validation split (only when the spec names one); a champion
#: that cannot be scored does not fail the run, so a failure here is the tracking server's.
STAGE_CHAMPION_EVALUATION = "champion evaluation"
STAGES = (
    STAGE_SETUP,
    STAGE_TRAINING,
    STAGE_EVALUATION,
    STAGE_CHAMPION_EVALUATION,
    STAGE_MODEL_LOGGING,
    STAGE_FINISHING,
)
STAGES_AFTER_TRAINING = frozenset(
    {STAGE_EVALUATION, STAGE_CHAMPION_EVALUATION, STAGE_MODEL_LOGGING, STAGE_FINISHING}
)


class StrictModel(BaseModel):
    """Unknown keys are errors and values are immutable: the base of every Trainyard schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def unique_labels(names: tuple[str, ...]) -> tuple[str, ...]:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"label names must be unique; repeated: {', '.join(duplicates)}")
    return names


class Hyperparameters(StrictModel):
    """Training knobs. Pipelines may expose a subset of these to trigger-time overrides."""

    epochs: float = Field(1.0, gt=0, le=100, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: int = Field(32, ge=1, le=4096, description="Examples per device per step.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed for data order and init.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Steps per optimizer update.")
    checkpoint_every_steps: int = Field(
        200, ge=1, le=1_000_000, description="Save a resumable checkpoint every N optimizer steps."
    )
    # -- speed: the defaults are the fast choice; each is recorded in the run's MLflow params -----
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together: less padding per batch."
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel: PyTorch scaled_dot_product_attention, or eager."
    )
    tf32: bool = Field(True, description="TF32 matmuls on GPUs that have them (Ampere and newer).")
    optimizer: Literal["adamw_fused", "adamw"] = Field(
        "adamw_fused", description="AdamW in one fused kernel per step, or the per-tensor loop."
    )
    compile: bool = Field(False, description="torch.compile the model (slower start, faster steps).")
    dataloader_workers: int | None = Field(
        None, ge=0, le=64, description="Data-loader worker processes per rank; default 2 on GPU, 0 on CPU."
    )
    eval_batch_size: int | None = Field(
        None, ge=1, le=16384, description="Examples per device per evaluation step; default 2x batch_size."
    )
    class_weights: Literal["auto", "none"] = Field(
        "none",
        description="auto = weight the loss by inverse class frequency (for skewed labels); none = plain.",
    )


class ModelSpec(StrictModel):
    """The base model to fine-tune."""

    base: str = Field(
        min_length=1,
        description="Local directory, s3:// prefix, or hf://<org>/<name> for a Hub model id.",
    )
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per example after truncation.")


class DataSpec(StrictModel):
    """Where the resolved dataset lives and how to read it."""

    train_uri: str = Field(min_length=1)
    validation_uri: str = Field(min_length=1)
    format: Literal["csv", "parquet"]
    text_column: str = Field(min_length=1)
    label_column: str = Field(min_length=1)
    label_names: tuple[str, ...] = Field(min_length=2)

    _unique_labels = field_validator("label_names")(unique_labels)


class MlflowSpec(StrictModel):
    tracking_uri: str = Field(min_length=1)
    experiment_name: str = Field(min_length=1)
    artifact_location: str | None = Field(
        None, description="Only for a new experiment on a local store; servers choose their own."
    )


class RunIdentity(StrictModel):
    """Who asked for this run; written to MLflow tags so promotion can find the run again."""

    pipeline: str = Field(min_length=1)
    environment: str = Field(min_length=1)
    dag_id: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    try_number: int = Field(1, ge=0)


class ChampionRef(StrictModel):
    """The model version holding the champion alias when the run was launched: the trainer scores it
    on this run's validation split, so promotion compares both models on the same data."""

    name: str = Field(min_length=1, description="Registered model name.")
    version: str = Field(min_length=1)
    model_uri: str = Field(min_length=1, description="What mlflow.artifacts can download (models:/...).")
    run_id: str | None = Field(None, description="The MLflow run it was trained in.")


class RunSpec(StrictModel):
    """One training run, fully resolved: nothing in it is looked up again by the trainer."""

    spec_version: Literal[1] = SPEC_VERSION
    identity: RunIdentity
    data: DataSpec
    dataset_fingerprint: str
    model: ModelSpec
    hyperparameters: Hyperparameters
    mlflow: MlflowSpec
    checkpoint_dir: str = Field(min_length=1, description="Directory for this DAG run's checkpoints.")
    s3_endpoint_url: str | None = None
    keep_checkpoints: bool = Field(False, description="Keep checkpoints after a successful run.")
    validation_report: dict | None = Field(None, description="Logged as an MLflow artifact.")
    champion: ChampionRef | None = Field(None, description="Scored on the validation split too.")
    team: str | None = Field(None, description="Recorded as a run tag (reports group by it).")
    content_key: str | None = Field(None, description="Recorded as a run tag (see TAG_CONTENT_KEY).")

    @field_validator("dataset_fingerprint")
    @classmethod
    def _fingerprint_format(cls, value: str) -> str:
        if not _FINGERPRINT.match(value):
            raise ValueError("must look like 'sha256:<64 hex digits>'")
        return value

    @model_validator(mode="after")
    def _checkpoint_not_in_data(self) -> RunSpec:
        if self.checkpoint_dir.rstrip("/") in {self.data.train_uri, self.data.validation_uri}:
            raise ValueError("checkpoint_dir must not be a dataset file")
        return self


_CLASS_ID = re.compile(r"^[0-9]{1,9}$")


def label_id(value: object, label_names: tuple[str, ...]) -> int | None:
    """The class id of one label value, or None: the rule validate_data and the trainer share.

    A value is a label name, or a class id 0..n-1 written as an integer, an integral float, a
    boolean (False/True = 0/1) or, as CSV reads them, a string of digits.
    """
    if isinstance(value, str):
        if value in label_names:
            return label_names.index(value)
        value = int(value) if _CLASS_ID.match(value) else None
    elif isinstance(value, float):
        value = int(value) if value.is_integer() else None
    if isinstance(value, int) and 0 <= int(value) < len(label_names):
        return int(value)
    return None


def run_tags(
    identity: RunIdentity,
    dataset_fingerprint: str,
    *,
    team: str | None = None,
    content_key: str | None = None,
) -> dict[str, str]:
    """The MLflow run tags that identify a training run; promotion, the skip check and reports
    search by them."""
    tags = {
        TAG_PIPELINE: identity.pipeline,
        TAG_ENVIRONMENT: identity.environment,
        TAG_FINGERPRINT: dataset_fingerprint,
        TAG_DAG_ID: identity.dag_id,
        TAG_RUN_ID: identity.run_id,
        TAG_TRY_NUMBER: str(identity.try_number),
    }
    if team:
        tags[TAG_TEAM] = team
    if content_key:
        tags[TAG_CONTENT_KEY] = content_key
    return tags
