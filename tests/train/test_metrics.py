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
