import math

import pytest
import torch

from davit.train.metrics import ClassificationMeter


def test_hand_checked_metrics():
    # 3 classes, 4 images; predictions: 0->0 (right), 1->2 (wrong), 2->2 (right), 2->1 (wrong)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    target = torch.tensor([0, 1, 2, 2])
    m = ClassificationMeter(3)
    m.update(logits[:2], target[:2])  # two batches accumulate
    m.update(logits[2:], target[2:])
    r = m.result()
    assert r["top1"] == 50.0 and r["top5"] == 100.0 and r["count"] == 4  # top-5 = top-3 with 3 classes
    assert r["confusion"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert r["per_class_acc"] == [100.0, 0.0, 50.0]

    def nll(row, t):
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))

    expected = sum(nll(r_, t) for r_, t in zip(logits.tolist(), target.tolist())) / 4
    assert r["loss"] == pytest.approx(expected)


def test_top5_and_empty_class():
    logits = torch.zeros(2, 10)
    logits[0, 9] = 5.0  # true 9: right
    logits[1, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # true 4: wrong, but 5th -> in the top 5
    m = ClassificationMeter(10)
    m.update(logits, torch.tensor([9, 4]))
    r = m.result()
    assert r["top1"] == 50.0 and r["top5"] == 100.0
    assert math.isnan(r["per_class_acc"][0])  # no image of class 0: undefined, not 0%


class _CollectiveModel(torch.nn.Module):
    """A forward that is a collective, as an FSDP model's is (it all-gathers parameters per block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        s = x.sum().reshape(1)
        dist.all_reduce(s)
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() * 5


def _lockstep_worker(rank: int, port: int, batches: int, out) -> None:
    import torch.distributed as dist

    from davit.train.metrics import evaluate

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank 0 three batches of two images, rank 1 none at all: an empty shard
    data = [(torch.full((2, 1, 4, 4), float(i % 3)), torch.tensor([i % 3, 0])) for i in range(batches)]
    r = evaluate(_CollectiveModel(), data if rank == 0 else [], torch.device("cpu"), 3, lockstep=True)
    out.put((rank, r["count"], r["top1"]))
    dist.destroy_process_group()


def test_lockstep_evaluation_with_an_empty_shard():
    """Lockstep evaluation: the rank without batches runs dummy forwards until the other one is done (it
    would otherwise leave it waiting in the forward's collective), and scores nothing."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_lockstep_worker, args=(r, port, 3, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        p.kill()
    assert not any(alive), "a rank hung in lockstep evaluation"
    res = sorted(out.get(timeout=5) for _ in procs)
    # 6 images, all on rank 0; labels 0,0 / 1,0 / 2,0 against predictions 0,0 / 1,1 / 2,2: 4 of 6 right
    assert res == [(0, 6, pytest.approx(400 / 6)), (1, 6, pytest.approx(400 / 6))]


class _SideModel(torch.nn.Module):
    """Logits: class 0 = sum of the leftmost column, class 1 = sum of the rightmost one."""

    def forward(self, x):
        return torch.stack([x[..., 0].sum((1, 2)), x[..., -1].sum((1, 2))], 1)


def test_flip_evaluation_averages_an_image_and_its_mirror():
    from davit.train.metrics import evaluate

    x = torch.zeros(3, 1, 2, 3)
    x[0, :, :, 0] = 1.0  # bright left: logits (2, 0), class 0; with flip the mean (1, 1), a tie
    x[1, :, :, -1] = 1.0  # bright right: (0, 2), class 1; with flip a tie
    x[2, :, :, 0], x[2, :, :, -1] = 2.0, 1.0  # (4, 2), class 0; with flip the mean (3, 3), a tie
    y = torch.tensor([0, 1, 1])
    plain = evaluate(_SideModel(), [(x, y)], torch.device("cpu"), 2)
    flip = evaluate(_SideModel(), [(x, y)], torch.device("cpu"), 2, flip=True)
    assert plain["top1"] == pytest.approx(200 / 3)  # images 0 and 1 right, image 2 (left 4 > right 2) wrong
    # with flips every image's logits are equal, so the loss is log(2) for each
    assert flip["loss"] == pytest.approx(math.log(2))
    assert plain["loss"] != pytest.approx(math.log(2))
