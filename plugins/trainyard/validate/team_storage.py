"""The run-time gate on a team's storage: ``validate_data`` reads nothing outside its team's prefixes.

Lint and DAG parsing already refuse such a pipeline (``trainyard.config.loading._team_problems``), but
the check that matters is the one next to the read: a DAG file parsed under another environment file,
a worker whose environment differs from the dag-processor's, or a folder of the team's that was
replaced by a symlink into another team's data would all pass a parse-time check. Here the resolved
locations are checked again, with local paths resolved (symlinks, ``..``) as the reader would open them.
No I/O on object storage, no pyarrow: it runs before anything is read.
"""

from __future__ import annotations

import os

from trainyard.config.loading import ResolvedPipeline, outside_prefixes, storage_locations, undeclared_team


class OutsideTeamStorage(ValueError):
    """A location of the pipeline lies outside its team's storage (or the team is not declared)."""


def _as_read(location: str) -> str:
    """The location the reader would open: local paths with symlinks and ``..`` resolved."""
    if "://" in location:
        return location
    return os.path.realpath(location)


def _as_prefix(prefix: str) -> str:
    return prefix if "://" in prefix else os.path.realpath(prefix).rstrip("/") + "/"


def team_storage_problems(pipeline: ResolvedPipeline) -> list[str]:
    """Why this pipeline may not read its inputs here; empty when it may (or no teams are declared)."""
    environment = pipeline.environment
    team_name = pipeline.config.team
    if not environment.teams:
        return []
    team = environment.team(team_name)
    if team is None:
        return [undeclared_team(environment, team_name)]
    assert team.storage is not None  # the environment schema requires it with teams
    problems = []
    for loc, location, kind in storage_locations(pipeline.config, environment):
        prefixes = team.storage.data if kind == "data" else team.storage.models
        read = _as_read(location)
        if outside_prefixes(read, tuple(_as_prefix(p) for p in prefixes)):
            via = f" (resolves to '{read}')" if read != location else ""
            problems.append(
                f"{'.'.join(loc)} '{location}'{via} is outside team '{team_name}''s {kind} prefixes "
                f"{', '.join(prefixes)} (teams.{team_name}.storage.{kind})"
            )
    return problems


def require_team_storage(pipeline: ResolvedPipeline) -> None:
    """Raise :class:`OutsideTeamStorage` naming every offending location and the allowed prefixes."""
    problems = team_storage_problems(pipeline)
    if problems:
        raise OutsideTeamStorage(
            f"Pipeline '{pipeline.name}' may not read outside its team's storage in environment "
            f"'{pipeline.environment.name}', so nothing was read: {'; '.join(problems)}."
        )
