"""Trigger-time overrides: the JSON schema behind the Airflow trigger form, and the gate in front of it.

Only hyperparameters a pipeline lists under ``overridable`` are reachable from a DAG run's conf, so
overrides cannot escalate: image, resources and the like are never reachable. Airflow enforces a
declared Param's schema, but conf keys that are not declared Params pass Airflow silently, so
``validate_conf`` re-checks the whole conf before any data is read or any pod is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import ValidationError

from trainer.spec import Hyperparameters
from trainyard.config.errors import suggest_key
from trainyard.config.loading import ResolvedPipeline

#: The JSON Schema dialect of the trigger-form Params. Airflow checks a Param's schema against its
#: dialect's metaschema every time it resolves the Param (at least once per scheduled DAG parse).
#: The default 2020-12 metaschema is split into vocabularies joined by $ref/allOf and costs ~0.4 ms
#: per check; draft-07's is one flat document (~0.15 ms), and our keywords mean the same in both.
PARAM_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"

_SCHEMA_KEYWORDS = (
    "type",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "enum",
    "description",
    "multipleOf",
)


#: The one conf key that is not a hyperparameter: train even when the inputs are unchanged.
FORCE_RETRAIN = "force_retrain"
FORCE_RETRAIN_SCHEMA: dict[str, Any] = {
    "type": "boolean",
    "default": False,
    "description": "Train even if an earlier run had identical inputs (data, training section, "
    "base model, trainer); otherwise such a run is skipped.",
}


class ConfRejected(ValueError):
    """A DAG run's conf asked for something the pipeline does not allow."""


@cache
def _hyperparameter_schemas() -> dict[str, dict[str, Any]]:
    return Hyperparameters.model_json_schema()["properties"]


def _flatten_nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic writes ``int | None`` as anyOf; the Airflow form understands a type list better."""
    if "anyOf" not in schema:
        return schema
    variants = schema["anyOf"]
    concrete = [v for v in variants if v.get("type") != "null"]
    if len(concrete) != 1:
        return schema
    merged = {**concrete[0], **{k: v for k, v in schema.items() if k != "anyOf"}}
    merged["type"] = [concrete[0]["type"], "null"]
    return merged


def param_schemas(pipeline: ResolvedPipeline) -> dict[str, dict[str, Any]]:
    """{conf key: JSON schema with the pipeline's value as default} for each overridable field,
    and ``force_retrain``."""
    training = pipeline.config.training
    schemas: dict[str, dict[str, Any]] = {FORCE_RETRAIN: dict(FORCE_RETRAIN_SCHEMA)}
    for name in pipeline.config.overridable:
        source = _flatten_nullable(_hyperparameter_schemas()[name])
        schema = {k: source[k] for k in _SCHEMA_KEYWORDS if k in source}
        schema["default"] = getattr(training, name)
        schemas[name] = schema
    return schemas


def validate_conf(pipeline: ResolvedPipeline, conf: Mapping[str, Any] | None) -> Hyperparameters:
    """The hyperparameters for this run, or ConfRejected naming every offending key."""
    conf = dict(conf or {})
    force_retrain(pipeline, conf)  # a bad value is rejected with the rest
    conf.pop(FORCE_RETRAIN, None)
    allowed = list(pipeline.config.overridable)
    allowed_text = ", ".join([*allowed, FORCE_RETRAIN])
    problems = []
    for key in conf:
        if key not in allowed:
            hint = suggest_key(key, [*allowed, FORCE_RETRAIN])
            kind = (
                "is not overridable in this pipeline"
                if key in Hyperparameters.model_fields
                else "is not a known setting"
            )
            problems.append(f"'{key}' {kind}" + (f" ({hint})" if hint and "did you mean" in hint else ""))
    if problems:
        raise ConfRejected(
            f"Trigger conf rejected for pipeline '{pipeline.name}': {'; '.join(problems)}. "
            f"Allowed keys: {allowed_text}."
        )
    try:
        return Hyperparameters.model_validate({**pipeline.config.training.model_dump(), **conf})
    except ValidationError as exc:
        details = "; ".join(
            f"'{'.'.join(map(str, e['loc']))}' = {e.get('input')!r}: {e['msg']}" for e in exc.errors()
        )
        raise ConfRejected(f"Trigger conf rejected for pipeline '{pipeline.name}': {details}.") from None


def force_retrain(pipeline: ResolvedPipeline, conf: Mapping[str, Any] | None) -> bool:
    """Whether the conf forces training on unchanged inputs; anything but a boolean is rejected."""
    value = (conf or {}).get(FORCE_RETRAIN, False)
    if not isinstance(value, bool):
        raise ConfRejected(
            f"Trigger conf rejected for pipeline '{pipeline.name}': '{FORCE_RETRAIN}' = {value!r}: "
            "must be true or false."
        )
    return value
