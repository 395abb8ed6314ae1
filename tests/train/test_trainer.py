"""End-to-end runs of the trainer on a tiny model and 64 Fashion-MNIST images (a few seconds each)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from davit.train.checkpoint import find_latest_valid, load_checkpoint
from davit.train.config import resolve_config
from davit.train.logging import read_metrics
from davit.train.trainer import NonFiniteLossError, train


def _step_losses(run_dir):
    return [
        (r["step"], r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"
    ]


def test_run_writes_everything_and_config_round_trips(tiny_cfg):
    cfg = tiny_cfg(experiment="full", epochs=1)
    res = train(cfg)
    d = Path(res["run_dir"])
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "confusion.png",
        "report.md",
        "model.safetensors",
    ):
        assert (d / f).is_file(), f
    assert find_latest_valid(d / "checkpoints") is not None
    # the saved config repeats the run's settings (in a new run folder: the folder's name is not carried)
    assert resolve_config(None, str(d / "config.yaml")) == dataclasses.replace(cfg, experiment=None)
    assert 0 <= res["top1"] <= 100 and len(res["per_class_acc"]) == 10
    assert sum(map(sum, res["confusion"])) == 32


@pytest.mark.slow
def test_exact_resume_gives_identical_losses(tiny_cfg):
    # drop path (torch RNG) and mixup (numpy RNG in the collate) are on, so any lost RNG state would show
    common = dict(epochs=2, mixup=0.8, cutmix=1.0, checkpoint_every_steps=None)
    full = train(tiny_cfg(experiment="a", **common))
    part = train(tiny_cfg(experiment="b", max_steps=3, **common))  # stops mid-epoch 1 with a checkpoint
    assert part["stopped"] and part["step"] == 3
    resumed = train(tiny_cfg(experiment="b", resume="auto", **common))
    a, b = _step_losses(full["run_dir"]), _step_losses(resumed["run_dir"])
    assert len(a) == 8 and [s for s, _ in b] == [s for s, _ in a]
    assert b == a  # exactly equal, step for step, before and after the interruption
    assert resumed["top1"] == full["top1"]


def test_each_step_checkpoint_written_once(tiny_cfg, monkeypatch):
    """With the interval dividing the epoch, the epoch's last step is saved once, after its evaluation (a
    second write of the same file could leave it damaged if killed between data and checksum)."""
    import davit.train.checkpoint as ck

    real, writes = ck.save_checkpoint, []
    monkeypatch.setattr(
        ck, "save_checkpoint", lambda st, p: writes.append((Path(p).name, st["epoch"])) or real(st, p)
    )
    train(tiny_cfg(experiment="once", epochs=2, checkpoint_every_steps=2, keep_last=10))
    steps = [n for n, _ in writes if n.startswith("ckpt-")]
    assert steps == [f"ckpt-{s:09d}.pt" for s in (2, 4, 6, 8)], writes  # 4 steps per epoch
    assert ("ckpt-000000004.pt", 1) in writes and ("ckpt-000000008.pt", 2) in writes  # the post-eval saves


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, monkeypatch):
    import davit.train.trainer as tr

    real = tr.build_model
    calls = {"n": 0}

    def poisoned(*a, **k):
        m = real(*a, **k)
        fwd = m.forward

        def forward(x):
            out = fwd(x)
            if m.training:
                calls["n"] += 1
                if calls["n"] == 5:  # the 5th training step goes wrong
                    return out * float("nan")
            return out

        m.forward = forward
        return m

    monkeypatch.setattr(tr, "build_model", poisoned)
    cfg = tiny_cfg(experiment="nan", checkpoint_every_steps=2)
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan .*step 5.*last good checkpoint is .*ckpt-000000004"
    ):
        train(cfg)
    d = Path(cfg.output) / "nan" / "checkpoints"
    last = find_latest_valid(d)
    assert last.name == "ckpt-000000004.pt"
    st = load_checkpoint(last)
    assert st["step"] == 4 and all(torch.isfinite(v).all() for v in st["model"].values())


def test_skipped_corrupt_images_are_counted(tmp_path, tiny_cfg, capsys):
    from davit.data import make_image_folder

    root = make_image_folder(str(tmp_path / "imgs"), per_class=4, size=(20, 20))
    (tmp_path / "imgs/train/cat/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "imgs/train/dog/empty.jpg").write_bytes(b"")
    cfg = tiny_cfg(
        experiment="bad",
        dataset="folder",
        data_dir=root,
        num_classes=3,
        in_chans=3,
        epochs=1,
        batch_size=14,
        train_samples=None,
        val_samples=None,
        warmup_epochs=0,
    )
    res = train(cfg)
    assert res["skipped_files"] == 2
    ep = [r for r in read_metrics(Path(res["run_dir"]) / "metrics.jsonl") if r["kind"] == "epoch"]
    assert ep[0]["skipped_files"] == 2
    out = capsys.readouterr().out
    assert "2 unreadable files skipped" in out and "broken.png" in out and "empty.jpg" in out
    assert "\nglibc malloc: " in out  # a CPU run sets malloc's thresholds (or says why not): davit.alloc


def test_repeating_a_run_config_starts_a_new_run_folder(tiny_cfg):
    """`--config RUN/config.yaml` repeats the settings in a new run folder, also for a resumed run (whose
    config says `resume: auto`); the first run's metrics and checkpoints are untouched."""
    first = train(tiny_cfg(experiment="first", epochs=1, max_steps=2))  # stopped, then resumed
    first = train(tiny_cfg(experiment="first", epochs=1, resume="auto"))
    d1 = Path(first["run_dir"])
    assert "resume: auto" in (d1 / "config.yaml").read_text()
    saved = [f for f in d1.rglob("*") if f.suffix in (".jsonl", ".pt")]
    before = {f: f.read_bytes() for f in saved}
    again = train(resolve_config(None, str(d1 / "config.yaml")))
    d2 = Path(again["run_dir"])
    assert d2 != d1 and d2.parent == d1.parent
    assert [r["epoch"] for r in read_metrics(d2 / "metrics.jsonl") if r["kind"] == "epoch"] == [0]
    assert again["step"] == 4  # trained from scratch, not resumed from the first run's last checkpoint
    assert [f for f in d1.rglob("*") if f.suffix in (".jsonl", ".pt")] == saved
    assert {f: f.read_bytes() for f in saved} == before


def test_fresh_start_in_a_used_run_folder_sets_its_files_aside(tiny_cfg, capsys):
    """A new run in the folder of an earlier one (same --experiment, no --resume) starts its own
    metrics.jsonl; the earlier run's record, config and weights are moved aside, not appended to or lost."""
    one = train(tiny_cfg(experiment="same", epochs=1))
    d = Path(one["run_dir"])
    old_metrics = (d / "metrics.jsonl").read_text()
    capsys.readouterr()
    two = train(tiny_cfg(experiment="same", epochs=1, seed=4))
    assert Path(two["run_dir"]) == d
    assert [r["epoch"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "epoch"] == [0]
    assert (d / "report.md").read_text().count("| 1 |") == 1
    (aside,) = d.glob("replaced-*")
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    kept = {f.name for f in aside.iterdir()}
    assert kept >= {"checkpoints", "config.yaml", "model.safetensors", "report.md"}
    # the new run's checkpoints alone in checkpoints/: the earlier run's went with its record
    assert load_checkpoint(find_latest_valid(d / "checkpoints"))["config"]["seed"] == 4
    assert load_checkpoint(find_latest_valid(aside / "checkpoints"))["config"]["seed"] != 4
    assert "starting over: moved the files of an earlier run here" in capsys.readouterr().out


def test_exact_resume_after_an_unreadable_batch_was_left_out(tmp_path, tiny_cfg):
    """A batch with no readable image is left out without a step; a checkpoint saved after it must resume
    at the loader's batch, not at steps x accum, or the resumed run repeats a batch."""
    from davit.data import make_image_folder

    root = make_image_folder(str(tmp_path / "imgs"), per_class=3, size=(20, 20))
    (tmp_path / "imgs/train/fish/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    common = dict(dataset="folder", data_dir=root, num_classes=3, in_chans=3, epochs=1, batch_size=1,
                  train_samples=None, val_samples=None, warmup_epochs=0,
                  checkpoint_every_steps=1)  # fmt: skip
    full = train(tiny_cfg(experiment="full", **common))
    a = _step_losses(full["run_dir"])
    assert len(a) == 9  # 10 training files, one unreadable: 9 steps
    for stop in (2, 5, 8):  # stops before and after the left-out batch, then resume
        part = train(tiny_cfg(experiment=f"s{stop}", max_steps=stop, **common))
        assert part["stopped"] and part["step"] == stop
        resumed = train(tiny_cfg(experiment=f"s{stop}", resume="auto", **common))
        assert _step_losses(resumed["run_dir"]) == a, stop


def test_unreadable_validation_files_are_reported(tmp_path, tiny_cfg, capsys):
    """Unreadable validation images are counted and named in the epoch line and metrics, as training ones."""
    from davit.data import make_image_folder

    root = make_image_folder(str(tmp_path / "imgs"), per_class=4, size=(20, 20))
    (tmp_path / "imgs/val/fish/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = tiny_cfg(
        experiment="badval",
        dataset="folder",
        data_dir=root,
        num_classes=3,
        in_chans=3,
        epochs=1,
        batch_size=4,
        train_samples=None,
        val_samples=None,
        warmup_epochs=0,
    )
    res = train(cfg)
    ep = [r for r in read_metrics(Path(res["run_dir"]) / "metrics.jsonl") if r["kind"] == "epoch"]
    assert ep[0]["skipped_files"] == 0 and ep[0]["val_skipped_files"] == 1
    assert res["val_skipped_files"] == 1 and sum(map(sum, res["confusion"])) == 12
    out = capsys.readouterr().out
    assert "epoch 1: validation: 1 unreadable files skipped: fish/broken.png" in out


def test_eval_and_predict_commands(tiny_cfg, tmp_path, capsys):
    from PIL import Image

    from davit.cli import main
    from davit.data import FashionMNIST

    res = train(tiny_cfg(experiment="ev", epochs=1))
    d = res["run_dir"]
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    # the same 32 images as the trainer's validation: the metrics must agree exactly
    assert (
        main(["eval", d, "--results-file", str(out_json), "-j", "0", "-b", "8", "--num-samples", "32"]) == 0
    )
    ev = json.loads(out_json.read_text())
    assert ev["top1"] == pytest.approx(res["top1"]) and ev["confusion"] == res["confusion"]
    assert ev["crop_pct"] == 1.0 and ev["interpolation"] == "bicubic"

    ds = FashionMNIST(split="val")
    imgs = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(ds.data[i]).save(p)
        imgs.append(str(p))
    capsys.readouterr()
    assert main(["predict", *imgs, "--checkpoint", d, "--json", "-k", "3"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in pred] == imgs
    for p in pred:
        probs = [t["prob"] for t in p["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(t["class"] in ds.classes and 0 <= t["index"] < 10 for t in p["top_k"])
    assert main(["predict", imgs[0], "--checkpoint", d]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{imgs[0]}:") and text.count("%") == 5


def test_fp16_on_cpu_is_clear_error(tiny_cfg):
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        train(tiny_cfg(experiment="fp16", amp=True, amp_dtype="float16"))


@pytest.mark.parametrize(
    "key,flag", [("batch_size", "--batch-size"), ("validation_batch_size", "--validation-batch-size")]
)
def test_batch_sizes_below_one_are_clear_errors(tiny_cfg, key, flag):
    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        train(tiny_cfg(experiment="b0", **{key: 0}))


def test_bf16_grad_accum_and_ema_run(tiny_cfg):
    res = train(
        tiny_cfg(
            experiment="bf16", amp=True, grad_accum_steps=2, model_ema=True, model_ema_decay=0.5, epochs=1
        )
    )
    assert math.isfinite(res["train_loss"]) and "ema_top1" in res
    assert (Path(res["run_dir"]) / "model_ema.safetensors").is_file()


def test_channels_last_trains_like_the_default_layout(tiny_cfg):
    """--channels-last changes the memory layout only: the same losses step for step (float tolerance)."""
    ref = train(tiny_cfg(experiment="nchw", epochs=1, max_steps=2))
    cl = train(tiny_cfg(experiment="nhwc", epochs=1, max_steps=2, channels_last=True))
    a, b = _step_losses(ref["run_dir"]), _step_losses(cl["run_dir"])
    assert len(a) == 2 and [s for s, _ in b] == [s for s, _ in a]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4)


def test_torchcompile_trains_and_saves_plain_weights(tiny_cfg, monkeypatch):
    """--torchcompile: a compiled model trains (2 steps) and the saved weights load into a plain model.

    The wiring is what is tested here, so dynamo runs with its "eager" backend: inductor's code generation
    for forward + backward took ~6 minutes of a cold 2-core CI machine, and after other tests had compiled
    the same functions at other shapes, dynamo's automatic dynamic shapes made inductor fail (a sympy
    relational in its stride ordering). The model's own compile (fullgraph, new sizes) is tested in
    tests/test_models.py."""

    from davit.train.setup import model_from_metadata

    torch._dynamo.reset()  # independent of what earlier tests compiled
    seen, compile_ = {}, torch.compile

    def eager_backend(model, **kw):
        seen.update(kw)  # what the trainer asked inductor for: options are inductor's, dropped here
        return compile_(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_backend)
    try:
        res = train(tiny_cfg(experiment="compiled", epochs=1, max_steps=2, torchcompile=True))
    finally:
        torch._dynamo.reset()
    # on CPU without inductor's layout optimisation (see davit.train.trainer.compile_options)
    seen["options"].pop("post_grad_custom_post_pass")  # davit.compile_cache's
    assert seen == {"options": {"layout_optimization": False}}
    ref = train(tiny_cfg(experiment="eager", epochs=1, max_steps=2))
    a, b = _step_losses(ref["run_dir"]), _step_losses(res["run_dir"])
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-3)
    ckpt = find_latest_valid(Path(res["run_dir"]) / "checkpoints")
    assert not any("_orig_mod" in k for k in load_checkpoint(ckpt)["model"])
    net, _ = model_from_metadata(str(ckpt))
    assert net.num_classes == 10


def test_time_budget_picks_epochs_and_config_repeats_them(tiny_cfg, capsys):
    import yaml

    res = train(tiny_cfg(experiment="budget", epochs=50, time_budget=1.0))  # 1 s: only the minimum fits
    assert res["epoch"] == 0 and res["step"] == 1  # one step of one epoch, not 50 epochs
    assert "time budget 1s" in capsys.readouterr().out
    saved = yaml.safe_load((Path(res["run_dir"]) / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["max_epoch_steps"] == 1 and saved["time_budget"] is None
    assert saved["_resolved"]["time_budget"] == 1.0


def test_time_budget_deadline_ends_training_but_still_evaluates_and_saves(tiny_cfg, capsys, monkeypatch):
    # the machine slows down after the plan was made: past the deadline no further step starts, the last
    # evaluation and the weights are still written
    import davit.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "_epochs_for_budget", lambda *a, **k: (3, None, 0.0))  # deadline passed
    res = train(tiny_cfg(experiment="deadline", epochs=50, time_budget=60.0))
    out = capsys.readouterr().out
    assert res["step"] == 1 and res["epoch"] == 0 and not res["stopped"]
    assert "time budget reached: training ended at step 1 of the planned" in out
    assert math.isfinite(res["top1"]) and (Path(res["run_dir"]) / "model.safetensors").is_file()


@pytest.mark.slow
def test_budget_run_replans_from_measured_speed_and_config_repeats_it(tiny_cfg, capsys, monkeypatch):
    """A budget run plans from a few timed steps, then at each epoch end re-plans the rest from the speed
    it measured; the lr schedule's rest is stretched over the new plan, and config.yaml (and a resume from a
    checkpoint after the re-plan) repeat the re-planned run step for step."""
    import time

    import yaml

    import davit.train.trainer as trainer_mod

    def budget_run(experiment, **over):
        # the start plan: 2 epochs of 1 step (of 4); the epoch ends measure room for 3 more epochs of 2
        plans = iter([(3, 2), (2, 2), (1, 2)])
        monkeypatch.setattr(trainer_mod, "_epochs_for_budget", lambda *a, **k: (2, 1, time.time() + 600))
        monkeypatch.setattr(trainer_mod, "budget_plan", lambda *a, **k: next(plans))
        return train(tiny_cfg(experiment=experiment, epochs=50, time_budget=600.0, **over))

    res = budget_run("replan")
    out = capsys.readouterr().out
    assert "re-planned from this epoch's speed" in out and "6 steps left in 3 epoch(s) (was 1)" in out
    assert res["step"] == 1 + 3 * 2 and res["epoch"] == 3  # 4 epochs: 1 step, then 3 x 2
    saved = yaml.safe_load((Path(res["run_dir"]) / "config.yaml").read_text())
    assert saved["replans"] == [[1, 1, 4, 2]] and saved["epochs"] == 2 and saved["max_epoch_steps"] == 1
    recs = [r for r in read_metrics(Path(res["run_dir"]) / "metrics.jsonl") if r["kind"] == "train"]
    lrs = [r["lr"] for r in recs]
    assert lrs[-1] == pytest.approx(1e-5) and min(lrs[:-1]) > 1e-5  # the cosine ends at the new last step
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # past the warm-up: no jump up at the re-plan

    # repeated from its config.yaml (no budget, no timing): the same steps, lrs and losses
    monkeypatch.undo()
    again = train(resolve_config(None, str(Path(res["run_dir"]) / "config.yaml"), {"experiment": "again"}))
    assert _step_losses(again["run_dir"]) == _step_losses(res["run_dir"])
    again_recs = read_metrics(Path(again["run_dir"]) / "metrics.jsonl")
    assert [r["lr"] for r in again_recs if r["kind"] == "train"] == lrs

    # a budget run stopped after its re-plan (mid epoch 3) resumes on the re-planned schedule
    part = budget_run("part", max_steps=5)
    assert part["stopped"] and part["step"] == 5
    monkeypatch.undo()
    resumed = train(tiny_cfg(experiment="part", epochs=50, time_budget=600.0, resume="auto"))
    assert _step_losses(resumed["run_dir"]) == _step_losses(res["run_dir"])


def test_budget_plan_fills_the_budget():
    from davit.train.trainer import budget_plan

    # 560 s, 0.2 s/step, 10 s evaluation, 937 steps (197 s) per epoch: 2.8 epochs' worth -> 3 capped epochs
    epochs, cap = budget_plan(560, 0.2, 10, 937)
    assert (epochs, cap) == (3, 883)
    assert epochs * (cap * 0.2 + 10) <= 560 < epochs * ((cap + 1) * 0.2 + 10)
    assert budget_plan(1000, 0.2, 10, 937) == (6, 783)
    assert budget_plan(2 * 200.0, 0.2, 0.0, 1000) == (2, None)  # two whole epochs fit exactly: no cap
    assert budget_plan(-5, 0.2, 10, 937) == (1, 1)  # nothing fits: the minimum, one step


def test_a_step_failing_after_sigterm_is_reported_as_the_signal(tiny_cfg, monkeypatch):
    """SIGTERM/SIGINT reach the process group: a helper of the step (torch.compile's C++ compiler) dies with
    them and the step fails with its error. The run says it was stopped by the signal, in a few lines (not the
    compiler's thousand), and keeps the checkpoints saved before."""
    import signal

    import davit.train.trainer as tr

    real = tr.build_model
    calls = {"n": 0, "signal": True}

    def interrupted(*a, **k):
        m = real(*a, **k)
        fwd = m.forward

        def forward(x):
            if m.training:
                calls["n"] += 1
                if calls["n"] == 5:
                    if calls["signal"]:
                        signal.raise_signal(signal.SIGTERM)  # the trainer's handler sets its stop flag
                    raise RuntimeError("C++ compile error\n" + "warning: overflow in conversion\n" * 1000)
            return fwd(x)

        m.forward = forward
        return m

    monkeypatch.setattr(tr, "build_model", interrupted)
    cfg = tiny_cfg(experiment="sig", checkpoint_every_steps=2)
    with pytest.raises(RuntimeError) as info:
        train(cfg)
    msg = str(info.value)
    assert msg.startswith("stopped by SIGTERM in the middle of a step")
    assert "RuntimeError (C++ compile error)" in msg
    assert "resume with --resume auto --experiment sig" in msg and "warning" not in msg and len(msg) < 600
    last = find_latest_valid(Path(cfg.output) / "sig" / "checkpoints")
    assert last.name == "ckpt-000000004.pt" and load_checkpoint(last)["step"] == 4
    # without a signal the same error is the step's own, unchanged
    calls.update(n=0, signal=False)
    with pytest.raises(RuntimeError, match=r"^C\+\+ compile error"):
        train(tiny_cfg(experiment="plain"))
