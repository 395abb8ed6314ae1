"""Tar shards: write_shards round-trips folders and in-memory datasets; reading splits over ranks and workers
(each sample once for eval, equal full batches per rank for training), deterministically and resumably."""

import os

import numpy as np
import pytest
import torch
from oddfiles import BAD, GOOD, MAX_PIXELS
from torchvision import transforms as T

from davit.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FashionMNIST,
    ImageFolder,
    ShardDataset,
    build_dataset,
    build_loader,
    write_shards,
)
from davit.data.images import decode_image


class Arrays:
    """Fashion-MNIST-like: .data (N, 8, 8) uint8 where image k is filled with k, .targets, .classes."""

    classes = ["a", "b", "c"]

    def __init__(self, n):
        self.data = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 8, 1).repeat(8, 2)
        self.targets = [k % 3 for k in range(n)]


def ids(loader):
    """The sample ids (pixel value) seen by a loader over Arrays shards, batch by batch."""
    return [x[:, 0, 0, 0].round().long().tolist() for x, _ in loader]


@pytest.fixture(scope="module")
def arrays_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("arr"))
    write_shards(Arrays(50), os.path.join(root, "train"), shard_size=7)
    return root


def test_folder_round_trip(odd_folder, tmp_path):
    src = ImageFolder(odd_folder, "train", max_pixels=MAX_PIXELS)
    index = write_shards(src, str(tmp_path), shard_size=4)
    assert sorted(os.path.basename(p) for p, _ in index["skipped"]) == sorted(BAD)
    n = len(GOOD) + 3
    assert index["num_samples"] == n and [s["count"] for s in index["shards"]] == [4, 4, 4, 1]
    ds = ShardDataset(str(tmp_path))
    assert ds.classes == src.classes and len(ds.paths) == 4
    ds.configure(shuffle=False)
    got = list(ds)
    want = [(decode_image(p), k) for p, k in src.samples if os.path.basename(p) not in BAD]
    assert len(got) == len(want) == n
    for (img, y), (ref, k) in zip(got, want):
        assert y == k and img.size == ref.size and np.array_equal(np.asarray(img), np.asarray(ref))
    with pytest.raises(FileExistsError):
        write_shards(src, str(tmp_path))


@pytest.mark.parametrize("shard_size", [7, 20])
def test_eval_reads_each_sample_once_over_ranks_and_workers(tmp_path, shard_size):
    # 8 shards: whole shards per reader; 3 shards < 2 ranks x 2 workers: every reader takes every 4th sample
    write_shards(Arrays(50), str(tmp_path / "val"), shard_size=shard_size)
    tf = T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Lambda(lambda x: x * 255)])
    seen = []
    for rank in range(2):
        ds = build_dataset("wds", str(tmp_path), "val", transform=tf, mode="L")
        loader = build_loader(ds, 4, is_training=False, workers=2, distributed=True, rank=rank, world_size=2)
        rank_ids = [i for b in ids(loader) for i in b]
        assert len(rank_ids) == len(ds)
        seen += rank_ids
    assert sorted(seen) == list(range(50))


def test_head_keeps_the_first_samples_over_ranks_and_workers(arrays_shards):
    """head(n): the first n samples in shard order (the last shard kept cut short), each read once in eval
    over 2 ranks x 2 workers; training gives each rank its equal share of n."""
    tf = T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Lambda(lambda x: x * 255)])
    seen = []
    for rank in range(2):
        ds = build_dataset("wds", arrays_shards, "train", transform=tf, mode="L").head(17)  # 7 + 7 + 3
        assert ds.num_samples == 17 and len(ds.paths) == 3
        loader = build_loader(ds, 2, is_training=False, workers=2, distributed=True, rank=rank, world_size=2)
        seen += [i for b in ids(loader) for i in b]
    assert sorted(seen) == list(range(17))
    ds = build_dataset("wds", arrays_shards, "train", transform=tf, mode="L").head(17)
    loader = build_loader(ds, 4, is_training=True, workers=0, distributed=True, rank=0, world_size=2)
    got = [i for b in ids(loader) for i in b]
    assert len(got) == 8 and set(got) <= set(range(17))  # ceil(17 / 2) = 9 per rank: 2 full batches of 4
    with pytest.raises(ValueError, match=">= 1"):
        ds.head(0)


def test_training_is_equal_per_rank_deterministic_and_resumable(arrays_shards):
    tf = T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Lambda(lambda x: x * 255)])

    def loader(rank, workers):
        ds = build_dataset("wds", arrays_shards, "train", transform=tf, mode="L")
        ds.shuffle_buffer = 5
        return build_loader(
            ds, 4, is_training=True, workers=workers, seed=1, distributed=True, rank=rank, world_size=2
        )

    runs = {}
    for rank in range(2):
        ld = loader(rank, 2)
        ld.set_epoch(3)
        assert len(ld) == 6  # 25 samples per rank -> 6 full batches of 4, on every rank
        runs[rank] = ids(ld)
        assert len(runs[rank]) == 6 and all(len(b) == 4 for b in runs[rank])
        if rank == 1:
            continue  # the remaining checks once are enough (each pass starts two worker processes)
        ld.set_epoch(3)
        assert ids(ld) == runs[rank]  # same (seed, epoch) -> same batches
        ld.set_epoch(4)
        assert ids(ld) != runs[rank]
        ld.set_epoch(3, start_iter=3)  # odd start: the first resumed batch comes from the second worker
        assert len(ld) == 3 and ids(ld) == runs[rank][3:]
    flat = [i for r in runs.values() for b in r for i in b]
    assert len(set(flat)) > 35  # ranks read different shards
    # the main process alone (workers=0) also gives equal, full batches
    ld = loader(0, 0)
    ld.set_epoch(3)
    assert [len(b) for b in ids(ld)] == [4] * 6


def test_no_index_brace_pattern_and_errors(tmp_path):
    write_shards(Arrays(10), str(tmp_path), shard_size=4, prefix="part")
    os.remove(tmp_path / "index.json")
    ds = ShardDataset(str(tmp_path / "part-{000000..000002}.tar"), mode="L")
    assert ds.counts == [4, 4, 2] and ds.classes == ["0", "1", "2"]  # counted and inferred from the tars
    with pytest.raises(FileNotFoundError, match="do not exist"):
        ShardDataset(str(tmp_path / "part-{000000..000005}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        ShardDataset(str(tmp_path / "empty_dir_that_is_missing" / "*.tar"))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_round_trip(tmp_path):
    fm = FashionMNIST(None, "test")
    fm.data, fm.targets = fm.data[:12], fm.targets[:12]
    index = write_shards(fm, str(tmp_path), shard_size=5)
    assert index["classes"] == list(FASHION_MNIST_CLASSES) and index["num_samples"] == 12
    ds = ShardDataset(str(tmp_path), mode="L")
    ds.configure(shuffle=False)
    got = list(ds)
    assert [y for _, y in got] == fm.targets
    assert all(np.array_equal(np.asarray(img), a) for (img, _), a in zip(got, fm.data))
