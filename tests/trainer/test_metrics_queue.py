"""Step metrics go to MLflow from a background thread (``trainer.metrics_queue``): an unreachable
tracking server delays them and never stalls or fails training; what is pending is sent at the end.
The last test takes a real MLflow server down in the middle of a real training run."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.support import services as svc
from tests.support.trainer_runs import child_env, make_spec, result_of, trainer_command
from trainer.metrics_queue import MetricsQueue


class FlakyServer:
    """A ``log_batch`` stand-in that fails while ``down`` and records what it received."""

    def __init__(self) -> None:
        self.down = False
        self.received: list[tuple[str, float, int, int]] = []
        self.calls = 0
        self.lock = threading.Lock()

    def send(self, batch):
        with self.lock:
            self.calls += 1
            if self.down:
                raise ConnectionError("connection refused")
            self.received.extend(batch)


def wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_metrics_are_sent_in_the_background_without_blocking_the_caller():
    server = FlakyServer()
    queue = MetricsQueue(server.send)
    started = time.monotonic()
    for step in range(100):
        queue.put({"loss": 1.0 / (step + 1), "learning_rate": 1e-3}, step)
    assert time.monotonic() - started < 0.5
    wait(lambda: len(server.received) == 200)
    assert queue.close(timeout=5) == 0
    assert [(k, s) for k, _, s, _ in server.received[:2]] == [("loss", 0), ("learning_rate", 0)]


def test_an_outage_is_retried_with_backoff_and_nothing_is_lost():
    server = FlakyServer()
    server.down = True
    queue = MetricsQueue(server.send, retry_delays=(0.05, 0.1))
    for step in range(5):
        queue.put({"loss": float(step)}, step)  # never blocks, though every send fails
    wait(lambda: server.calls >= 3)
    assert server.received == [] and queue.pending == 5
    server.down = False
    wait(lambda: queue.pending == 0)
    assert [s for _, _, s, _ in server.received] == [0, 1, 2, 3, 4]
    assert queue.close(timeout=5) == 0


def test_close_reports_what_could_not_be_sent_within_its_time():
    server = FlakyServer()
    server.down = True
    queue = MetricsQueue(server.send, retry_delays=(0.05,))
    queue.put({"loss": 1.0, "grad_norm": 2.0}, 7)
    started = time.monotonic()
    assert queue.close(timeout=0.5) == 2
    assert time.monotonic() - started < 3


class SwitchableProxy:
    """A TCP proxy in front of the tracking server that can refuse service at once and restore it
    at once (a restarted server takes tens of seconds on a busy machine, longer than a short run
    trains). ``cut()`` drops every open connection and closes each new one unanswered, as a dead
    server's would be; ``restore()`` serves again."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        self.down = False
        self.open: set = set()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.down = True
            for sock in self.open:
                sock.close()
            self.open.clear()

    def restore(self) -> None:
        self.down = False

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.extended
def test_a_tracking_server_outage_during_training_does_not_stop_it(tmp_path, tiny_model, splits):
    """The real MLflow server becomes unreachable after the run's params are logged and reachable
    again before training ends: the run finishes, FINISHED, with the step metrics of the outage
    sent late (MLflow's own client retries are cut to one here, so the test measures our queue,
    not the client's backoff)."""
    with svc.Services(tmp_path / "logs") as services:
        svc.start_mlflow(services, svc.free_port(), tmp_path / "mlflow.db", str(tmp_path / "artifacts"), {})
        server_port = int(services.started["mlflow"].argv[-1])
        proxy = SwitchableProxy(server_port)
        url = f"http://127.0.0.1:{proxy.port}"
        spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]), max_steps=500)
        spec["mlflow"].update(tracking_uri=url, artifact_location=None)
        env = child_env(tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
        proc = subprocess.Popen(
            trainer_command(spec), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stderr: list[str] = []
        reader = threading.Thread(target=lambda: stderr.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        try:
            wait(lambda: any("step 1/500" in line for line in stderr) or proc.poll() is not None, 300)
            assert proc.poll() is None, "".join(stderr)[-3000:]
            proxy.cut()
            wait(
                lambda: any("MLflow metrics not sent" in line for line in stderr) or proc.poll() is not None,
                300,
            )
            assert proc.poll() is None, (
                "training goes on while the server is down:\n" + "".join(stderr)[-3000:]
            )
            proxy.restore()
            stdout, _ = proc.communicate(timeout=600)
        finally:
            proxy.close()
            if proc.poll() is None:
                proc.kill()
        reader.join(timeout=10)
        result = result_of(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(stderr)))

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{server_port}")
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(steps) and steps[-1] >= 475, "step metrics of the whole run, the outage too"
        assert "MLflow metrics sent again" in "".join(stderr)
