"""The loader's order and augmentation randomness depend only on (seed, epoch, rank): same batches with any
number of workers, exact mid-epoch resume with start_iter, DistributedSampler-style sharding."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from davit.data import EpochSampler, build_loader, build_mixup


class Noisy(Dataset):
    """Item i = (i + noise from all three global RNGs, i): the noise plays the part of random augmentation."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        noise = torch.rand(1, 2, 2) + float(np.random.rand()) + random.random()
        return torch.full((1, 2, 2), float(i)) + noise, i


def epoch(loader, e, start_iter=0):
    loader.set_epoch(e, start_iter=start_iter)
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_depend_only_on_seed_and_epoch(workers):
    ds = Noisy(23)
    ref = build_loader(ds, 4, is_training=True, workers=0, seed=3)
    other = build_loader(ds, 4, is_training=True, workers=workers, seed=3)
    e0 = epoch(ref, 0)
    assert len(e0) == 5 and sum(len(y) for _, y in e0) == 20  # drop_last for training
    assert same(e0, epoch(other, 0))
    assert same(epoch(ref, 1), epoch(other, 1))
    assert not same(e0, epoch(ref, 1))  # a new epoch is a new order and new augmentations
    assert not same(e0, epoch(build_loader(ds, 4, is_training=True, workers=0, seed=4), 0))


def test_start_iter_resumes_exactly_without_loading_skipped_batches():
    ds = Noisy(30)
    full = epoch(build_loader(ds, 4, is_training=True, workers=0, seed=1), 2)
    loader = build_loader(ds, 4, is_training=True, workers=0, seed=1)
    loader.set_epoch(2, start_iter=3)
    assert len(loader) == len(full) - 3 and loader.batches_per_epoch == len(full)
    assert len(loader.sampler) == 4 * (7 - 3) + 2  # the skipped indices never reach the dataset
    assert same(epoch(loader, 2, start_iter=3), full[3:])
    assert loader.position == len(full)
    # the plain sampler API resets the skip, as DistributedSampler.set_epoch would
    loader.sampler.set_epoch(2)
    assert same([(x, y) for x, y in loader], full)
    assert loader.position == len(full)


def test_training_loop_rng_is_not_disturbed():
    loader = build_loader(Noisy(8), 4, is_training=True, workers=0)
    outs = []
    for iterate in (False, True):
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        if iterate:
            list(loader)
        outs.append((torch.rand(3), np.random.rand(), random.random()))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1:] == outs[1][1:]


def test_eval_order_is_sequential():
    loader = build_loader(Noisy(10), 4, is_training=False, workers=0)
    assert [y.tolist() for _, y in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_distributed_sharding_covers_the_dataset():
    n, world = 10, 3
    ev = [list(EpochSampler(n, shuffle=False, rank=r, world_size=world, pad=False)) for r in range(world)]
    assert sorted(i for shard in ev for i, _ in shard) == list(range(n))  # each sample exactly once
    tr = []
    for r in range(world):
        s = EpochSampler(n, shuffle=True, seed=5, rank=r, world_size=world, pad=True)
        s.set_epoch(4)
        tr.append([i for i, _ in s])
    assert [len(t) for t in tr] == [4, 4, 4]  # equal steps on every rank
    flat = [i for t in tr for i in t]
    assert set(flat) == set(range(n)) and len(flat) - len(set(flat)) == 2  # padding repeats 2 samples
    # ranks take strided parts of one permutation (same seed and epoch on every rank)
    order = [tr[k % world][k // world] for k in range(world * 4)]
    assert sorted(order[:n]) == list(range(n)) and order[n:] == order[: world * 4 - n]
    loaders = [
        build_loader(Noisy(n), 2, is_training=False, workers=0, distributed=True, rank=r, world_size=world)
        for r in range(world)
    ]
    assert sorted(i for ld in loaders for _, y in ld for i in y.tolist()) == list(range(n))
    with pytest.raises(ValueError, match="rank 3"):
        EpochSampler(n, rank=3, world_size=3)


def test_mixup_in_collate_handles_odd_batches():
    mixup, _ = build_mixup(0.8, 1.0, 0.1, num_classes=7)
    loader = build_loader(Noisy(7), 5, is_training=False, workers=0, collate_mixup=mixup)
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in loader]
    assert shapes == [((5, 1, 2, 2), (5, 7)), ((2, 1, 2, 2), (2, 7))]
    for _, y in loader:
        assert torch.allclose(y.sum(1), torch.ones(len(y)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(Noisy(3), 0, is_training=True)
