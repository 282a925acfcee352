"""Load pipeline and environment YAML into one typed, resolved pipeline per (file, environment)."""

from __future__ import annotations

import copy
import os
import posixpath
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer.spec import DataSpec
from trainyard import paths
from trainyard.config.environment_schema import EnvironmentConfig
from trainyard.config.errors import ConfigError, Loc, Problem, problems_from_validation, suggest_key
from trainyard.config.parse_cache import ParseCache
from trainyard.config.pipeline_schema import DEPRECATED_FIELDS, RESOURCE_FIELDS, PipelineConfig
from trainyard.config.yaml_source import line_index, nearest_line, read_mapping

ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Fields an environment override may not touch: they define which DAG this is.
NOT_OVERRIDABLE_PER_ENV = ("name", "environments")


def _locator(text: str, prefix: Loc = ()) -> Any:
    index: dict[Loc, int] | None = None

    def locate(loc: Loc) -> tuple[Loc, int | None]:
        nonlocal index
        if index is None:
            index = line_index(text)
        full = (*prefix, *loc)
        return full, nearest_line(index, full)

    return locate


# --------------------------------------------------------------------------- environments


def _expand_env_vars(value: Any, path: Path, loc: Loc = ()) -> Any:
    """Expand ${VAR} in string values; TRAINYARD_HOME defaults to the project's state directory."""
    if isinstance(value, dict):
        return {k: _expand_env_vars(v, path, (*loc, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env_vars(v, path, (*loc, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "TRAINYARD_HOME":
            return str(paths.trainyard_home())
        if name not in os.environ:
            raise ConfigError(
                path,
                [
                    Problem(
                        ".".join(map(str, loc)),
                        f"environment variable ${{{name}}} is not set",
                        None,
                        f"export {name}=... before starting Airflow",
                    )
                ],
            )
        return os.environ[name]

    return ENV_VAR.sub(substitute, value)


def available_environments(environments_dir: Path | None = None) -> list[str]:
    directory = environments_dir or paths.environments_dir()
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_environment(name: str | None = None, environments_dir: Path | None = None) -> EnvironmentConfig:
    name = name or paths.environment_name()
    directory = environments_dir or paths.environments_dir()
    path = directory / f"{name}.yaml"
    if not path.exists():
        known = available_environments(directory)
        raise ConfigError(
            path,
            [Problem("", f"unknown environment '{name}' (TRAINYARD_ENV)", None, suggest_key(name, known))],
        )
    raw, text = read_mapping(path)
    raw = _expand_env_vars(raw, path)
    raw.setdefault("name", name)
    try:
        env = EnvironmentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, problems_from_validation(exc, EnvironmentConfig, _locator(text))) from None
    if env.name != name:
        raise ConfigError(path, [Problem("name", f"'{env.name}' does not match the file name '{name}.yaml'")])
    return env


# --------------------------------------------------------------------------- pipelines


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _has_path(data: Any, loc: Loc) -> bool:
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def join_uri(root: str, location: str) -> str:
    """Resolve a pipeline location against an environment root (absolute ones stay as written)."""
    if "://" in location or location.startswith("/"):
        return location.removeprefix("file://")
    relative = location.removeprefix("./")
    if root.startswith("s3://"):
        return f"{root.rstrip('/')}/{relative}"
    return str(Path(root) / relative)


@dataclass(frozen=True)
class ResolvedPipeline:
    """A pipeline as it runs in one environment: overrides applied, locations absolute."""

    config: PipelineConfig
    environment: EnvironmentConfig
    source: Path

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def schedule(self) -> str | None:
        """The cron or preset runs start on here; None where the environment turns schedules off."""
        return self.config.cron if self.environment.airflow.schedules_enabled else None

    @property
    def on_dataset_update(self) -> bool:
        """Whether asset events for the dataset start runs here (off with the environment's schedules)."""
        return self.config.on_dataset_update and self.environment.airflow.schedules_enabled

    def _naming(self, template: str) -> str:
        return template.format(pipeline=self.name, environment=self.environment.name, team=self.config.team)

    @property
    def dataset_uris(self) -> tuple[str, ...]:
        """The dataset's locations as Airflow asset URIs (local paths as file:// URIs)."""
        data = self.data_spec
        uris = []
        for location in dict.fromkeys((data.train_uri, data.validation_uri)):
            if "://" in location:
                uris.append(location)
            else:
                uris.append(Path(location).absolute().as_uri())
        return tuple(uris)

    @property
    def experiment_name(self) -> str:
        return self._naming(self.environment.mlflow.experiment_name)

    @property
    def registered_model_name(self) -> str:
        return self._naming(self.environment.mlflow.registered_model_name)

    @cached_property
    def data_spec(self) -> DataSpec:
        ds = self.config.dataset
        root = self.environment.storage.data_root
        return DataSpec(
            train_uri=join_uri(root, ds.train),
            validation_uri=join_uri(root, ds.validation),
            format=ds.resolved_format,
            text_column=ds.text_column,
            label_column=ds.label_column,
            label_names=ds.label_names,
        )

    @property
    def model_base(self) -> str:
        base = self.config.model.base
        return base if base.startswith("hf://") else join_uri(self.environment.storage.models_root, base)


def environment_limits(config: PipelineConfig, environment: EnvironmentConfig) -> list[tuple[Loc, str, str]]:
    """(field path, problem, fix) where the pipeline asks for more than the environment allows."""
    k8s = environment.kubernetes
    if k8s is None:
        return _team_problems(config, environment)
    from kubernetes.utils.quantity import parse_quantity

    found: list[tuple[Loc, str, str]] = []
    res = config.resources
    if res.gpus > k8s.caps.gpus:
        found.append(
            (
                ("resources", "gpus"),
                f"{res.gpus} GPUs exceed the cap of {k8s.caps.gpus} in '{environment.name}'",
                f"ask for at most {k8s.caps.gpus} or ask the platform team to raise caps.gpus",
            )
        )
    for field in RESOURCE_FIELDS:
        wanted, cap = res.resolved(field), getattr(k8s.caps, field)
        if parse_quantity(wanted) <= parse_quantity(cap):
            continue
        if res.gpus > k8s.caps.gpus and res.is_derived(field):
            continue  # follows the GPU count reported above: fixing that fixes this
        if not res.is_derived(field):
            found.append(
                (
                    ("resources", field),
                    f"{wanted} exceeds the cap of {cap} in '{environment.name}'",
                    f"ask for at most {cap}",
                )
            )
            continue
        # Not clamped: a pod quietly sized below what its GPUs need fails later (OOMKilled, starved
        # data loaders); here the owner chooses the size, or the platform team raises the cap.
        found.append(
            (
                ("resources", field),
                f"not set, so it follows gpus: {wanted} ({res.derivation(field)}), which exceeds the cap "
                f"of {cap} in '{environment.name}'",
                f"set resources.{field} to at most {cap}, or ask the platform team to raise caps.{field}",
            )
        )
    # Pods cannot see the Airflow worker's disk: data and base models must be in object storage.
    for loc, resolved, _ in storage_locations(config, environment):
        if not resolved.startswith("s3://"):
            found.append(
                (
                    loc,
                    f"'{resolved}' is a local path, which pods in '{environment.name}' cannot read",
                    "use an s3:// URI or a path relative to the environment's s3:// root",
                )
            )
    found.extend(_team_problems(config, environment))
    if res.gpu_type is not None and res.gpu_type not in k8s.gpu_types:
        known = list(k8s.gpu_types)
        found.append(
            (
                ("resources", "gpu_type"),
                f"unknown GPU type '{res.gpu_type}' in '{environment.name}'",
                suggest_key(res.gpu_type, known) or "this environment maps no GPU types",
            )
        )
    return found


def storage_locations(config: PipelineConfig, environment: EnvironmentConfig) -> list[tuple[Loc, str, str]]:
    """(field path, resolved location, "data" or "models") of what the pipeline reads from storage.

    A ``hf://`` base model is a public Hub id, not storage, and is left out.
    """
    roots = environment.storage
    found = []
    for loc, root, value, kind in (
        (("dataset", "train"), roots.data_root, config.dataset.train, "data"),
        (("dataset", "validation"), roots.data_root, config.dataset.validation, "data"),
        (("model", "base"), roots.models_root, config.model.base, "models"),
    ):
        if not value.startswith("hf://"):
            found.append((loc, join_uri(root, value), kind))
    return found


def undeclared_team(environment: EnvironmentConfig, team: str) -> str:
    known = ", ".join(sorted(environment.teams))
    return f"team '{team}' is not declared in environment '{environment.name}' (teams: {known})"


def _team_problems(config: PipelineConfig, environment: EnvironmentConfig) -> list[tuple[Loc, str, str]]:
    """The pipeline's team exists here, reads only its own storage, and its pod fits the team's quota."""
    if not environment.teams:
        return []
    team = environment.team(config.team)
    if team is None:
        hint = suggest_key(config.team, sorted(environment.teams))
        return [
            (
                ("team",),
                undeclared_team(environment, config.team),
                hint or "use one of those, or ask the platform team to add the team to the environment",
            )
        ]
    found: list[tuple[Loc, str, str]] = []
    assert team.storage is not None
    for loc, resolved, kind in storage_locations(config, environment):
        allowed = team.storage.data if kind == "data" else team.storage.models
        if not outside_prefixes(resolved, allowed):
            continue
        found.append(
            (
                loc,
                f"'{resolved}' is outside team '{config.team}''s storage in '{environment.name}'",
                f"move it under {' or '.join(allowed)} (teams.{config.team}.storage)",
            )
        )
    k8s = environment.kubernetes
    if k8s is not None and k8s.scheduling == "kueue" and config.resources.gpus:
        gpu_type = config.resources.gpu_type
        nominal = k8s.gpu_counts(config.team, "gpus", team.gpus) or {}
        borrow = k8s.gpu_counts(config.team, "borrow_gpus", team.borrow_gpus)
        types = [gpu_type] if gpu_type in nominal else list(nominal)
        if borrow is not None and all(nominal[t] + borrow[t] < config.resources.gpus for t in types):
            most = max(nominal[t] + borrow[t] for t in types) if types else 0
            found.append(
                (
                    ("resources", "gpus"),
                    f"{config.resources.gpus} GPUs can never be admitted for team '{config.team}' in "
                    f"'{environment.name}': its quota plus borrowing limit is {most}",
                    f"ask for at most {most}, or ask the platform team to raise teams.{config.team}.gpus "
                    "or borrow_gpus",
                )
            )
    return found


def outside_prefixes(location: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``location`` (a file or folder) lies under none of the prefixes (each ends with '/').

    A location with ``.`` or ``..`` segments is outside whatever it starts with: object stores do not
    agree on resolving them, so ``s3://data/nlp/../cv/x`` must not pass as nlp's.
    """
    _scheme, sep, rest = location.rpartition("://")
    if any(part in (".", "..") for part in rest.split("/")):
        return True
    normalized = location if sep else posixpath.normpath(location)
    return not any(normalized.startswith(prefix) or normalized + "/" == prefix for prefix in prefixes)


def load_pipeline(
    path: Path,
    environment: EnvironmentConfig,
    known_environments: list[str],
    cache: ParseCache | None = None,
) -> ResolvedPipeline:
    raw, text = read_mapping(path, environment.pipeline_files, cache)
    overrides = raw.get("environments") or {}
    problems: list[Problem] = []
    if isinstance(overrides, dict):
        for env_name, override in overrides.items():
            loc: Loc = ("environments", str(env_name))
            if env_name not in known_environments:
                line = nearest_line(line_index(text), loc)
                problems.append(
                    Problem(
                        ".".join(loc),
                        "no such environment",
                        line,
                        suggest_key(str(env_name), known_environments),
                    )
                )
            elif not isinstance(override, dict):
                problems.append(Problem(".".join(loc), "must be a mapping of fields to override"))
            else:
                for key in NOT_OVERRIDABLE_PER_ENV:
                    if key in override:
                        line = nearest_line(line_index(text), (*loc, key))
                        problems.append(
                            Problem(f"{'.'.join(loc)}.{key}", "cannot differ per environment", line)
                        )
    if problems:
        raise ConfigError(path, problems)

    override = overrides.get(environment.name, {}) if isinstance(overrides, dict) else {}
    merged = _deep_merge(raw, override)
    base_locate = _locator(text)
    override_locate = _locator(text, ("environments", environment.name))

    def locate(loc: Loc) -> tuple[Loc, int | None]:
        return override_locate(loc) if _has_path(override, loc) else base_locate(loc)

    try:
        config = PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(path, problems_from_validation(exc, PipelineConfig, locate)) from None
    problems = [
        Problem(".".join(map(str, rep)), message, line, hint)
        for loc, message, hint in environment_limits(config, environment)
        for rep, line in [locate(loc)]
    ]
    if problems:
        raise ConfigError(path, problems)
    _warn_deprecated(path, raw, text)
    if config.name != path.stem:
        raise ConfigError(
            path,
            [
                Problem(
                    "name",
                    f"'{config.name}' does not match the file name",
                    base_locate(("name",))[1],
                    f"rename the file to {config.name}.yaml or set name: {path.stem}",
                )
            ],
        )
    return ResolvedPipeline(config=config, environment=environment, source=path)


class DeprecatedFieldWarning(UserWarning):
    """An old field name that still works; the DAG processor shows it with the file."""


def _warn_deprecated(path: Path, raw: dict[str, Any], text: str) -> None:
    overrides = raw.get("environments") if isinstance(raw.get("environments"), dict) else {}
    scopes: list[tuple[Loc, Any]] = [
        ((), raw),
        *((("environments", str(k)), v) for k, v in overrides.items()),
    ]
    index: dict[Loc, int] | None = None
    for prefix, scope in scopes:
        for (section, old), new in DEPRECATED_FIELDS.items():
            if isinstance(scope, dict) and isinstance(scope.get(section), dict) and old in scope[section]:
                loc = (*prefix, section, old)
                index = index if index is not None else line_index(text)
                line = nearest_line(index, loc)
                where = f"line {line}, " if line else ""
                warnings.warn(
                    f"{path}: {where}{'.'.join(loc)} is deprecated; rename it to {section}.{new}",
                    DeprecatedFieldWarning,
                    stacklevel=2,
                )


def pipeline_files(pipelines_dir: Path | None = None) -> list[Path]:
    directory = pipelines_dir or paths.pipelines_dir()
    return sorted(directory.glob("*.yaml"))


def load_pipelines(
    environment: EnvironmentConfig,
    pipelines_dir: Path | None = None,
    environments_dir: Path | None = None,
    select: Callable[[Path], bool] | None = None,
    cache: ParseCache | None = None,
) -> tuple[list[ResolvedPipeline], list[ConfigError]]:
    """Every pipeline that loads, and every file that does not: a bad file never hides the good ones.

    ``select`` picks files by path before any is read (a loader file builds only its slice);
    ``cache`` skips parsing files whose text was parsed before (validation always runs).
    """
    known = available_environments(environments_dir)
    good: list[ResolvedPipeline] = []
    errors: list[ConfigError] = []
    for path in pipeline_files(pipelines_dir):
        if select is not None and not select(path):
            continue
        try:
            good.append(load_pipeline(path, environment, known, cache))
        except ConfigError as exc:
            errors.append(exc)
    if cache is not None:
        cache.save()
    return good, errors


def iter_lint(
    pipelines_dir: Path | None = None, environments_dir: Path | None = None
) -> Iterator[tuple[str, ConfigError]]:
    """(environment, error) for every problem across all environments; used by ``trainyard lint``."""
    for env_name in available_environments(environments_dir):
        try:
            env = load_environment(env_name, environments_dir)
        except ConfigError as exc:
            yield env_name, exc
            continue
        _, errors = load_pipelines(env, pipelines_dir, environments_dir)
        for error in errors:
            yield env_name, error
