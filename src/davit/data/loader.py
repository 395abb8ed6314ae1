"""A DataLoader whose batches depend only on (seed, epoch, rank, world size), that can start mid-epoch without
decoding the skipped batches, and that drops unreadable samples and reports them per epoch.

Determinism: the sampler's order is a permutation seeded by (seed, epoch); each sample's augmentation RNGs
(torch, numpy, random) are seeded from (seed, epoch, index) right before it is loaded. So a batch is the same
whatever the number of workers and whether the epoch was started from batch 0 or resumed at batch k.

Bad samples: a dataset item that is a :class:`BadSample` is dropped by the collate, which returns it beside
the batch (this works from worker processes, where a shared counter would not); the loader strips it, yields
plain ``(x, y)`` and collects the epoch's bad samples in ``loader.bad`` (``loader.bad_report()``
formats them). A batch with no readable sample is left out, unless ``loader.yield_empty`` is set: then it
comes as ``(None, None)``, so that a distributed loop can leave it out on every rank together.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from .images import BadSample

__all__ = [
    "BatchRNG",
    "EpochSampler",
    "SeededDataset",
    "Collate",
    "Loader",
    "build_loader",
    "item_seed",
    "format_bad",
]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample of one epoch (splitmix-style mixing, so nearby triples differ widely)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    return (x ^ (x >> 32)) & 0xFFFFFFFF


class BatchRNG:
    """Seeds the global torch/numpy/random RNGs at the start of a batch (the transforms and mixup draw
    from them) and, in the main process (workers=0), restores the caller's states once the batch is
    collated, so the training loop's own random stream (dropout, drop path) is not disturbed. Seeded once
    per batch, not per sample: ``torch.manual_seed`` costs about as much as decoding a small image.
    One per process (``BATCH_RNG``): the dataset begins a batch, the collate ends it."""

    def __init__(self):
        self.saved = None

    def begin(self, seed: int) -> None:
        if get_worker_info() is None and self.saved is None:
            self.saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.random.default_generator.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def end(self) -> None:
        if self.saved is not None:
            torch.set_rng_state(self.saved[0])
            np.random.set_state(self.saved[1])
            random.setstate(self.saved[2])
            self.saved = None


BATCH_RNG = BatchRNG()


class EpochSampler(Sampler):
    """Like DistributedSampler (strided shard of a seeded permutation, padded so every rank gets the same
    number of samples when ``pad``; ``pad=False`` covers every sample exactly once over all ranks), but
    it can skip the first ``skip`` samples of the rank's shard, and it yields ``(index, seed)`` keys: the
    first sample of each batch of ``batch_size`` carries the batch's RNG seed (from seed, epoch, rank and
    batch number), the others None."""

    def __init__(
        self,
        n: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        batch_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.n, self.shuffle, self.seed, self.pad = n, shuffle, seed, pad
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; ``skip`` samples of this rank's shard are left out (mid-epoch resume)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def shard_size(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return max(0, self.shard_size() - self.skip)

    def indices(self) -> list[int]:
        """This rank's sample indices for the epoch, before skipping."""
        if self.shuffle:
            g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order += (order * math.ceil(extra / max(1, self.n)))[
                :extra
            ]  # repeat the start, as DistributedSampler
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        order = self.indices()
        bs = self.batch_size
        for pos in range(self.skip, len(order)):
            b, k = divmod(pos, bs)
            seed = item_seed(self.seed, self.epoch, b * self.world_size + self.rank) if k == 0 else None
            yield order[pos], seed


class SeededDataset(Dataset):
    """Wraps a map-style dataset so that ``ds[(index, seed)]`` (keys from EpochSampler) seeds the RNGs when
    ``seed`` is not None (first sample of a batch); plain integer keys load without seeding."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # .classes, .targets, ... of the wrapped dataset; "dataset" itself is looked up here only while
        # unpickling in a worker, before __init__ state exists
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        if seed is not None:
            BATCH_RNG.begin(seed)
        return self.dataset[index]

    def __getitems__(self, keys: list) -> list:
        # defined here so the DataLoader's batched fetch never reaches the inner dataset through __getattr__
        inner = getattr(type(self.dataset), "__getitems__", None)
        if inner is None or any(isinstance(k, tuple) and k[1] is not None for k in keys[1:]):
            return [self[k] for k in keys]
        if isinstance(keys[0], tuple) and keys[0][1] is not None:
            BATCH_RNG.begin(keys[0][1])
        return inner(self.dataset, [k[0] if isinstance(k, tuple) else k for k in keys])


class Collate:
    """Stack the good samples, set the BadSamples aside; then optionally a batch transform (batched
    augmentation of uint8 tensors) and a batch mixup (e.g. timm Mixup). Returns ``(x, y, bad)``; ``x`` and
    ``y`` are None if every sample was bad."""

    def __init__(self, mixup: Callable | None = None, batch_transform: Callable | None = None):
        self.mixup, self.batch_transform = mixup, batch_transform

    def __call__(self, batch):
        try:
            bad = [b for b in batch if isinstance(b, BadSample)]
            good = [b for b in batch if not isinstance(b, BadSample)]
            if not good:
                return None, None, bad
            x, y = default_collate(good)
            if self.batch_transform is not None:
                x = self.batch_transform(x)
            if self.mixup is not None:
                x, y = self.mixup(x, y)  # still inside the batch's seeded RNG stream
            return x, y, bad
        finally:
            BATCH_RNG.end()


class Loader(DataLoader):
    """A DataLoader yielding ``(x, y)``; see the module docstring.

    - ``set_epoch(epoch, start_iter=0)``: order of the epoch, starting at batch ``start_iter`` (the skipped
      batches are never loaded). ``len(loader)`` is then the number of batches left.
    - ``bad``: BadSamples met so far in the current epoch (this rank); ``bad_report()``: a one-line summary.
    - ``position``: batches of this epoch consumed so far, counting skipped and all-bad batches; save it as
      ``start_iter`` to resume exactly after the last batch the trainer used.
    - ``batches_per_epoch``: the full epoch's number of batches, whatever ``start_iter``.
    - ``yield_empty``: yield ``(None, None)`` for a batch whose samples were all unreadable instead of
      leaving it out (a distributed trainer must leave such a batch out on all ranks at once).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad: list[BadSample] = []
        self.yield_empty = False
        self.position = 0
        self._start_iter = 0

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self._start_iter = int(start_iter)
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(epoch, skip=self._start_iter * self.batch_size)
        elif hasattr(self.dataset, "set_epoch"):  # iterable (shard) datasets shuffle themselves
            self.dataset.set_epoch(epoch, skip_batches=self._start_iter, batch_size=self.batch_size)
        elif start_iter:
            raise ValueError("start_iter needs an EpochSampler or a dataset with set_epoch")

    @property
    def batches_per_epoch(self) -> int:
        if isinstance(self.sampler, EpochSampler):
            n = self.sampler.shard_size()
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return self._start_iter + len(self)

    def __iter__(self):
        self.bad = []
        # sampler.set_epoch(e) alone (DistributedSampler style) resets the skip: follow the sampler
        sampled = isinstance(self.sampler, EpochSampler)
        self.position = self.sampler.skip // self.batch_size if sampled else self._start_iter
        for x, y, bad in super().__iter__():
            self.position += 1
            if bad:
                self.bad.extend(bad)
            if x is None and not self.yield_empty:
                continue  # every sample of this batch was unreadable
            yield x, y

    def bad_report(self, max_names: int = 10) -> str:
        """'' if nothing was skipped, else '2 unreadable files skipped: a.jpg (empty file), b.jpg (...)'."""
        return format_bad(self.bad, max_names)


def format_bad(bad: list[BadSample], max_names: int = 10) -> str:
    """'' for no bad samples, else '2 unreadable files skipped: a.jpg (empty file), b.jpg (...)'; also for
    the bad samples of all ranks gathered together."""
    if not bad:
        return ""
    names = ", ".join(f"{b.path} ({b.reason})" for b in bad[:max_names])
    more = f", and {len(bad) - max_names} more" if len(bad) > max_names else ""
    return f"{len(bad)} unreadable files skipped: {names}{more}"


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    is_training: bool,
    workers: int = 2,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
    collate_mixup: Callable | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
    batch_transform: Callable | None = None,
) -> Loader:
    """A :class:`Loader` over ``dataset``: shuffled per (seed, epoch) when training, in order otherwise.

    ``distributed``: shard by rank/world size (from torch.distributed, else RANK/WORLD_SIZE, or given);
    training shards are padded to equal length so every rank runs the same number of steps, eval shards are
    not (each sample is seen once). ``drop_last`` defaults to ``is_training``. ``collate_mixup`` (e.g. timm
    Mixup, applied in the workers) needs even batches: use :func:`davit.data.build_mixup`, which handles odd
    ones. ``batch_transform`` (batch_transforms.py) runs on each stacked batch in the workers, before mixup.
    Workers are forked afresh each epoch by default, so a change to the dataset, transform or mixup between
    epochs (e.g. ``mixup_fn.mixup_enabled = False``) takes effect; ``persistent_workers=True`` saves the
    start-up (~0.1-0.5 s per epoch) but its workers keep the copies they started with.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    drop_last = is_training if drop_last is None else drop_last
    r, w = _dist_rank_world() if distributed else (0, 1)
    rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    common = dict(
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=Collate(collate_mixup, batch_transform),
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent_workers and workers > 0,
        # the DataLoader draws its worker base seed from this, not from the training loop's global RNG
        generator=torch.Generator().manual_seed(seed),
    )
    if isinstance(dataset, IterableDataset):
        # set_epoch changes the dataset object, which persistent workers would not see (they hold copies)
        common["persistent_workers"] = False
        if hasattr(dataset, "configure"):
            dataset.configure(
                seed=seed,
                rank=rank,
                world_size=world_size,
                shuffle=is_training,
                batch_size=batch_size,
                drop_last=drop_last,
                num_workers=workers,
            )
        return Loader(dataset, **common)
    sampler = EpochSampler(
        len(dataset),
        shuffle=is_training,
        seed=seed,
        rank=rank,
        world_size=world_size,
        pad=is_training,
        batch_size=batch_size,
    )
    return Loader(SeededDataset(dataset), sampler=sampler, **common)
