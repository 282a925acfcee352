"""How the trainer is started: one launch description for the local process and the Kubernetes pod
(``python -m trainer``; a pod with several GPUs runs one rank per GPU under ``trainer.launcher``).

The run spec travels as one JSON argv element, never through a shell: no
value from YAML or conf can be interpreted as a command.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer.spec import EXIT_TERMINATED, RunSpec

RESULT_KEY = "trainyard_result"


def trainer_env(environment: str) -> dict[str, str]:
    """Plain, non-secret environment every trainer gets, locally and in the pod."""
    return {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TRAINYARD_ENV": environment,
    }


@dataclass(frozen=True)
class LaunchSpec:
    """What to execute: the same argv and env whether a local process or a container runs it."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_run(cls, spec: RunSpec, python: str = "python") -> LaunchSpec:
        return cls(
            argv=(python, "-m", "trainer", "--spec", spec.model_dump_json()),
            env=trainer_env(spec.identity.environment),
        )

    def multi_gpu_argv(self, gpus: int, shutdown_timeout: int) -> tuple[str, ...]:
        """``python -m trainer.launcher``: one rank per GPU, each running what ``argv`` runs.

        The launcher (``trainer/launcher.py``) is torch's elastic agent called in-process: the ranks
        get ``shutdown_timeout`` seconds after SIGTERM to save and upload their checkpoint before they
        are killed, and the process exits with the first failing rank's code (2 and 3 stay permanent,
        143 stays a preemption), where ``torchrun`` would exit 1.
        """
        python, flag, module, *args = self.argv
        assert (flag, module) == ("-m", "trainer"), f"not a trainer command: {self.argv[:3]}"
        return (
            python,
            "-m",
            "trainer.launcher",
            f"--nproc-per-node={gpus}",
            f"--shutdown-timeout={shutdown_timeout}",
            "--",
            *args,
        )


#: What a local trainer inherits from the Airflow worker: tooling and storage/tracking access,
#: never Airflow's own secrets (AIRFLOW__*, AIRFLOW_CONN_*, the Fernet key, the metadata DB).
INHERITED_ENV = re.compile(
    r"^(PATH|HOME|USER|LANG|LC_\w+|TZ|TMPDIR|VIRTUAL_ENV|PYTHONPATH|SSL_CERT_\w+|REQUESTS_CA_BUNDLE"
    r"|(?i:https?_proxy|no_proxy)|AWS_\w+|MLFLOW_\w+|HF_\w+|TRAINYARD_\w+|OMP_\w+|MKL_\w+|CUDA_\w+"
    r"|NVIDIA_\w+|NCCL_\w+|TORCH\w*|TOKENIZERS_\w+)$"
)


def inherited_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if INHERITED_ENV.match(k)}


class TrainerFailed(RuntimeError):
    def __init__(self, exit_code: int, tail: list[str]) -> None:
        self.exit_code = exit_code
        self.tail = tail
        if exit_code in (EXIT_TERMINATED, -signal.SIGTERM):
            cause = "the trainer was interrupted (SIGTERM); it saved a checkpoint and a retry resumes from it"
        else:
            cause = f"the trainer exited with code {exit_code}"
        last = "\n".join(f"    {line}" for line in tail)
        super().__init__(f"Training failed: {cause}. Last trainer output:\n{last}")


def parse_result(line: str) -> dict[str, Any] | None:
    if RESULT_KEY not in line:
        return None
    try:
        payload = json.loads(line)
    except ValueError:
        return None
    return payload.get(RESULT_KEY) if isinstance(payload, dict) else None


class LocalTrainer:
    """Runs the trainer as a child process and streams its output into the task log."""

    def __init__(self, launch: LaunchSpec, log: logging.Logger, tail_lines: int = 30) -> None:
        self.launch = launch
        self.log = log
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.process: subprocess.Popen[str] | None = None

    def run(self, on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
        argv = (
            (sys.executable, *self.launch.argv[1:]) if self.launch.argv[0] == "python" else self.launch.argv
        )
        env = {**inherited_env(os.environ), **self.launch.env}
        self.log.info("Starting trainer: %s -m trainer --spec <%d bytes of JSON>", argv[0], len(argv[-1]))
        result: dict[str, Any] | None = None
        self.process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            parsed = parse_result(line)
            if parsed is not None:
                result = parsed
            self.tail.append(line)
            self.log.info("%s", line)
            if on_line:
                on_line(line)
        code = self.process.wait()
        if code != 0:
            raise TrainerFailed(code, list(self.tail))
        if result is None:
            raise TrainerFailed(code, [*self.tail, f"(no '{RESULT_KEY}' line was printed)"])
        return result

    def terminate(self, grace_seconds: float = 60) -> None:
        """Ask the trainer to checkpoint and stop; kill it if it does not within the grace period."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        self.log.warning(
            "Stopping the trainer (pid %s): SIGTERM, %ss to checkpoint", process.pid, grace_seconds
        )
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
