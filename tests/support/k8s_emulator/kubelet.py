"""The kubelet: runs each admitted pod's container as a local process and ends it as a node would.

The container's ``command + args`` run as an argv list (never a shell) in their own process group,
so a SIGTERM reaches the trainer and its children exactly as a container runtime delivers it. Volume
paths are rewritten to local directories because a process here cannot see ``/cache/huggingface``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .store import NODE_NAME, POLL, PodRuntime, Store, now, set_condition

# Paths that exist on this machine too: mounts there are not rewritten.
UNMAPPED_PREFIXES = ("/tmp", "/dev/shm")
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # other envFrom keys are skipped, as by a kubelet


class ConfigError(Exception):
    """The kubelet's ``CreateContainerConfigError``: a referenced Secret or key is missing (for now)."""


class Kubelet:
    """One node's kubelet over the store; each pod runs in its own thread (see :meth:`start`)."""

    def __init__(self, store: Store):
        self.store = store

    def start(self, runtime: PodRuntime) -> None:
        """Bring an admitted pod up in a thread: the create call answers Pending, as the real one does."""
        name = runtime.obj["metadata"]["name"]
        runtime.thread = threading.Thread(
            target=self._run, args=(runtime,), name=f"kubelet-{name}", daemon=True
        )
        runtime.thread.start()

    def _run(self, runtime: PodRuntime) -> None:
        try:
            self._run_pod(runtime)
        except Exception as exc:  # never leave a pod silently stuck: surface it as a failed pod
            with self.store.lock:
                runtime.obj["status"].update(phase="Failed", reason="EmulatorError", message=repr(exc))
                self.store.touch(runtime)
            raise

    def _run_pod(self, runtime: PodRuntime) -> None:
        """Schedule, mount, pull, configure, start, wait, finish: each step can end the pod early."""
        spec = runtime.obj["spec"]
        container = spec["containers"][0]
        if not self._schedule(runtime):
            return
        mounts = self._mounts(runtime, container)
        if spec.get("activeDeadlineSeconds"):
            deadline = time.monotonic() + spec["activeDeadlineSeconds"]
            threading.Thread(target=self._watch_deadline, args=(runtime, deadline), daemon=True).start()
        if not self._pull(runtime, container):
            return
        env = self._configure(runtime, container, mounts)
        if env is None or not self._start_process(runtime, container, env, mounts):
            return
        self._wait_for_exit(runtime, container)
        self.finish(runtime)

    # ------------------------------------------------------------------------------------------ steps

    def _schedule(self, runtime: PodRuntime) -> bool:
        """Bind to the one node; the conditions and waiting status a freshly scheduled pod shows."""
        store, pod = self.store, runtime.obj
        meta = pod["metadata"]
        with store.lock:
            # A gated pod is not even tried (the API server set PodScheduled=False SchedulingGated).
            while pod["spec"].get("schedulingGates") and not (runtime.gone or store.stopping.is_set()):
                store.changed.wait(POLL * 4)

            def blocked() -> bool:
                return store.scheduling_held or any(check(runtime) for check in store.scheduling_blockers)

            if blocked() and not runtime.gone:
                self._unschedulable(runtime)
            while blocked() and not (runtime.gone or store.stopping.is_set()):
                store.changed.wait(POLL * 4)
            if runtime.gone or store.stopping.is_set():
                return False
            pod["spec"]["nodeName"] = NODE_NAME
            set_condition(pod, "PodScheduled", "True")
            store.event(
                runtime,
                "Scheduled",
                f"Successfully assigned {meta['namespace']}/{meta['name']} to {NODE_NAME}",
                component="default-scheduler",
            )
            pod["status"].update(
                hostIP="127.0.0.1",
                hostIPs=[{"ip": "127.0.0.1"}],
                podIP="127.0.0.1",
                podIPs=[{"ip": "127.0.0.1"}],
                startTime=now(),
            )
            set_condition(pod, "PodReadyToStartContainers", "True")
            set_condition(pod, "Initialized", "True")
            unready = f"containers with unready status: [{runtime.run.name}]"
            set_condition(pod, "Ready", "False", "ContainersNotReady", unready)
            set_condition(pod, "ContainersReady", "False", "ContainersNotReady", unready)
            container = pod["spec"]["containers"][0]
            pod["status"]["containerStatuses"] = [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                    "lastState": {},
                }
            ]
            store.touch(runtime)
        return True

    def mark_disrupted(
        self,
        runtime: PodRuntime,
        condition: tuple[str, str, str],
        event: tuple[str, str, str],
        status: dict | None = None,
        component: str = "kubelet",
    ) -> None:
        """What the disrupting component writes before it stops a pod: a condition, an event, the end.

        ``status`` is the reason/message the pod's final status gets (default: the condition's message).
        """
        runtime.disruption = status or {"reason": None, "message": condition[2]}
        set_condition(runtime.obj, condition[0], "True", condition[1], condition[2])
        self.store.event(runtime, *event, component=component)
        self.store.touch(runtime)

    def _unschedulable(self, runtime: PodRuntime) -> None:
        """What kube-scheduler reports for a pod no node can take: PodScheduled False, FailedScheduling."""
        resource = "nvidia.com/gpu"
        requests = runtime.obj["spec"]["containers"][0].get("resources", {}).get("requests", {})
        if resource not in requests:
            resource = "cpu"
        message = (
            f"0/1 nodes are available: 1 Insufficient {resource}. preemption: 0/1 nodes are available: "
            "1 No preemption victims found for incoming pod."
        )
        set_condition(runtime.obj, "PodScheduled", "False", "Unschedulable", message)
        self.store.event(runtime, "FailedScheduling", message, "Warning", component="default-scheduler")
        self.store.touch(runtime)

    def _mounts(self, runtime: PodRuntime, container: dict) -> list[tuple[str, str]]:
        """(mountPath, local directory) per volumeMount, longest first; ``emptyDir`` per pod, PVCs shared."""
        namespace = runtime.obj["metadata"]["namespace"]
        local: dict[str, Path] = {}
        for volume in runtime.obj["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                with self.store.lock:
                    directory = self.store.pvcs.get((namespace, claim))
                if directory is None:
                    raise RuntimeError(
                        f"PVC {namespace}/{claim} was never added (add_persistent_volume_claim)"
                    )
            else:
                directory = runtime.root / "volumes" / volume["name"]
                directory.mkdir(parents=True, exist_ok=True)
            local[volume["name"]] = directory
        mounts = [
            (m["mountPath"].rstrip("/") or "/", str(local[m["name"]] / m.get("subPath", "")).rstrip("/"))
            for m in container.get("volumeMounts") or []
        ]
        return sorted(mounts, key=lambda pair: -len(pair[0]))

    def _pull(self, runtime: PodRuntime, container: dict) -> bool:
        """Every image is present, except one named ``does-not-exist``: ErrImagePull, then BackOff forever."""
        store, image = self.store, container["image"]
        if "does-not-exist" not in image:
            with store.lock:
                store.event(
                    runtime, "Pulled", f'Container image "{image}" already present on machine', container=True
                )
            return True
        error = (
            f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to '
            f'resolve reference "{image}": {image}: not found'
        )
        with store.lock:
            store.event(runtime, "Pulling", f'Pulling image "{image}"', container=True)
            store.event(
                runtime, "Failed", f'Failed to pull image "{image}": {error}', "Warning", container=True
            )
            store.event(runtime, "Failed", "Error: ErrImagePull", "Warning", container=True)
            self._set_state(runtime, {"waiting": {"reason": "ErrImagePull", "message": error}})
        for _ in range(4):
            if self._wait_gone(runtime, POLL):
                return False
        with store.lock:
            store.event(runtime, "BackOff", f'Back-off pulling image "{image}"', container=True)
            store.event(runtime, "Failed", "Error: ImagePullBackOff", "Warning", container=True)
            message = f'Back-off pulling image "{image}": ErrImagePull: {error}'
            self._set_state(runtime, {"waiting": {"reason": "ImagePullBackOff", "message": message}})
        while not self._wait_gone(runtime, POLL * 4) and not runtime.disruption:  # until deleted or deadline
            pass
        return False

    def _configure(self, runtime: PodRuntime, container: dict, mounts: list[tuple[str, str]]) -> dict | None:
        """The process environment; retried like the kubelet until a missing Secret appears."""
        reported = None
        while True:
            try:
                return self._environment(runtime, container, mounts)
            except ConfigError as exc:
                with self.store.lock:
                    if str(exc) != reported:
                        reported = str(exc)
                        self.store.event(runtime, "Failed", f"Error: {exc}", "Warning", container=True)
                        self._set_state(
                            runtime,
                            {"waiting": {"reason": "CreateContainerConfigError", "message": reported}},
                        )
                    if runtime.gone or runtime.disruption or self.store.stopping.is_set():
                        return None
                    self.store.changed.wait(POLL * 4)

    def _environment(
        self, runtime: PodRuntime, container: dict, mounts: list[tuple[str, str]]
    ) -> dict[str, str]:
        """A minimal base (this venv's ``bin`` first on PATH), then ``envFrom`` and ``env`` resolved."""
        namespace, name = runtime.key
        home = runtime.root / "home"
        home.mkdir(parents=True, exist_ok=True)
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "HOSTNAME": name,
        }
        with self.store.lock:
            secrets = copy.deepcopy(self.store.secrets.get(namespace, {}))
        for source in container.get("envFrom") or []:  # admission lets only secretRef through
            ref, prefix = source["secretRef"], source.get("prefix", "")
            if ref["name"] in secrets:
                data = secrets[ref["name"]]
                env.update({prefix + k: v for k, v in data.items() if C_IDENTIFIER.match(prefix + k)})
            elif not ref.get("optional"):
                raise ConfigError(f'secret "{ref["name"]}" not found')
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = _expand(item.get("value", ""), env)
                continue
            ref = item["valueFrom"]["secretKeyRef"]  # admission lets only secretKeyRef through
            data = secrets.get(ref["name"])
            if data is not None and ref["key"] in data:
                env[item["name"]] = data[ref["key"]]
            elif not ref.get("optional"):
                raise ConfigError(
                    f'secret "{ref["name"]}" not found'
                    if data is None
                    else f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
                )
        return {key: _map_path(value, mounts) for key, value in env.items()}

    def _start_process(
        self, runtime: PodRuntime, container: dict, env: dict[str, str], mounts: list[tuple[str, str]]
    ) -> bool:
        """Created, Started, Running and Ready; False if the pod went away first."""
        store, pod, run = self.store, runtime.obj, runtime.run
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        argv = [_map_path(_expand(arg, env), mounts) for arg in argv]
        if not argv:
            raise RuntimeError(
                "the image's ENTRYPOINT is unknown to the emulator: give the container a command"
            )
        executable = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        workdir = runtime.root / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        with store.lock:
            if runtime.gone or store.stopping.is_set():
                return False
            store.event(runtime, "Created", f"Created container: {run.name}", container=True)
            run.proc = subprocess.Popen(
                [executable, *argv[1:]],
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            run.started = True
            meta = pod["metadata"]
            run.record = {
                "uid": meta["uid"],
                "name": meta["name"],
                "labels": dict(meta.get("labels") or {}),
                "started": time.monotonic(),
                "ended": None,
            }
            store.container_runs.append(run.record)
            store.event(runtime, "Started", f"Started container {run.name}", container=True)
            image = container["image"]
            digest = hashlib.sha256(image.encode()).hexdigest()
            status = pod["status"]["containerStatuses"][0]
            status.update(
                state={"running": {"startedAt": now()}},
                ready=True,
                started=True,
                imageID=f"docker.io/library/{image.split(':')[0]}@sha256:{digest}",
                containerID=f"containerd://{uuid.uuid4().hex}",
            )
            pod["status"]["phase"] = "Running"
            for condition in ("ContainersReady", "Ready"):
                set_condition(pod, condition, "True")
            store.touch(runtime)
        return True

    def _wait_for_exit(self, runtime: PodRuntime, container: dict) -> None:
        """Collect the log (stdout+stderr, one timestamp per line as read), then the terminated state."""
        store, run = self.store, runtime.run
        assert run.proc is not None and run.proc.stdout is not None
        for line in iter(run.proc.stdout.readline, b""):
            with store.lock:
                run.lines.append((time.time_ns(), line))
                store.changed.notify_all()
        code = run.proc.wait()
        run.proc.stdout.close()
        exit_code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as runtimes report it
        with store.lock:
            run.finished, run.exit_code = True, exit_code
            if run.record is not None:
                run.record["ended"] = time.monotonic()
            status = runtime.obj["status"]["containerStatuses"][0]
            terminated: dict[str, Any] = {
                "exitCode": exit_code,
                "reason": run.kill_reason or ("Completed" if exit_code == 0 else "Error"),
            }
            if exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                tail = b"".join(line for _, line in run.lines[-80:])[-2048:]
                terminated["message"] = tail.decode("utf-8", "replace")
            terminated.update(
                startedAt=status["state"]["running"]["startedAt"],
                finishedAt=now(),
                containerID=status.get("containerID"),
            )
            status.update(ready=False, started=False)
            self._set_state(runtime, {"terminated": terminated})

    def finish(self, runtime: PodRuntime) -> None:
        """The pod's final phase; a pod being deleted disappears now that its process is gone."""
        store, pod = self.store, runtime.obj
        with store.lock:
            status = pod["status"]
            failed = runtime.disruption or runtime.run.exit_code != 0
            status["phase"] = "Failed" if failed else "Succeeded"
            if runtime.disruption:
                if runtime.disruption.get("reason"):
                    status["reason"] = runtime.disruption["reason"]
                status["message"] = runtime.disruption["message"]
            if not runtime.run.finished:  # ended while still waiting (deadline): terminated, never run
                container_status = status["containerStatuses"][0]
                container_status["state"] = {
                    "terminated": {"exitCode": 137, "reason": "Error", "finishedAt": now()}
                }
                container_status["ready"] = False
            for condition in ("Ready", "ContainersReady"):
                reason = "PodCompleted" if status["phase"] == "Succeeded" else "PodFailed"
                set_condition(pod, condition, "False", reason)
            store.touch(runtime)
            if pod["metadata"].get("deletionTimestamp"):
                self.remove_later(runtime)

    def remove_later(self, runtime: PodRuntime) -> None:
        """A deleted pod whose process has ended: readable in its final phase for a moment, then gone.

        A real kubelet reports the terminal status before the API server removes the object, so a
        client can read a deleted pod Failed (or still terminating) for a while, not only 404s.
        """
        linger = self.store.deleted_pod_linger
        if linger <= 0:
            self.store.remove(runtime)
            return

        def remove() -> None:
            with self.store.lock:
                if not runtime.gone:
                    self.store.remove(runtime)

        timer = threading.Timer(linger, remove)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------------------------ ending a pod early

    def terminate(self, runtime: PodRuntime, grace: float) -> None:
        """SIGTERM the container's process group, wait up to ``grace`` s, then SIGKILL."""
        store, run = self.store, runtime.run
        with store.lock:
            if runtime.terminating or not runtime.running:
                return
            runtime.terminating = True
            store.event(runtime, "Killing", f"Stopping container {run.name}", container=True)
        assert run.proc is not None
        if grace > 0:
            kill_group(run.proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while run.proc.poll() is None and time.monotonic() < deadline and not store.stopping.is_set():
                time.sleep(POLL)
        if run.proc.poll() is None:
            kill_group(run.proc, signal.SIGKILL)

    def terminate_later(self, runtime: PodRuntime, grace: float) -> None:
        threading.Thread(target=self.terminate, args=(runtime, grace), daemon=True).start()

    def running_pod(self, namespace: str, name: str) -> PodRuntime:
        """The pod, if its container is running; what a disruption can act on."""
        runtime = self.store.pods.get((namespace, name))
        if runtime is None:
            raise KeyError(f"pod {namespace}/{name} not found")
        if not runtime.running:
            raise RuntimeError(f"pod {namespace}/{name} has no running container")
        return runtime

    def _watch_deadline(self, runtime: PodRuntime, deadline: float) -> None:
        """``activeDeadlineSeconds``: stop the pod with reason ``DeadlineExceeded``."""
        while time.monotonic() < deadline:
            if runtime.ended or self.store.stopping.is_set():
                return
            time.sleep(POLL)
        with self.store.lock:
            if runtime.ended:
                return
            message = "Pod was active on the node longer than the specified deadline"
            runtime.disruption = {"reason": "DeadlineExceeded", "message": message}
            self.store.event(runtime, "DeadlineExceeded", message)
            self.store.touch(runtime)
            running = runtime.running
        if running:
            self.terminate(runtime, runtime.obj["spec"].get("terminationGracePeriodSeconds", 30))
        else:  # still waiting (image pull, config error): fail it directly
            self.finish(runtime)

    # ----------------------------------------------------------------------------------------- helpers

    def _set_state(self, runtime: PodRuntime, state: dict) -> None:
        runtime.obj["status"]["containerStatuses"][0]["state"] = state
        self.store.touch(runtime)

    def _wait_gone(self, runtime: PodRuntime, seconds: float) -> bool:
        with self.store.lock:
            if not (runtime.gone or self.store.stopping.is_set()):
                self.store.changed.wait(seconds)
            return runtime.gone or self.store.stopping.is_set()


def kill_group(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: ``$$`` escapes, unknown references stay as written."""

    def replace(match: re.Match) -> str:
        return "$" if match.group(0) == "$$" else env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


def _map_path(value: str, mounts: list[tuple[str, str]]) -> str:
    """Rewrite a container path under a volumeMount's mountPath to the emulator's local directory."""
    for mount_path, local in mounts:
        if mount_path == "/" or any(
            mount_path == p or mount_path.startswith(p + "/") for p in UNMAPPED_PREFIXES
        ):
            continue
        if value == mount_path or value.startswith(mount_path + "/"):
            return local + value[len(mount_path) :]
    return value
