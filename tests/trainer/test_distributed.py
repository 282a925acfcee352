"""Several ranks for real: ``python -m trainer.launcher`` (torch's elastic agent, in process) runs
gloo DDP on CPU, the way a pod with ``resources.gpus > 1`` runs NCCL DDP on its GPUs.

* The pod's exit code is the first failing rank's: a table over torch's own ``ProcessFailure``, then
  the launcher with stand-in ranks (``tests/support/fake_rank.py``: seconds, no model) and with the
  trainer on bad data.
* The grace period after SIGTERM is the launcher's ``--shutdown-timeout``, not the agent's 30 s.
* SIGTERM to the launcher, with two data-loader workers per rank: both ranks stop at the same step,
  the checkpoint in S3 (moto) holds both ranks' RNG states, the launcher exits 143, and a relaunch
  on a fresh "pod" resumes there and finishes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.paths import ROOT
from tests.support.s3 import CREDENTIALS
from tests.support.trainer_runs import TIMEOUT_S, child_env, make_spec, mlflow_client, result_of
from trainer.spec import EXIT_BAD_INPUT, EXIT_TERMINATED, RunSpec
from trainyard.train.launch import LaunchSpec

LAUNCHER = [sys.executable, "-m", "trainer.launcher"]


def launcher_argv(spec: dict, ranks: int = 2, shutdown_timeout: int = 60) -> list[str]:
    """What a pod with ``ranks`` GPUs runs (``pod.launch_argv``), with this interpreter."""
    launch = LaunchSpec.for_run(RunSpec.model_validate(spec), python=sys.executable)
    return list(launch.multi_gpu_argv(ranks, shutdown_timeout=shutdown_timeout))


# -- the exit code: a pure function of the failures -------------------------------------------------


def failures(*ranks: tuple[int, int]) -> dict:
    """``ChildFailedError.failures`` for ranks ``(timestamp, exit code)``, in torch's own type."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    made = {}
    for rank, (timestamp, code) in enumerate(ranks):
        failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="/nonexistent")
        failure.timestamp = timestamp
        made[rank] = failure
    return made


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        (((100, 1), (99, 3)), 3),  # the earlier failure, whatever its rank
        (((100, 143), (100, 3)), 3),  # same second: the agent's stop of rank 0 does not win
        (((100, -15), (100, 2)), 2),
        (((101, -9), (100, 1)), 1),  # SIGKILLed after the grace period, later
        (((100, -15),), 143),  # killed by SIGTERM before its handler was in place
        (((100, 143), (100, 143)), 143),  # both saved and stopped
        (((100, -9), (100, -15)), 137),
        (((100, -6), (101, 143)), 134),  # a crash (SIGABRT) is 128 + 6, retryable
        (((100, 1), (100, 3)), 1),  # a true tie: the lower rank
    ],
)
def test_the_pod_exits_with_the_first_failing_ranks_code(ranks, expected):
    from trainer.launcher import pod_exit_code

    assert pod_exit_code(failures(*ranks)) == expected


# -- the launcher with stand-in ranks ---------------------------------------------------------------


def fake_ranks(tmp_path: Path, *args: str, shutdown_timeout: int = 30) -> list[str]:
    return [
        *LAUNCHER,
        "--nproc-per-node=2",
        f"--shutdown-timeout={shutdown_timeout}",
        "--module=tests.support.fake_rank",
        "--",
        f"--dir={tmp_path}",
        *args,
    ]


def test_a_rank_that_exits_3_makes_the_launcher_exit_3(tmp_path):
    """Rank 1 fails on bad input; rank 0, still running, is stopped by the agent: the pod says 3."""
    argv = fake_ranks(tmp_path, "--exit-codes=0,3", "--delays=30,0.5")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "fake rank 0 of 2" in proc.stderr and "fake rank 1 of 2" in proc.stderr
    assert "exiting with the first failure's code 3" in proc.stderr


def test_a_bad_command_line_exits_2(tmp_path):
    proc = subprocess.run(
        [*LAUNCHER, "--nproc-per-node=0", "--shutdown-timeout=5"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "--nproc-per-node 0: must be at least 1" in proc.stderr


def wait_for_files(paths: list[Path], proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, f"launcher exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_gives_the_ranks_the_shutdown_timeout_then_kills_them(tmp_path):
    """Rank 0 saves in 0.2 s, rank 1 would take 30 s: with a 3 s timeout (not the agent's default
    30 s) rank 0's save completes, rank 1 is killed after 3 s, and the launcher exits 143."""
    argv = fake_ranks(tmp_path, "--save-seconds=0.2,30", shutdown_timeout=3)
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        wait_for_files([tmp_path / "ready-0", tmp_path / "ready-1"], proc)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    assert proc.returncode == EXIT_TERMINATED, stderr[-3000:]
    assert (tmp_path / "saved-0").exists(), "rank 0 finished its save within the grace period"
    assert not (tmp_path / "saved-1").exists(), "rank 1 was killed at the end of it"
    assert 2.5 < elapsed < 15, elapsed


# -- the trainer, two gloo ranks ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.extended  # the fake ranks above show the same in seconds, in the default run
def test_bad_input_under_the_launcher_exits_3(tmp_path, tiny_model, splits):
    """torchrun would exit 1 (retryable); the pod must say 3, so that Airflow does not retry."""
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    spec["data"]["label_names"] = ["negative", "neutral"]  # the data says "positive"
    proc = subprocess.run(
        launcher_argv(spec),
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-4000:]
    assert "[rank 1]" in proc.stderr and "positive" in proc.stderr
    assert proc.stdout == ""


class Output:
    """A child's stderr, read as it comes (the test acts on lines while the child runs)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.text)):
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.text[-4000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in time: {self.text[-4000:]}"
            time.sleep(0.05)
        return match

    def finish(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.text


@pytest.mark.slow
def test_sigterm_under_the_launcher_checkpoints_every_rank_and_a_relaunch_resumes(
    tmp_path, tiny_model, splits, s3
):
    max_steps = 40
    spec = make_spec(
        tmp_path,
        str(tiny_model),
        str(splits[0]),
        str(splits[1]),
        max_steps=max_steps,
        checkpoint_every_steps=10,
        dataloader_workers=2,  # the workers that SIGTERM to a rank's process group used to kill
    )
    spec.update(s3_endpoint_url=s3.endpoint, checkpoint_dir="s3://trainyard/checkpoints/run-1")
    env = child_env(tmp_path, TRAINYARD_SCRATCH=str(tmp_path / "pod-1"), **CREDENTIALS)
    with subprocess.Popen(
        launcher_argv(spec), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        output = Output(proc)
        output.wait_for(r"step 1/\d+ ", TIMEOUT_S)  # training, far from done: a stop, not the end
        proc.send_signal(signal.SIGTERM)  # what the kubelet does to the pod's PID 1
        stderr = output.finish(timeout=60)
        stdout = proc.stdout.read()
    assert proc.returncode == EXIT_TERMINATED, stderr[-6000:]
    assert stdout == "", f"no result line after SIGTERM: {stdout[-2000:]}\n{stderr[-6000:]}"
    for rank in (0, 1):
        assert f"[rank {rank}] trainer.checkpoints: Rank {rank} of 2 (parallel mode distributed" in stderr
    assert "DataLoader worker" not in stderr, stderr[-6000:]
    first_loss = float(re.search(r"step 1/\d+ .* loss ([\d.]+)", stderr).group(1))
    assert first_loss < 0.8, f"about ln 2 = 0.69 for two classes, not twice that: {first_loss}"
    stops = {
        int(rank): int(step)
        for rank, step in re.findall(r"\[rank (\d)\] \S+: Stopping at step (\d+)", stderr)
    }
    assert set(stops) == {0, 1} and len(set(stops.values())) == 1, stops
    (step,) = set(stops.values())
    assert 0 < step < max_steps
    assert f"Uploaded checkpoint-{step} to " in stderr

    prefix = f"checkpoints/run-1/checkpoint-{step}/"
    listed = s3.client.list_objects_v2(Bucket="trainyard", Prefix=prefix).get("Contents", [])
    saved = {entry["Key"].removeprefix(prefix) for entry in listed}
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "model.safetensors"} <= saved, saved
    body = s3.client.get_object(Bucket="trainyard", Key=prefix + "trainyard_ranks.json")["Body"].read()
    ranks = json.loads(body)
    assert ranks["world_size"] == 2 and ranks["samples_per_step"] == 2 * 16

    env["TRAINYARD_SCRATCH"] = str(tmp_path / "pod-2")  # a fresh pod: the checkpoint comes from S3
    relaunch = subprocess.run(
        launcher_argv(spec), env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    result = result_of(relaunch)
    assert re.search(rf"Resuming from checkpoint \S+ \(step {step}\)", relaunch.stderr)
    assert "Resuming with other ranks" not in relaunch.stderr
    assert result["resumed_from_step"] == step and result["global_step"] == max_steps
    assert "[rank 1]" in relaunch.stderr
    client = mlflow_client(spec)
    (run,) = client.search_runs([client.get_experiment_by_name("tweet-sentiment").experiment_id])
    assert run.info.run_id == result["mlflow_run_id"], "rank 0 alone logs, and the relaunch continues it"
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainyard.resumed_from_step"] == str(step)
    assert run.data.params["speed.world_size"] == "2"
    assert not s3.client.list_objects_v2(Bucket="trainyard", Prefix="checkpoints/run-1/").get("Contents")


# -- data-loader workers out of reach of a SIGTERM to their rank's process group ---------------------


def test_the_trainers_data_loader_workers_run_in_their_own_process_group(tmp_path):
    """The real Trainer's training, evaluation and prediction loaders: each worker reports its
    process group, which must be its own (its pid), not the rank's that the launcher signals."""
    import os

    import torch
    from transformers import TrainingArguments

    from trainer.hf_trainer import TrainyardTrainer

    class ProcessGroups(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> dict:
            return {"pid": torch.tensor(os.getpid()), "pgid": torch.tensor(os.getpgid(0))}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        dataloader_num_workers=2,
        dataloader_persistent_workers=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        remove_unused_columns=False,
        use_cpu=True,
        report_to="none",
    )
    trainer = TrainyardTrainer(
        model=torch.nn.Linear(1, 1), args=args, train_dataset=ProcessGroups(), eval_dataset=ProcessGroups()
    )
    loaders = {
        "train": trainer.get_train_dataloader(),
        "eval": trainer.get_eval_dataloader(),
        "test": trainer.get_test_dataloader(ProcessGroups()),
    }
    for name, loader in loaders.items():
        batches = list(loader)
        pids = {int(p) for batch in batches for p in batch["pid"]}
        pgids = {int(p) for batch in batches for p in batch["pgid"]}
        assert os.getpid() not in pids, f"{name}: loaded in worker processes"
        assert pgids == pids, f"{name}: each worker leads its own process group"
        assert os.getpgid(0) not in pgids


# -- resuming with another number of ranks (finding: data position and schedule shift) --------------


def test_resuming_a_checkpoint_of_other_ranks_warns(tmp_path, caplog):
    """A checkpoint two ranks saved, resumed by one process (the Trainer's real arguments and state)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainer.checkpoints import RanksCallback, write_ranks

    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    write_ranks(
        checkpoint,
        {
            "world_size": 2,
            "per_device_batch_size": 16,
            "gradient_accumulation_steps": 1,
            "samples_per_step": 32,
        },
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, use_cpu=True, report_to="none"
    )
    callback = RanksCallback()
    with caplog.at_level("INFO", logger="trainer.checkpoints"):
        callback.on_train_begin(args, TrainerState(global_step=40), TrainerControl())
    assert "Rank 0 of 1" in caplog.text
    assert (
        "checkpoint-40 was trained by 2 ranks at 32 samples per step, this launch has 1 at 16" in caplog.text
    )

    caplog.clear()
    callback.on_save(args, TrainerState(global_step=40), TrainerControl())  # this launch saves it again
    with caplog.at_level("INFO", logger="trainer.checkpoints"):
        callback.on_train_begin(args, TrainerState(global_step=40), TrainerControl())
    assert "Resuming with other ranks" not in caplog.text


# -- all ranks enter the training loop, or none (finding: rank skew at SIGTERM) ----------------------


@pytest.fixture
def launcher_store(monkeypatch):
    """The TCP store a launcher hosts for its ranks (``MASTER_ADDR``/``MASTER_PORT``)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    return store


def start_ranks(preemptions: list, delays: list[float]) -> list:
    """``start_together`` on one thread per rank (threads stand in for the rank processes); each
    rank's outcome: None (it trains) or the exception it raised."""
    outcomes: list = [None] * len(preemptions)

    def rank(i: int) -> None:
        time.sleep(delays[i])
        try:
            preemptions[i].start_together(len(preemptions), poll_seconds=0.01)
        except BaseException as error:  # Terminated is what is tested
            outcomes[i] = error

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(len(preemptions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads), "a rank is still waiting"
    return outcomes


def test_all_ranks_start_training_together(launcher_store):
    from trainer.preemption import Preemption

    assert start_ranks([Preemption(), Preemption()], delays=[0.0, 0.3]) == [None, None]


def test_a_sigterm_before_training_stops_every_rank(launcher_store):
    """Rank 1 waits for rank 0, which got SIGTERM first: rank 1 does not start alone."""
    from trainer.errors import Terminated
    from trainer.preemption import Preemption

    stopped = Preemption()
    stopped.requested = True
    outcomes = start_ranks([stopped, Preemption()], delays=[0.3, 0.0])
    assert all(isinstance(outcome, Terminated) for outcome in outcomes), outcomes


def test_a_waiting_rank_that_gets_sigterm_stops_every_rank(launcher_store):
    """Rank 0 arrived and waits; its SIGTERM comes before rank 1 arrives: neither trains."""
    from trainer.errors import Terminated
    from trainer.preemption import Preemption

    waiting = Preemption()
    threading.Timer(0.2, lambda: setattr(waiting, "requested", True)).start()
    outcomes = start_ranks([waiting, Preemption()], delays=[0.0, 0.6])
    assert all(isinstance(outcome, Terminated) for outcome in outcomes), outcomes
