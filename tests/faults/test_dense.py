"""Faults in the dense tasks (`davit segment|detect train`): a graceful signal saves the current iteration and
the same command resumes from it and ends with the uninterrupted run's weights; a NaN loss stops before
applying the step, naming the last good checkpoint; a damaged newest checkpoint is skipped for the previous
one."""

import json
import os
import re
import shlex
import signal

import pytest
import torch
from safetensors.torch import load_file

from davit.cli import main
from davit.tasks import segmentation
from davit.tasks.scenes import build_scenes
from davit.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    build_scenes(out, num_train=6, num_val=2, size=48, items=(1, 2), item_frac=(0.3, 0.45), seed=5)
    return out


def _args(scenes, run, iters, *extra):
    return ["segment", "train", "--preset", "scenes-upernet-demo", "--data", str(scenes), "--out", str(run),
            "--progress", "none", "--set", f"iters={iters}", "batch_size=2", "workers=0", "crop_size=48",
            "scale=[48,48]", "channels=8", "aux_channels=8", "log_interval=1", "eval_batch_size=2",
            "threads=1", "time_limit_min=null", *extra]


def _steps(run):
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if r["kind"] == "train"]


def _assert_same_weights(run_a, run_b):
    a, b = (load_file(r / "model.safetensors") for r in (run_a, run_b))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _signal_in_loss(monkeypatch, at_call: int, signum: int = signal.SIGTERM):
    """Send ``signum`` to this process during the ``at_call``-th UperNet loss (= training iteration);
    returns a function that puts the real loss back."""
    real_loss, calls = segmentation.UperNet.loss, []

    def loss_then_signal(self, x, labels):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signum)
        return real_loss(self, x, labels)

    monkeypatch.setattr(segmentation.UperNet, "loss", loss_then_signal)
    return lambda: monkeypatch.setattr(segmentation.UperNet, "loss", real_loss)


def _ckpts(run):
    return sorted(p.name for p in (run / "ckpt").glob("ckpt-*.pt"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_iteration_and_the_same_command_resumes(scenes, tmp_path, monkeypatch, capsys,
                                                                 signum):
    run = tmp_path / "run"
    restore = _signal_in_loss(monkeypatch, 2, signum)  # during iteration 2: finish it, save it and exit
    assert main(_args(scenes, run, 5)) == 130
    out = capsys.readouterr().out
    assert "stopped at iteration 2/5" in out and signal.Signals(signum).name in out
    assert _ckpts(run) == ["ckpt-000000002.pt"] and not (run / "model.safetensors").exists()
    assert load_checkpoint(run / "ckpt" / "ckpt-000000002.pt")["step"] == 2
    restore()
    assert main(_args(scenes, run, 5)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _steps(run) == [1, 2, 3, 4, 5]  # nothing lost, nothing repeated
    assert (run / "model.safetensors").is_file()


def test_nan_loss_stops_before_the_step_and_names_the_last_good_checkpoint(scenes, tmp_path, monkeypatch,
                                                                           capsys):
    run = tmp_path / "run"
    real_loss, calls = segmentation.UperNet.loss, []

    def nan_at_3(self, x, labels):
        calls.append(1)
        out = real_loss(self, x, labels)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(segmentation.UperNet, "loss", nan_at_3)
    assert main(_args(scenes, run, 6, "eval_interval=2")) == 2  # the CLI's one-line error, no traceback
    err = capsys.readouterr().err
    want = r"error: loss is nan at iteration 3; the step was not applied\. .*ckpt-000000002\.pt"
    assert re.search(want, err), err
    assert _ckpts(run) == ["ckpt-000000002.pt"]
    saved = load_checkpoint(run / "ckpt" / "ckpt-000000002.pt")
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_damaged_newest_checkpoint_is_skipped(scenes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(scenes, run, 3, "eval_interval=1")) == 0
    assert _ckpts(run) == ["ckpt-000000002.pt", "ckpt-000000003.pt"]  # keep_checkpoints 2
    newest = run / "ckpt" / "ckpt-000000003.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum must catch it
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_args(scenes, run, 4)) == 0
    assert "ckpt-000000002.pt at iteration 2/4" in capsys.readouterr().out
    assert _steps(run)[-2:] == [3, 4]


def test_signalled_demo_says_how_to_continue(scenes, tmp_path, monkeypatch, capsys):
    run = tmp_path / "demo"
    restore = _signal_in_loss(monkeypatch, 1)
    sets = _args(scenes, run, 3)[_args(scenes, run, 3).index("--set") + 1:]
    assert main(["segment", "demo", "--data", str(scenes), "--out", str(run), "--set", *sets]) == 130
    hint = capsys.readouterr().out.splitlines()[-1]
    assert hint.startswith("(a demo starts over; to continue this one: davit segment train ")
    restore()
    cmd = shlex.split(hint[hint.index("davit segment train"):].rstrip(")"))[1:]
    assert main(cmd + ["--progress", "none"]) == 0
    assert "resumed from" in capsys.readouterr().out and _steps(run) == [1, 2, 3]


@pytest.mark.parametrize("workers,stop_at,eval_interval", [(0, 3, 0), (1, 3, 0), (0, 2, 2)])
def test_resumed_run_ends_with_the_uninterrupted_weights(scenes, tmp_path, monkeypatch, workers, stop_at,
                                                         eval_interval):
    """Stopped by SIGTERM at iteration 3 of 5 (past an epoch boundary: 3 batches per epoch), or at 2 where
    the uninterrupted run evaluates (the stopped one saves without evaluating), and resumed: the final
    weights equal those of a run that was never interrupted, bit for bit."""
    extra = (f"workers={workers}", f"eval_interval={eval_interval}")
    assert main(_args(scenes, tmp_path / "whole", 5, *extra)) == 0
    restore = _signal_in_loss(monkeypatch, stop_at)
    assert main(_args(scenes, tmp_path / "cut", 5, *extra)) == 130
    restore()
    assert main(_args(scenes, tmp_path / "cut", 5, *extra)) == 0
    _assert_same_weights(tmp_path / "whole", tmp_path / "cut")


def test_detection_resumed_run_ends_with_the_uninterrupted_weights(scenes, tmp_path, monkeypatch, capsys):
    def args(out):
        return ["detect", "train", "--preset", "scenes-maskrcnn-demo", "--data", str(scenes),
                "--out", str(out), "--progress", "none", "--set", "epochs=2", "batch_size=2", "workers=0",
                "min_sizes=[48]", "max_size=48", "threads=1", "time_limit_min=null", "eval_batch_size=2",
                "log_interval=1"]

    assert main(args(tmp_path / "whole")) == 0
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_signal(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # seen by the next iteration's check, which saves iteration 3 of 6 and exits
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    assert main(args(tmp_path / "cut")) == 130
    assert "stopped at iteration 3/6" in capsys.readouterr().out
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert main(args(tmp_path / "cut")) == 0
    _assert_same_weights(tmp_path / "whole", tmp_path / "cut")


def test_batch_larger_than_the_training_set_is_a_clear_error(scenes, tmp_path, capsys):
    assert main(_args(scenes, tmp_path / "run", 3, "batch_size=8")) == 2
    assert "fewer than one batch of 8 per process" in capsys.readouterr().err


def test_segmentation_batch_of_one_is_a_clear_error(scenes, tmp_path, capsys):
    # one image per process leaves the pooled 1x1 BatchNorm of the heads a single value per channel (was
    # PyTorch's "Expected more than 1 value per channel when training" from inside the forward)
    assert main(_args(scenes, tmp_path / "run", 3, "batch_size=1")) == 2
    err = capsys.readouterr().err
    assert "needs at least 2" in err and "set batch_size to at least 2" in err
    assert not (tmp_path / "run" / "ckpt").exists()  # stopped before training
