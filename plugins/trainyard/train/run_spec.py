"""The trainer's input for one DAG run and try: the resolved pipeline plus what validate_data approved.

This lives in the train stage, not in config: a ``ResolvedPipeline`` is what the YAML says, and a
run spec also needs the run's identity and the approval, which exist only once a DAG run does.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import TYPE_CHECKING

from trainer.spec import MlflowSpec, RunIdentity, RunSpec
from trainyard.config.loading import ResolvedPipeline, join_uri

if TYPE_CHECKING:
    from trainyard.handoff import Approval

log = logging.getLogger(__name__)
#: Upper bound for the JSON run spec, which travels as one argv element.
MAX_SPEC_BYTES = 64 * 1024


def checkpoint_dir(pipeline: ResolvedPipeline, run_id: str, inputs: str) -> str:
    """<root>/<pipeline>/<run>/<inputs>: a relaunch resumes only the same run on the same inputs.

    ``inputs`` identifies the data and settings (see ``run_spec``); when a cleared run trains on
    changed data or hyperparameters it starts afresh instead of resuming weights from other inputs.
    The run id keeps a short hash so that ids differing only in odd characters never collide.
    """
    safe_run = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)[:80]
    run_hash = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return join_uri(
        pipeline.environment.storage.checkpoint_root, f"{pipeline.name}/{safe_run}-{run_hash}/{inputs}"
    )


def run_spec(pipeline: ResolvedPipeline, approval: Approval, run_id: str, try_number: int) -> RunSpec:
    """The spec ``python -m trainer`` gets, kept under ``MAX_SPEC_BYTES`` (the report goes first)."""
    env = pipeline.environment
    model = pipeline.config.model.model_copy(update={"base": pipeline.model_base})
    hyperparameters = approval.hyperparameters
    inputs = hashlib.sha256(
        "\n".join([approval.fingerprint, model.model_dump_json(), hyperparameters.model_dump_json()]).encode()
    ).hexdigest()[:12]
    spec = RunSpec(
        identity=RunIdentity(
            pipeline=pipeline.name,
            environment=env.name,
            dag_id=pipeline.name,
            run_id=run_id,
            try_number=try_number,
        ),
        data=pipeline.data_spec,
        dataset_fingerprint=approval.fingerprint,
        model=model,
        hyperparameters=hyperparameters,
        mlflow=MlflowSpec(
            tracking_uri=env.mlflow.tracking_uri,
            experiment_name=pipeline.experiment_name,
            artifact_location=env.mlflow.artifact_location,
        ),
        checkpoint_dir=checkpoint_dir(pipeline, run_id, inputs),
        s3_endpoint_url=env.storage.s3_endpoint_url,
        keep_checkpoints=env.storage.keep_checkpoints,
        validation_report=approval.report,
        team=pipeline.config.team,
        content_key=approval.content_key,
        champion=approval.champion,
    )
    if len(spec.model_dump_json()) > MAX_SPEC_BYTES:
        # The spec is one argv element (Linux caps one at 128 KiB); the report stays in the task log.
        log.warning("Validation report too large for the run spec: not sent to the trainer")
        spec = spec.model_copy(update={"validation_report": None})
    return spec
