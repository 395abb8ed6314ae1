"""Tar shards in the webdataset layout (``KEY.jpg|png|webp`` + ``KEY.cls`` per sample) for runs where millions
of small files on shared storage are the bottleneck: each worker streams whole tar files sequentially.

- :func:`write_shards` converts an ImageFolder / Fashion-MNIST / any (PIL image, label) dataset into
  ``shard-000000.tar ...`` plus ``index.json`` (classes, per-shard counts).
- :class:`ShardDataset` reads them. Shards are split over (rank, worker); training epochs reshuffle the shard
  order and a sample buffer with (seed, epoch) and give every rank the same number of full batches (shards are
  cycled where a worker's share runs short), so DDP ranks never wait on each other. Evaluation reads each
  sample exactly once. Batches are deterministic for a given (seed, epoch, world size, workers) and
  ``start_iter`` resumes mid-epoch exactly for the same world size and number of workers, reading but not
  decoding the skipped samples.
"""

from __future__ import annotations

import copy
import glob
import io
import itertools
import json
import math
import os
import random

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .images import DEFAULT_MAX_PIXELS, BadSample, decode_image
from .loader import BATCH_RNG, item_seed

__all__ = ["ShardDataset", "write_shards", "list_shards"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _encoded_items(dataset):
    """Yield (name, ext, bytes, label) without re-encoding files that are already jpg/png/webp."""
    if hasattr(dataset, "samples"):  # an ImageFolder: keep the original file bytes
        for path, target in dataset.samples:
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            img = decode_image(
                path, getattr(dataset, "mode", "RGB"), getattr(dataset, "max_pixels", DEFAULT_MAX_PIXELS)
            )
            if isinstance(img, BadSample):
                yield path, None, img, target
            elif ext in IMAGE_KEYS:
                with open(path, "rb") as f:
                    yield path, "jpg" if ext == "jpeg" else ext, f.read(), target
            else:
                yield path, "png", _png(img), target
    elif hasattr(dataset, "data") and hasattr(dataset, "targets"):  # Fashion-MNIST-like uint8 arrays
        for i, (a, t) in enumerate(zip(dataset.data, dataset.targets)):
            yield str(i), "png", _png(Image.fromarray(np.asarray(a))), int(t)
    else:
        for i in range(len(dataset)):
            item = dataset[i]
            if isinstance(item, BadSample):
                yield item.path, None, item, -1
            else:
                yield str(i), "png", _png(item[0]), int(item[1])


def write_shards(dataset, out_dir: str, shard_size: int = 10000, prefix: str = "shard") -> dict:
    """Write ``dataset`` (untransformed) as tar shards of ``shard_size`` samples plus ``index.json``; returns
    the index (with ``skipped``: the unreadable files left out, as [path, reason])."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    if glob.glob(os.path.join(out_dir, f"{prefix}-*.tar")):
        raise FileExistsError(f"{out_dir} already holds {prefix}-*.tar shards; choose an empty folder")
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    skipped, n = [], 0
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False) as sink:
        for _name, ext, data, target in _encoded_items(dataset):
            if ext is None:
                skipped.append([data.path, data.reason])
                continue
            sink.write({"__key__": f"{n:09d}", ext: data, "cls": str(target).encode()})
            n += 1
    shards = sorted(glob.glob(os.path.join(out_dir, f"{prefix}-*.tar")))
    counts = [shard_size] * (len(shards) - 1) + [n - shard_size * (len(shards) - 1)] if shards else []
    index = {
        "classes": list(getattr(dataset, "classes", [])),
        "num_samples": n,
        "shards": [{"file": os.path.basename(s), "count": c} for s, c in zip(shards, counts)],
        "skipped": skipped,
    }
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index


def list_shards(root: str) -> list[str]:
    """A folder of ``*.tar``, a glob (``/data/train-*.tar``) or a brace pattern (``t-{0000..1023}.tar``)."""
    if os.path.isdir(root):
        paths = sorted(glob.glob(os.path.join(root, "*.tar")))
    elif any(c in root for c in "*?["):
        paths = sorted(glob.glob(root))
    else:
        paths = list(braceexpand.braceexpand(root))
    if not paths:
        raise FileNotFoundError(
            f"no .tar shards in {root}; pass a folder of *.tar or a pattern like "
            f"'/data/train-{{000000..000099}}.tar' (make them with `davit data shards`)"
        )
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {root} do not exist, e.g. {missing[0]}")
    return paths


def _samples(path: str):
    """(key, image bytes or None, label or None) for each sample of one tar, in file order."""
    with open(path, "rb") as f:
        files = ({**d, "__url__": path} for d in tar_file_iterator(f))
        for s in group_by_keys(files, handler=wds.reraise_exception):
            img = next((s[k] for k in IMAGE_KEYS if k in s), None)
            cls = s.get("cls")
            yield (
                f"{os.path.basename(path)}/{s['__key__']}",
                img,
                (int(cls.decode()) if cls is not None else None),
            )


class ShardDataset(IterableDataset):
    """Items ``(transform(image), label)`` or BadSample from tar shards (see the module docstring).

    ``.classes`` and per-shard counts come from ``index.json`` beside the shards, or are found by reading the
    tars once. build_loader calls :meth:`configure` (rank, world size, workers, batch size) and the loader's
    ``set_epoch`` calls :meth:`set_epoch`. ``shuffle_buffer``: samples mixed across shard boundaries.
    """

    def __init__(
        self,
        root: str,
        transform=None,
        mode: str = "RGB",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        shuffle_buffer: int = 2000,
    ):
        self.paths = list_shards(root)
        self.transform, self.mode = transform, mode
        self.max_pixels, self.shuffle_buffer = max_pixels, shuffle_buffer
        idx_file = os.path.join(os.path.dirname(self.paths[0]), "index.json")
        counts, classes = None, []
        if os.path.isfile(idx_file):
            with open(idx_file) as f:
                index = json.load(f)
            by_name = {s["file"]: s["count"] for s in index.get("shards", [])}
            if all(os.path.basename(p) in by_name for p in self.paths):
                counts = [by_name[os.path.basename(p)] for p in self.paths]
                classes = index.get("classes", [])
        if counts is None:  # no index: count once by reading the tar headers and the small .cls members
            counts, top = [], -1
            for p in self.paths:
                labels = [lbl for _, _, lbl in _samples(p)]
                counts.append(len(labels))
                top = max([top] + [lbl for lbl in labels if lbl is not None])
            classes = [str(k) for k in range(top + 1)]
        self.counts, self.classes = counts, classes
        self.num_samples = sum(counts)
        self.limits: list[int | None] = [None] * len(self.paths)  # samples read per shard (None: all)
        self.configure()
        self.set_epoch(0)

    def head(self, n: int) -> ShardDataset:
        """A copy holding only the first ``n`` samples in shard order (for ``--train-samples`` and
        ``--val-samples``): the first shards, the last cut short; split over ranks and workers as usual."""
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        out = copy.copy(self)
        out.paths, out.counts, out.limits, left = [], [], [], n
        for p, c in zip(self.paths, self.counts):
            if left <= 0:
                break
            take = min(c, left)
            out.paths.append(p)
            out.counts.append(take)
            out.limits.append(take if take < c else None)
            left -= take
        out.num_samples = sum(out.counts)
        return out

    def configure(
        self,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        batch_size: int = 1,
        drop_last: bool = True,
        num_workers: int = 0,
    ) -> None:
        """Called by build_loader; the loader's settings decide how the shards are split."""
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.batch_size, self.drop_last, self.num_workers = batch_size, drop_last, max(1, num_workers)

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int | None = None) -> None:
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)
        if batch_size:
            self.batch_size = batch_size

    # --- how samples are split: "roles" are the rank's workers; batch j of a rank comes from role j % W
    def _role_share(self, role: int) -> list[int]:
        """Shard indices read by this (rank, role) this epoch."""
        order = list(range(len(self.paths)))
        if self.shuffle:
            random.Random(item_seed(self.seed, self.epoch, -2)).shuffle(order)
        g, G = self.rank * self.num_workers + role, self.world_size * self.num_workers
        return order[g::G] if len(order) >= G else order

    def _role_batches(self, role: int) -> int | None:
        """Training: the fixed number of batches of this role (equal per rank); eval: None (read once)."""
        if not self.shuffle:
            return None
        per_rank = math.ceil(self.num_samples / self.world_size)
        b = per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        W = self.num_workers
        return b // W + (role < b % W)

    def __len__(self) -> int:
        """Samples this rank yields in the epoch, counted so that len(loader) is its number of batches."""
        if self.shuffle:
            b = sum(self._role_batches(r) for r in range(self.num_workers)) - self.skip_batches
            return max(0, b) * self.batch_size
        n = 0
        G = self.world_size * self.num_workers
        for role in range(self.num_workers):
            g = self.rank * self.num_workers + role
            if len(self.paths) >= G:
                n += sum(self.counts[i] for i in self._role_share(role))
            else:
                n += len(range(g, self.num_samples, G))
        return n

    def _stream(self, role: int):
        """(key, bytes, label) of this role, in epoch order, cycled over its shards when training."""
        share = self._role_share(role)
        G = self.world_size * self.num_workers
        g = self.rank * self.num_workers + role
        by_sample = len(self.paths) < G  # fewer shards than readers: every reader takes every G-th sample
        while True:
            i = got = 0
            for si in share:
                for s in itertools.islice(_samples(self.paths[si]), self.limits[si]):
                    if not by_sample or i % G == g:
                        yield s
                        got += 1
                    i += 1
            if not self.shuffle or got == 0:  # eval reads once; an empty share must not spin forever
                return

    def _shuffled(self, stream, role: int):
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from stream
            return
        rng = random.Random(item_seed(self.seed, self.epoch, 1_000_000 + self.rank * 1000 + role))
        buf = []
        for s in stream:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            self.num_workers = info.num_workers  # used without build_loader's configure
        W = self.num_workers
        worker = info.id if info is not None else 0
        role = (worker + self.skip_batches) % W  # after skipping k batches, the rank's next batch is k's
        skip = len(range(role, self.skip_batches, W)) * self.batch_size
        nb = self._role_batches(role)
        limit = None if nb is None else nb * self.batch_size
        bs = self.batch_size
        for n, (key, data, label) in enumerate(self._shuffled(self._stream(role), role)):
            if limit is not None and n >= limit:
                return
            if n < skip:
                continue  # skipped for a mid-epoch resume: read, never decoded
            if n % bs == 0:  # a batch starts: seed its augmentations (the collate ends it)
                BATCH_RNG.begin(item_seed(self.seed, self.epoch, ((self.rank * W + role) << 40) + n // bs))
            yield self._load(key, data, label)

    def _load(self, key: str, data: bytes | None, label: int | None):
        if data is None or label is None:
            what = "an image (jpg/png/webp)" if data is None else "a .cls label"
            return BadSample(key, f"sample lacks {what}")
        img = decode_image(data, self.mode, self.max_pixels, name=key)
        if isinstance(img, BadSample):
            return img
        return (self.transform(img) if self.transform is not None else img), label
