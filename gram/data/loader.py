"""Data loaders: an endless, resumable training stream and a complete, ordered evaluation pass."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from gram import distributed as dist


def leave_signals_to_main(worker_id: int) -> None:
    """`worker_init_fn` of every gram loader: SIGTERM and SIGINT sent to the whole process group (SLURM preemption,
    `kill -- -PGID`, Ctrl-C in a terminal) are ignored by the workers and left to the main process, which finishes
    the step, saves a checkpoint and shuts the workers down itself. A worker killed first would end the run with
    "DataLoader worker ... killed by signal" and no checkpoint. Workers still end with the main process: they stop
    on its shutdown message, and PyTorch's watchdog stops them when it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, drop_last) that can start part-way into an epoch, for exact resume.

    It yields ``(epoch, index)`` pairs, so that loader workers that persist across epochs know the epoch
    of every item they build.
    """

    def __init__(self, dataset, seed: int, start_index: int = 0):
        super().__init__(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=True,
                         seed=seed, drop_last=True)
        self.start_index = start_index

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        return iter([(self.epoch, i) for i in indices[self.start_index:]])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class EpochStream:
    """Endless batches over epochs: subclasses start an epoch's loader (`_start_epoch`) and may cap an epoch at
    `batches_per_epoch`; `epoch` and `batches_done` are the data position a checkpoint stores."""

    epoch: int
    batches_done: int
    batches_per_epoch: int | None = None
    _iterator: Iterator[Any] | None

    def _start_epoch(self) -> Iterator[Any]:
        raise NotImplementedError

    def _next_epoch(self) -> None:
        self.epoch, self.batches_done, self._iterator = self.epoch + 1, 0, None

    def __next__(self) -> dict[str, Any]:
        while True:
            if self.batches_per_epoch is not None and self.batches_done >= self.batches_per_epoch:
                self._next_epoch()
            if self._iterator is None:
                self._iterator = self._start_epoch()
            try:
                batch = next(self._iterator)
                self.batches_done += 1
                return batch
            except StopIteration:
                self._next_epoch()

    def __iter__(self) -> EpochStream:
        return self


class TrainStream(EpochStream):
    """Map-style files; `state()`/`load_state()` give the exact data position for resume."""

    def __init__(self, dataset, collate: Callable, micro_batch: int, num_workers: int, seed: int):
        if len(dataset) < micro_batch * dist.get_world_size():
            raise ValueError(f"the training split has {len(dataset)} items, fewer than one global batch "
                             f"({micro_batch} x {dist.get_world_size()} ranks); lower data.batch_size")
        self.dataset, self.collate, self.micro_batch = dataset, collate, micro_batch
        self.num_workers, self.seed = num_workers, seed
        self.epoch, self.batches_done = 0, 0
        self._iterator: Iterator[Any] | None = None
        self._sampler = ResumableSampler(dataset, seed)
        self._loader: DataLoader | None = None

    @property
    def missing_fraction(self) -> float:
        """Fraction of the annotated items the dataset left out for lack of a media file."""
        return self.dataset.missing_fraction

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self._iterator = None

    def _start_epoch(self) -> Iterator[Any]:
        self.dataset.set_epoch(self.epoch)
        self._sampler.set_epoch(self.epoch)
        self._sampler.start_index = self.batches_done * self.micro_batch
        if self._loader is None:
            # One loader whose workers persist across epochs (re-forking them each epoch costs seconds);
            # the sampler is read in this process, so its new epoch and start reach every iteration. An
            # own generator: starting a loader must not draw from the global RNG, or a resumed run (which
            # starts one mid-epoch) would drift from an uninterrupted one.
            generator = torch.Generator().manual_seed(self.seed)
            self._loader = DataLoader(
                self.dataset, batch_size=self.micro_batch, sampler=self._sampler, drop_last=True,
                num_workers=self.num_workers, collate_fn=self.collate, generator=generator,
                persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                worker_init_fn=leave_signals_to_main,
            )
        return iter(self._loader)


class ShardSampler(Sampler[int]):
    """Contiguous, unpadded shard of an evaluation set per rank, so gathering in rank order restores the order."""

    def __init__(self, size: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        per_rank = -(-size // world)
        self.indices = range(min(size, rank * per_rank), min(size, (rank + 1) * per_rank))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset, collate: Callable, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset)), collate_fn=collate,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=leave_signals_to_main,
                      generator=torch.Generator().manual_seed(0))  # leaves the global RNG untouched
