"""Resumable checkpoints and SIGTERM handling: a low-priority pod may be preempted at any time.

* ``PreemptionCallback`` turns the SIGTERM flag of ``trainer.preemption.Preemption`` into "save a
  checkpoint at the end of this step, then stop".
* ``training_complete`` / ``ensure_final_checkpoint``: once ``Trainer.train()`` returns, the final
  weights are a complete checkpoint (mirrored to ``s3://``) before evaluation and model logging, so
  a failure in those never costs the training: a retry resumes at the last step and trains no more.
* ``CheckpointStore`` is the checkpoint directory of one DAG run: a local directory, or an ``s3://``
  prefix mirrored from a local working directory (downloaded at start, uploaded after each save).
  It also keeps the MLflow run id, so a relaunched pod continues the same MLflow run.
* ``RanksCallback`` records in each checkpoint how many ranks trained it and how many samples a step
  was, and warns when a relaunch resumes it with other numbers (``resources.gpus`` changed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from transformers import TrainerCallback

from trainer.preemption import Preemption
from trainer.storage import is_s3, storage_options

logger = logging.getLogger(__name__)

#: Written last by the HF Trainer when it saves a checkpoint: its presence marks a complete one.
TRAINER_STATE = "trainer_state.json"
RUN_ID_FILE = "mlflow_run_id"
#: Written into each checkpoint by rank 0: the ranks and the samples per step it was trained with.
RANKS_FILE = "trainyard_ranks.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class PreemptionCallback(TrainerCallback):
    """Stops training after the current optimizer step, with a checkpoint, once SIGTERM was seen."""

    def __init__(self, preemption: Preemption) -> None:
        self.preemption = preemption

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.preemption.requested
        if args.world_size > 1:
            # Every rank must agree, or the ranks' collective ops (the save included) would deadlock.
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            self.preemption.requested = stop
        if stop:
            logger.warning("Stopping at step %d: saving a checkpoint", state.global_step)
            control.should_save = True
            control.should_training_stop = True
        return control


def ranks_layout(args) -> dict[str, int]:
    """How one optimizer step is made, from the ``TrainingArguments``: ranks, batch, accumulation."""
    return {
        "world_size": args.world_size,
        "per_device_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "samples_per_step": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
    }


def write_ranks(checkpoint: Path, layout: dict[str, int]) -> None:
    (checkpoint / RANKS_FILE).write_text(json.dumps(layout, indent=2) + "\n")


def ranks_changed(checkpoint: Path, layout: dict[str, int]) -> str | None:
    """Why resuming ``checkpoint`` with ``layout`` is not exact, or None (same ranks and step size, or
    a checkpoint that did not record them)."""
    path = checkpoint / RANKS_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    ranks, samples = saved.get("world_size"), saved.get("samples_per_step")
    if (ranks, samples) == (layout["world_size"], layout["samples_per_step"]):
        return None
    return (
        f"{checkpoint.name} was trained by {ranks} ranks at {samples} samples per step, this launch has "
        f"{layout['world_size']} at {layout['samples_per_step']}: training resumes, but its position in "
        "the data and its learning-rate schedule shift (the steps done count at the new size). "
        "resources.gpus or the batch settings changed between launches; set them back to resume exactly"
    )


class RanksCallback(TrainerCallback):
    """Says on every rank which rank it is of how many, as the Trainer sees it (world size 1 under a
    launcher means no data parallelism at all); records the ranks in each checkpoint, on rank 0
    before ``MirrorCallback`` uploads it; and warns when training resumes a checkpoint made with
    another number of ranks or samples per step."""

    def on_train_begin(self, args, state, control, **kwargs):
        layout = ranks_layout(args)
        logger.info(
            "Rank %d of %d (parallel mode %s, device %s): %d samples per optimizer step",
            args.process_index,
            args.world_size,
            args.parallel_mode.value,
            args.device,
            layout["samples_per_step"],
        )
        if state.is_world_process_zero and state.global_step > 0:
            changed = ranks_changed(Path(args.output_dir) / f"checkpoint-{state.global_step}", layout)
            if changed:
                logger.warning("Resuming with other ranks: %s", changed)
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_ranks(Path(args.output_dir) / f"checkpoint-{state.global_step}", ranks_layout(args))
        return control


def _step(name: str) -> int | None:
    match = _CHECKPOINT.match(name)
    return int(match.group(1)) if match else None


def checkpoint_step(checkpoint: Path) -> int:
    step = _step(checkpoint.name)
    if step is None:
        raise ValueError(f"not a checkpoint directory: {checkpoint}")
    return step


def training_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was saved at the last optimizer step: resuming it would train no more."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    max_steps = state.get("max_steps") or 0
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def ensure_final_checkpoint(trainer, store: CheckpointStore, is_main: bool) -> Path:
    """The checkpoint of the step training ended at, saved (and uploaded) if the Trainer did not.

    With ``save_strategy="steps"`` the installed Trainer saves at the last step even when
    ``save_steps`` does not divide it (``DefaultFlowCallback.on_step_end``), and ``MirrorCallback``
    uploads that save. This guard keeps the guarantee if that behaviour changes: the weights are
    written with the trainer state last, so the checkpoint counts as complete only once whole.
    """
    step = trainer.state.global_step
    target = store.local_dir / f"checkpoint-{step}"
    if (target / TRAINER_STATE).is_file():
        return target
    logger.warning("No checkpoint was saved at the last step %d: saving the final weights now", step)
    trainer.save_model(str(target))  # every rank calls it; only the main process writes
    if is_main:
        write_ranks(target, ranks_layout(trainer.args))
        trainer.state.save_to_json(str(target / TRAINER_STATE))
        store.upload(target)
    return target


class CheckpointStore:
    """The checkpoints of one DAG run, at ``root`` (a local directory or an ``s3://`` prefix)."""

    def __init__(self, root: str, s3_endpoint_url: str | None = None, work_dir: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.remote = self.root if is_s3(root) else None
        self._s3_endpoint_url = s3_endpoint_url
        if self.remote:
            base = Path(work_dir or os.environ.get("TRAINYARD_SCRATCH") or tempfile.gettempdir())
            digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
            self.local_dir = base / "trainyard-checkpoints" / digest
        else:
            self.local_dir = Path(self.root)

    # -- local view ---------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint in the local directory (an interrupted save is skipped)."""
        if not self.local_dir.is_dir():
            return None
        complete = [
            (step, path)
            for path in self.local_dir.iterdir()
            if (step := _step(path.name)) is not None and (path / TRAINER_STATE).is_file()
        ]
        return max(complete)[1] if complete else None

    def read_run_id(self) -> str | None:
        path = self.local_dir / RUN_ID_FILE
        return (path.read_text().strip() or None) if path.is_file() else None

    def write_run_id(self, run_id: str) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        (self.local_dir / RUN_ID_FILE).write_text(run_id + "\n")
        if self.remote:
            self._fs().pipe_file(f"{self.remote}/{RUN_ID_FILE}", (run_id + "\n").encode())

    # -- the remote mirror --------------------------------------------------------------------------

    def _fs(self):
        import fsspec

        return fsspec.filesystem("s3", **storage_options(self.root, self._s3_endpoint_url))

    def _remote_complete(self, fs) -> dict[int, str]:
        fs.invalidate_cache()
        if not fs.exists(self.remote):
            return {}
        found = {}
        for entry in fs.ls(self.remote, detail=False):
            step = _step(entry.rstrip("/").rsplit("/", 1)[-1])
            if step is not None and fs.exists(f"{entry}/{TRAINER_STATE}"):
                found[step] = entry
        return found

    def download(self) -> None:
        """Fetch the run id and the newest complete remote checkpoint, unless already here."""
        if not self.remote:
            return
        fs = self._fs()
        self.local_dir.mkdir(parents=True, exist_ok=True)
        if fs.exists(f"{self.remote}/{RUN_ID_FILE}"):
            (self.local_dir / RUN_ID_FILE).write_bytes(fs.cat_file(f"{self.remote}/{RUN_ID_FILE}"))
        remote = self._remote_complete(fs)
        if not remote:
            return
        step = max(remote)
        local = self.latest()
        if local is not None and checkpoint_step(local) >= step:
            return
        target = self.local_dir / f"checkpoint-{step}"
        partial = self.local_dir / f".download-checkpoint-{step}"
        shutil.rmtree(partial, ignore_errors=True)
        logger.info("Downloading checkpoint %s/checkpoint-%d", self.remote, step)
        fs.get(remote[step].rstrip("/") + "/", str(partial) + "/", recursive=True)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)

    def upload(self, checkpoint: Path) -> None:
        """Mirror one saved checkpoint, then drop remote checkpoints the Trainer rotated away locally."""
        if not self.remote:
            return
        fs = self._fs()
        destination = f"{self.remote}/{checkpoint.name}"
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
        # The trainer state goes last: a remote checkpoint without it is incomplete and is ignored.
        for path in sorted(files, key=lambda p: p.name == TRAINER_STATE):
            fs.put_file(str(path), f"{destination}/{path.relative_to(checkpoint).as_posix()}")
        kept = {p.name for p in self.local_dir.iterdir() if _step(p.name) is not None}
        for step, entry in self._remote_complete(fs).items():
            if f"checkpoint-{step}" not in kept:
                fs.rm(entry, recursive=True)
        logger.info("Uploaded %s to %s", checkpoint.name, destination)

    # -- after a successful run ---------------------------------------------------------------------

    def remove(self) -> None:
        """Delete this run's checkpoints and run id (and only those: the directory may hold other files)."""
        if self.local_dir.is_dir():
            for path in self.local_dir.iterdir():
                if _step(path.name) is not None or path.name.startswith(".download-checkpoint-"):
                    shutil.rmtree(path, ignore_errors=True)
            (self.local_dir / RUN_ID_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.local_dir.rmdir()  # only if now empty
        if self.remote:
            fs = self._fs()
            if fs.exists(self.remote):
                fs.rm(self.remote, recursive=True)
        logger.info("Removed checkpoints in %s", self.root)


class MirrorCallback(TrainerCallback):
    """Uploads each checkpoint to the ``s3://`` checkpoint root once the Trainer saved it, in a
    background thread on rank 0, so that the ranks train on while it uploads (they used to wait in
    the next collective for the whole upload).

    One upload at a time: each save first waits for the previous upload, and the end of training
    (also the stop after SIGTERM) waits for the last one, so a relaunch, the final-checkpoint guard
    and the clean-up after the run never meet an upload in flight. The files are never changed
    while they upload: a checkpoint is written once, and the Trainer's rotation (``save_total_limit``
    2) removes only checkpoints older than the one before the newest. An upload that failed fails
    the run at that next wait, as a failed upload in the training loop did before.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:
            import torch.distributed as dist

            # Every rank writes its own RNG state into the checkpoint: upload only once all have.
            dist.barrier()
        if state.is_world_process_zero:
            self.wait()
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._upload = threading.Thread(
                target=self._send, args=(checkpoint,), name=f"upload-{checkpoint.name}"
            )
            self._upload.start()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()
        return control

    def _send(self, checkpoint: Path) -> None:
        try:
            self.store.upload(checkpoint)
        except BaseException as error:  # raised in the training thread, at the next wait
            self._error = error

    def wait(self) -> None:
        """Until the upload in flight (if any) is done; raises what it failed with."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"Uploading a checkpoint to {self.store.root} failed: {error}") from error
