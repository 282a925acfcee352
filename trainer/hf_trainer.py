"""``TrainyardTrainer``: the HF ``Trainer`` with what this project changes in it, in one place.

The length-grouped sampler reads the lengths ``trainer.data.tokenize`` stored (``length``): the
Trainer hands its sampler the dataset with the columns the model does not take already removed,
so it would otherwise measure every row itself before the first step.

Data-loader workers get their own process group. The elastic agent (``python -m trainer.launcher``,
like ``torchrun``) starts each rank as a process-group leader and forwards SIGTERM to the whole
group (``os.killpg``). A worker's SIGTERM handler (torch's ``DataLoader`` C handler) exits quietly
only when its parent sends the signal; from anyone else it dies by it, and the rank's SIGCHLD
handler then raises "DataLoader worker ... is killed by signal: Terminated" in the middle of a step:
the rank crashes instead of saving its preemption checkpoint. In a group of its own a worker is
out of the agent's reach; the rank still stops it as usual (its parent's SIGTERM, or the end of
the epoch), and a worker whose rank is gone exits by itself (torch's watchdog on its parent).

The window this leaves is the few statements a new worker runs before ``worker_init_fn`` (at the
start of each epoch and evaluation): a SIGTERM exactly then still reaches it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from transformers import Trainer

from trainer.speed import LENGTH_COLUMN


@dataclass(frozen=True)
class OwnProcessGroup:
    """A ``worker_init_fn`` that moves the worker into a process group of its own, then runs ``then``
    (the Trainer's seeding). A dataclass, so that it pickles for the ``spawn`` start method too."""

    then: Callable[[int], None] | None = None

    def __call__(self, worker_id: int) -> None:
        os.setpgid(0, 0)
        if self.then is not None:
            self.then(worker_id)


def shield_workers(dataloader):
    """``dataloader`` with its workers started in their own process group (the same object).

    accelerate's ``DataLoaderShard`` wraps the torch ``DataLoader`` that starts the workers
    (``base_dataloader``) and forwards attribute reads to it: the hook goes on that one.
    """
    loader = getattr(dataloader, "base_dataloader", dataloader)
    if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, OwnProcessGroup):
        loader.worker_init_fn = OwnProcessGroup(loader.worker_init_fn)
    return dataloader


class TrainyardTrainer(Trainer):
    """The HF Trainer whose length-grouped sampler reads the stored lengths, and whose data-loader
    workers survive a SIGTERM sent to their rank's process group."""

    def _get_train_sampler(self, train_dataset=None):
        # The same rows as the column-pruned dataset the Trainer passes, with their lengths.
        if (
            self.args.train_sampling_strategy == "group_by_length"
            and self.train_dataset is not None
            and LENGTH_COLUMN in getattr(self.train_dataset, "column_names", ())
        ):
            train_dataset = self.train_dataset
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self):
        return shield_workers(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return shield_workers(super().get_eval_dataloader(eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return shield_workers(super().get_test_dataloader(test_dataset))
