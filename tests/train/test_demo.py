"""The demo's pieces that run after training: its flip evaluation must score what `davit eval --tta-flip`
scores on the same test images (the demo feeds uint8 batches, not the PIL transform)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from davit.cli import main
from davit.data import FASHION_MNIST_DIR
from davit.train import demo
from davit.train.trainer import train


def test_flip_eval_matches_davit_eval_tta_flip(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(img_size=28, crop_pct=1.0, epochs=1, warmup_epochs=0, data_dir=FASHION_MNIST_DIR)
    run = Path(train(cfg)["run_dir"])
    flip = demo._flip_eval(str(run), cfg)
    out_json = tmp_path / "ev.json"
    rc = main(["eval", str(run), "--tta-flip", "-j", "0", "-b", "500", "--results-file", str(out_json)])
    assert rc == 0, capsys.readouterr()
    ev = json.loads(out_json.read_text())
    assert flip["count"] == ev["count"] == 10000
    assert flip["confusion"] == ev["confusion"]
    assert flip["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    report = (run / "report.md").read_text()
    assert f"top-1 {flip['top1']:.2f}%, top-5 {flip['top5']:.2f}% on 10000 images" in report


def test_a_budget_too_short_to_train_is_refused(tmp_path):
    # after start-up and the ~20 s kept for the final evaluation, 12 s leave nothing: a negative time budget
    # used to surface as an error about --time-budget, a flag the demo's user never gave
    with pytest.raises(ValueError, match=r"--minutes 0.2 leaves -?\d+ s to train"):
        demo.run_demo(str(tmp_path / "out"), data_dir=str(tmp_path), minutes=0.2)
    assert not (tmp_path / "out").exists()
