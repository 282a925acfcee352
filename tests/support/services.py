"""Real services as subprocesses for system tests: Airflow 3 components, an MLflow server, moto S3.

Each service runs in its own process group (``start_new_session``) with stdout+stderr in a log file,
so :meth:`Service.stop` can end it *and its children* (LocalExecutor workers, uvicorn workers) with
SIGTERM, then SIGKILL after a grace period, and a failing test can show the tail of every log.
:class:`Services` is a context manager that stops everything it started, newest first, even when
the test fails; an ``atexit`` hook backs it up if the interpreter exits another way.

Everything binds to 127.0.0.1 on free ports; nothing here needs a network beyond loopback.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import requests

from tests.support.paths import ROOT

VENV_BIN = Path(sys.executable).parent
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
#: Keys of ``/api/v2/monitor/health`` for the components started by :func:`start_airflow`.
HEALTH_KEYS = {
    "scheduler": "scheduler",
    "dag-processor": "dag_processor",
    "triggerer": "triggerer",
}

_LIVE: set[Service] = set()


class ServiceError(RuntimeError):
    """A service did not start, died, or did not become ready; the message carries its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:])


class Service:
    """One long-running process (and its process group) with its output in ``log_path``."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd or ROOT
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches its children too
            )
        self.started_at = time.monotonic()
        _LIVE.add(self)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceError(
                f"{self.name} exited with code {self.proc.returncode}; last lines of {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # pgid == pid (start_new_session)

    def stop(self, grace: float = 20) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds; never raises."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            # Children may outlive a leader that exited on SIGTERM: kill what is left of the group.
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        finally:
            _LIVE.discard(self)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.proc.returncode if self.proc else '-'}"
        return f"<Service {self.name} pid={self.proc.pid if self.proc else '-'} {state}>"


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_LIVE):
        service.stop(grace=5)


class Services:
    """Starts services, reports their logs, and stops all of them on exit (newest first)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started: dict[str, Service] = {}

    def start(self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path | None = None) -> Service:
        if name in self.started and self.started[name].alive:
            raise ServiceError(f"{name} is already running")
        service = Service(name, argv, env, self.log_dir, cwd).start()
        self.started[name] = service
        return service

    def stop(self, *names: str, grace: float = 20) -> None:
        for name in names or reversed(list(self.started)):
            service = self.started.get(name)
            if service is not None:
                service.stop(grace)

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        for name in names or list(self.started):
            self.started[name].check_alive()

    def report(self, lines: int = 40) -> str:
        """The tail of every service's log, for a failure message."""
        parts = []
        for name, service in self.started.items():
            parts.append(f"----- {name} ({service!r}), last {lines} lines of {service.log_path} -----")
            parts.append(service.log_tail(lines))
        return "\n".join(parts)

    def wait_until(
        self,
        what: str,
        condition: Callable[[], Any],
        timeout: float,
        watch: Iterable[str] = (),
        interval: float = 0.5,
    ) -> Any:
        """Poll ``condition`` until it returns something truthy; fail early if a watched service dies."""
        watch = list(watch)
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            self.check_alive(watch)
            try:
                result = condition()
            except (requests.RequestException, OSError) as exc:
                result, last_error = None, exc
            if result:
                return result
            if time.monotonic() > deadline:
                detail = f" (last error: {last_error!r})" if last_error else ""
                raise ServiceError(
                    f"timed out after {timeout:.0f}s waiting for {what}{detail}\n{self.report()}"
                )
            time.sleep(interval)

    def wait_http(
        self, name: str, url: str, timeout: float = 60, ok: Callable[[int], bool] | None = None
    ) -> None:
        ok = ok or (lambda status: status == 200)
        self.wait_until(
            f"{name} at {url}",
            lambda: ok(requests.get(url, timeout=5).status_code),
            timeout,
            watch=[name],
        )

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ S3 / MLflow


def start_moto(services: Services, port: int, env: Mapping[str, str]) -> str:
    """``moto_server`` (S3 and friends) on 127.0.0.1:port; returns its endpoint URL."""
    url = f"http://127.0.0.1:{port}"
    services.start("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env)
    services.wait_http("moto", f"{url}/moto-api/", timeout=60, ok=lambda status: status < 500)
    return url


def start_mlflow(
    services: Services,
    port: int,
    backend_db: Path,
    artifacts_destination: str,
    env: Mapping[str, str],
    *,
    app_name: str | None = None,
    timeout: float = 120,
) -> str:
    """An MLflow tracking server with proxied artifacts (``--serve-artifacts``); returns its URL.

    ``env`` must carry ``MLFLOW_S3_ENDPOINT_URL`` and AWS credentials when the destination is s3://.
    ``app_name`` runs one of MLflow's server apps (``basic-auth``: its config path goes in ``env``).
    """
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(VENV_BIN / "mlflow"),
        "server",
        *(["--app-name", app_name] if app_name else []),
        "--backend-store-uri",
        f"sqlite:///{backend_db}",
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "-w",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    services.start("mlflow", argv, {"MLFLOW_DISABLE_TELEMETRY": "true", **env})
    services.wait_http("mlflow", f"{url}/health", timeout=timeout)
    return url


# ------------------------------------------------------------------------------------------------ Airflow


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without Airflow/Trainyard settings (the test's own are isolated)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "TRAINYARD_", "MLFLOW_", "AWS_", "PYTEST_"))
    }
    # The venv's bin first: the Airflow processes find `airflow` and `python` there.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def airflow_env(
    home: Path,
    api_port: int,
    extra: Mapping[str, str] | None = None,
    dags_folder: Path = ROOT / "dags",
) -> dict[str, str]:
    """Settings for one small Airflow 3 deployment: SQLite, LocalExecutor, simple auth (all admins)."""
    api_url = f"http://127.0.0.1:{api_port}"
    settings = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "AIRFLOW__API__BASE_URL": api_url,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        # The scheduler's and triggerer's log servers (Airflow binds them to all interfaces).
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    return clean_env({**settings, **(extra or {})})


def airflow_cli(env: Mapping[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``airflow <args>`` with this deployment's env; raises with the output when it fails."""
    result = subprocess.run(
        [str(VENV_BIN / "airflow"), *args],
        env=dict(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"`airflow {' '.join(args)}` exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def migrate_airflow_db(env: Mapping[str, str]) -> None:
    airflow_cli(env, "db", "migrate", timeout=300)


def start_airflow(
    services: Services,
    env: Mapping[str, str],
    api_port: int,
    components: Iterable[str] = AIRFLOW_COMPONENTS,
) -> None:
    """Start the given components as separate processes (named like the CLI command)."""
    for component in components:
        argv = [str(VENV_BIN / "airflow"), component]
        if component == "api-server":
            argv += ["--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"]
        services.start(component, argv, env)


def airflow_health(api_url: str) -> dict[str, Any]:
    response = requests.get(f"{api_url}/api/v2/monitor/health", timeout=5)
    response.raise_for_status()
    return response.json()


def wait_airflow_healthy(
    services: Services, api_url: str, components: Iterable[str] = AIRFLOW_COMPONENTS, timeout: float = 120
) -> dict[str, Any]:
    """Until ``/api/v2/monitor/health`` calls every started component (and the DB) healthy.

    A heartbeat must be newer than the component's (re)start, so that a restarted component does
    not pass on its predecessor's last heartbeat.
    """
    components = list(components)
    started = {name: services.started[name].started_at for name in components}
    wall_offset = time.time() - time.monotonic()

    def healthy() -> dict[str, Any] | None:
        health = airflow_health(api_url)
        if health.get("metadatabase", {}).get("status") != "healthy":
            return None
        for component in components:
            key = HEALTH_KEYS.get(component)
            if key is None:
                continue
            info = health.get(key) or {}
            if info.get("status") != "healthy":
                return None
            beat = info.get(f"latest_{key}_heartbeat") or info.get("latest_heartbeat")
            if beat and _epoch(beat) < started[component] + wall_offset - 1:
                return None
        return health

    return services.wait_until(
        "healthy Airflow components " + ", ".join(components), healthy, timeout, components
    )


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def kubernetes_connection(kubeconfig: Path) -> str:
    """``AIRFLOW_CONN_KUBERNETES_DEFAULT``: the cncf-kubernetes hook's extras for a kubeconfig file."""
    return json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig), "in_cluster": False}}
    )


# ------------------------------------------------------------------------------ FAB auth manager


#: The auth manager the Airflow Helm chart configures for Airflow 3 (``config.core.auth_manager``).
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"


def fab_airflow_env(
    home: Path,
    api_port: int,
    extra: Mapping[str, str] | None = None,
    dags_folder: Path = ROOT / "dags",
) -> dict[str, str]:
    """:func:`airflow_env` with the FAB auth manager: users, roles and DAG-level permissions in the DB."""
    env = airflow_env(
        home, api_port, {"AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER, **(extra or {})}, dags_folder
    )
    env.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", None)
    return env


def create_fab_user(env: Mapping[str, str], username: str, password: str, role: str = "Admin") -> None:
    """``airflow users create`` (the FAB CLI, as the chart's createUserJob runs it)."""
    airflow_cli(
        env,
        "users",
        "create",
        "--role",
        role,
        "--username",
        username,
        "--password",
        password,
        "--email",
        f"{username}@example.com",
        "--firstname",
        username,
        "--lastname",
        "Test",
    )


def api_token(api_url: str, username: str, password: str) -> str:
    """A JWT for the REST API from ``POST /auth/token`` (FAB checks the password against its DB)."""
    response = requests.post(
        f"{api_url}/auth/token", json={"username": username, "password": password}, timeout=30
    )
    if response.status_code not in (200, 201):
        raise ServiceError(f"no token for {username}: {response.status_code} {response.text[:500]}")
    return response.json()["access_token"]
