import json
import re

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from davit.cli import main
from davit.data.loader import EpochSampler, SeededDataset
from davit.tasks.cli import _print_scores
from davit.tasks.config import PRESETS, TaskConfig, parse_set, resolve_task_config
from davit.tasks.engine import _batches, _EndBatchRNG, _write_report, lr_factor


def test_presets_follow_the_official_recipes():
    c = resolve_task_config("detect", "coco-maskrcnn-1x")
    assert (c.lr, c.weight_decay, c.batch_size, c.epochs, c.lr_steps, c.warmup_iters) == (1e-4, 0.05, 16, 12,
                                                                                           [8, 11], 500)
    assert (c.drop_path_rate, c.min_sizes[0], c.min_sizes[-1], c.max_size, c.fpn_channels) == (0.1, 480, 800,
                                                                                               1333, 256)
    c3 = resolve_task_config("detect", "coco-maskrcnn-3x")
    assert (c3.epochs, c3.lr_steps, c3.drop_path_rate) == (36, [27, 33], 0.2)
    s = resolve_task_config("segment", "ade20k-upernet-160k")
    assert (s.lr, s.weight_decay, s.schedule, s.warmup_iters, s.iters, s.batch_size) == (6e-5, 0.01, "poly",
                                                                                        1500, 160_000, 16)
    assert (s.crop_size, s.ratio_range, s.drop_path_rate, s.channels, s.aux_weight) == (512, [0.5, 2.0], 0.3,
                                                                                        512, 0.4)
    assert s.num_classes == 150 and s.reduce_zero_label
    # official mmdet/mmseg configs: weight decay on every parameter, 1000 RPN proposals per image in training,
    # the resize-and-crop policy for half the images; the test resize to (2048, 512)
    assert c.decay_1d_params and c3.decay_1d_params and s.decay_1d_params
    assert (c.crop_prob, c.crop_short_sides, c.crop_size_range, c.rpn_post_nms_top_n_train) == (
        0.5, [400, 500, 600], [384, 600], 1000)  # fmt: skip
    assert s.test_resize and s.scale == [2048, 512] and s.test_scales == [1.0]
    assert set(PRESETS) >= {"coco-maskrcnn-1x", "coco-maskrcnn-3x", "ade20k-upernet-160k"}


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown option"):
        resolve_task_config("detect", "coco-maskrcnn-1x", overrides={"learning_rate": 1})
    with pytest.raises(ValueError, match="Did you mean 'channels' for 'chanels'"):
        resolve_task_config("segment", "scenes-upernet-demo", overrides={"chanels": 48})
    with pytest.raises(ValueError, match="task 'segment'"):
        resolve_task_config("detect", "ade20k-upernet-160k")
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_task_config("detect", "coco-1x")


@pytest.mark.parametrize(
    "task, preset, over, message",
    [
        ("segment", "scenes-upernet-demo", {"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ("detect", "scenes-maskrcnn-demo", {"epochs": -1}, "epochs must be > 0, got -1.0"),
        ("detect", "scenes-maskrcnn-demo", {"lr": 0}, "lr must be > 0, got 0.0"),
        ("segment", "scenes-upernet-demo", {"time_limit_min": 0}, "time_limit_min must be > 0"),
        ("segment", "scenes-upernet-demo", {"test_scales": []}, "test_scales must be a non-empty list"),
        ("segment", "scenes-upernet-demo", {"ratio_range": [2, 1]}, "low <= high"),
        ("detect", "scenes-maskrcnn-demo", {"min_sizes": [96, -1]}, "min_sizes must be a non-empty list"),
    ],
)
def test_values_no_run_can_use_are_refused_by_name(task, preset, over, message):
    # before, a demo with epochs=-1 trained nothing, evaluated and wrote over its run folder
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_task_config(task, preset, overrides=over)
    resolve_task_config(task, preset, overrides={"warmup_iters": 0, "workers": 0, "eval_interval": 0})


def test_set_values_are_typed_like_the_config():
    # `--set lr=2e-3`: PyYAML reads the exponent without a dot as a string; it must still be the number
    c = resolve_task_config("segment", "scenes-upernet-demo", overrides=parse_set(["lr=3e-3", "iters=10"]))
    assert c.lr == 3e-3 and isinstance(c.lr, float) and c.iters == 10
    with pytest.raises(ValueError, match=r"'batch_size' has the wrong type.*expected int"):
        resolve_task_config("segment", "scenes-upernet-demo", overrides=parse_set(["batch_size=eight"]))
    with pytest.raises(ValueError, match=r"'lr' has the wrong type"):
        resolve_task_config("segment", "scenes-upernet-demo", overrides=parse_set(["lr=fast"]))


def test_lr_schedules():
    det = TaskConfig(task="detect", epochs=12, lr_steps=[8, 11], warmup_iters=500, warmup_ratio=0.001)
    assert lr_factor(det, 0, 0.0) == pytest.approx(0.001)  # warmup starts at ratio
    assert lr_factor(det, 250, 0.01) == pytest.approx(0.001 + 0.5 * 0.999)
    assert lr_factor(det, 1000, 7.9 / 12) == 1.0
    assert lr_factor(det, 10**5, 8 / 12) == pytest.approx(0.1)  # first step at epoch 8
    assert lr_factor(det, 10**5, 11.5 / 12) == pytest.approx(0.01)
    seg = TaskConfig(task="segment", iters=1000, schedule="poly", lr=1e-4, min_lr=0.0, warmup_iters=0)
    assert lr_factor(seg, 500, 0.5) == pytest.approx(0.5)
    assert lr_factor(seg, 1000, 1.0) == 0.0


@pytest.mark.slow
def test_segment_train_eval_predict_cli(scenes, tmp_path, capsys):
    """A 3-iteration run through the CLI: run folder contents, resume, eval and predict."""
    run = tmp_path / "run"
    args = ["segment", "train", "--preset", "scenes-upernet-demo", "--data", str(scenes), "--out", str(run),
            "--progress", "none", "--set", "iters=3", "batch_size=2", "workers=0", "crop_size=64",
            "scale=[64,64]", "channels=16", "aux_channels=8", "log_interval=1", "eval_batch_size=4",
            "backbone_kwargs={stem_stride: 4}"]
    assert main(args) == 0
    for f in ("config.json", "metrics.jsonl", "model.safetensors", "report.md"):
        assert (run / f).is_file(), f
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3]
    assert 0.0 <= [r for r in recs if r["kind"] == "val"][-1]["mIoU"] <= 1.0
    assert "| mIoU |" in (run / "report.md").read_text()
    assert main(args) == 0  # resumes at the end: no more training records
    out = capsys.readouterr().out
    assert "resumed from" in out and "glibc malloc: " in out  # CPU training sets malloc's thresholds
    assert main(["segment", "eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "glibc malloc:" in out
    # test-time overrides go through the same type checks as training (a bad value is exit 2, not a traceback)
    assert main(["segment", "eval", str(run), "--set", "test_flip=true", "test_scales=[0.5,1.0]"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["segment", "eval", str(run), "--set", "eval_batch_size=four"]) == 2
    assert "'eval_batch_size' has the wrong type" in capsys.readouterr().err
    assert main(["segment", "eval", str(run), "--device", "cpu"]) == 0
    if not torch.cuda.is_available():  # asking for a GPU that is not there: one clear line, exit 2
        assert main(["segment", "eval", str(run), "--device", "cuda"]) == 2
        assert "no CUDA GPU is available; use --device cpu" in capsys.readouterr().err
    val = str(scenes / "images" / "val")
    assert main(["segment", "predict", str(run), val, "--out", str(tmp_path / "p")]) == 0
    assert len(list((tmp_path / "p").glob("*.png"))) == 4


def test_start_over_sets_the_earlier_run_aside_and_resume_continues_the_new_one(scenes, tmp_path, capsys):
    """`--no-resume` (and every demo) in a used folder: the earlier run's higher-step checkpoints must not
    survive the new run's pruning, or the next resume continues the earlier run."""
    run = tmp_path / "run"

    def train(iters, *flags, extra=()):
        return main(["segment", "train", "--preset", "scenes-upernet-demo", "--data", str(scenes), "--out",
                     str(run), "--progress", "none", *flags, "--set", "batch_size=2", "workers=0",
                     "crop_size=64", "scale=[64,64]", "channels=8", "aux_channels=8", "threads=1",
                     "time_limit_min=null", "eval_interval=1", "keep_checkpoints=1",
                     "backbone_kwargs={stem_stride: 4}", f"iters={iters}", *extra])  # fmt: skip

    assert train(4) == 0
    assert train(2, "--no-resume") == 0
    out = capsys.readouterr().out
    assert "starting over: moved the checkpoints of an earlier run" in out
    (aside,) = (run / "ckpt").glob("replaced-*")
    assert (aside / "ckpt-000000004.pt").is_file()
    assert sorted(p.name for p in (run / "ckpt").glob("ckpt-*.pt")) == ["ckpt-000000002.pt"]
    assert train(3) == 0  # resumes the new run (iteration 2), not the earlier one (4)
    assert "at iteration 2/3" in capsys.readouterr().out
    # the demo preset exempts 1-D parameters from decay (two groups): resuming with one group says what to set
    assert train(4, extra=["decay_1d_params=true"]) == 2
    assert "resumes with --set decay_1d_params=false" in capsys.readouterr().err


def _hand_made_run(tmp_path, task, preset, **over):
    """A run folder as `train` writes it (config.json + model.safetensors), without training."""
    from safetensors.torch import save_file

    from davit.tasks.engine import build_model

    cfg = resolve_task_config(task, preset, overrides=dict(num_classes=11, **over))
    run = tmp_path / f"{task}-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file(build_model(cfg, backbone_weights=False).state_dict(), str(run / "model.safetensors"))
    return run


def test_load_run_applies_overrides_to_the_model_and_checks_the_task(tmp_path, capsys):
    from davit.tasks.engine import load_run

    run = _hand_made_run(tmp_path, "detect", "scenes-maskrcnn-demo")
    model, cfg = load_run(run, overrides={"detections_per_img": 1, "min_sizes": [64]})
    assert model.roi_heads.detections_per_img == 1 and model.transform.min_size == (64,)
    assert cfg.detections_per_img == 1
    with pytest.raises(ValueError, match=r"holds a `davit detect` run, not a segment one"):
        load_run(run, task="segment")
    assert main(["segment", "eval", str(run)]) == 2
    assert "use `davit detect eval|predict` on it" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"do not fit the model built from its config with the overrides "
                       r"\['fpn_channels'\]: size mismatch for backbone\.fpn\."):  # fmt: skip
        load_run(run, overrides={"fpn_channels": 32})


def test_run_folders_from_before_test_resize_keep_their_test_scales(tmp_path):
    from davit.tasks.engine import load_run

    run = _hand_made_run(tmp_path, "segment", "scenes-upernet-demo", channels=8, aux_channels=8)
    assert load_run(run)[1].test_resize is True
    raw = json.loads((run / "config.json").read_text())
    del raw["test_resize"]  # as written before the key existed: test_scales were ratios of the image size
    (run / "config.json").write_text(json.dumps(raw))
    assert load_run(run)[1].test_resize is False


def test_detection_refuses_category_ids_beyond_num_classes(scenes, tmp_path, capsys):
    args = ["detect", "train", "--preset", "scenes-maskrcnn-demo", "--data", str(scenes), "--out",
            str(tmp_path / "run"), "--progress", "none", "--set", "num_classes=5", "workers=0"]  # fmt: skip
    assert main(args) == 2
    assert "category ids up to 10, but num_classes is 5" in capsys.readouterr().err


def test_amp_trains_under_bf16_autocast(scenes, tmp_path, monkeypatch):
    """amp=true is bf16 autocast on every device: CUDA's default autocast dtype (fp16) would need a grad
    scaler, which the dense loop does not have."""
    seen, real = [], torch.autocast

    def spy(device_type, *a, **k):
        seen.append((device_type, k.get("dtype"), k.get("enabled", True)))
        return real(device_type, *a, **k)

    monkeypatch.setattr(torch, "autocast", spy)
    args = ["segment", "train", "--preset", "scenes-upernet-demo", "--data", str(scenes), "--out",
            str(tmp_path / "run"), "--progress", "none", "--set", "iters=1", "batch_size=2", "workers=0",
            "crop_size=64", "scale=[64,64]", "channels=8", "aux_channels=8", "amp=true", "threads=1",
            "time_limit_min=null"]  # fmt: skip
    assert main(args) == 0
    assert ("cpu", torch.bfloat16, True) in seen


def test_data_scenes_cli(tmp_path):
    assert main(["data", "scenes", "--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size",
                 "48"]) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["size"] == 48
    # a clear error, no traceback
    assert main(["data", "scenes", "--out", str(tmp_path), "--size", "16"]) == 2


def _coco_scores():
    """Detection scores as evaluate returns them, with pycocotools' -1 for 'no large objects'."""
    s = {f"{p}_{m}": 0.5 for p in ("box", "mask") for m in ("AP", "AP50", "AP75", "APs", "APm")}
    return {**s, "box_APl": -1.0, "mask_APl": -1.0, "box_APm": 0.25, "infer_img_per_s": 3.0}


def test_report_shows_na_for_coco_minus_one(tmp_path):
    cfg = TaskConfig(task="detect", data="scenes")
    _write_report(tmp_path, cfg, _coco_scores(), 5, 10, 60.0, 20, False, [0, 1, 2])
    report = (tmp_path / "report.md").read_text()
    assert "| box_APl | n/a |" in report and "| mask_APl | n/a |" in report
    assert "| box_APm | 0.2500 |" in report and "-1.0" not in report


def test_detect_scores_print_every_coco_metric(capsys):
    _print_scores("detect", _coco_scores())
    out = capsys.readouterr().out
    for p in ("box", "mask"):
        for m in ("AP", "AP50", "AP75", "APs", "APm"):
            assert f"{p}_{m} 0." in out, (p, m)
        assert f"{p}_APl n/a" in out
    assert "-1.0" not in out and out.count("img/s inference") == 1


def test_batches_resume_mid_epoch_with_the_same_samples_and_augmentations():
    class Draw(torch.utils.data.Dataset):  # sample i with one draw from the global RNG ("augmentation")
        def __getitem__(self, i):
            return torch.tensor([float(i), torch.rand(()).item()])

        def __len__(self):
            return 10

    def take(start, n):
        sampler = EpochSampler(10, seed=3, batch_size=2)
        loader = DataLoader(SeededDataset(Draw()), 2, sampler=sampler, drop_last=True,
                            collate_fn=_EndBatchRNG(default_collate), generator=torch.Generator())
        it = _batches(loader, sampler, start)
        return [next(it) for _ in range(n)]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    whole = take(0, 7)  # 5 batches per epoch: an epoch and a bit
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is restored after every batch
    assert sorted(int(i) for b in whole[:5] for i in b[:, 0]) == list(range(10))
    resumed = take(3, 4)  # iteration 3: across the epoch boundary
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[3:]))


def test_an_iteration_failing_after_sigterm_is_reported_as_the_signal(scenes, tmp_path, monkeypatch, capsys):
    """A data-loader worker or compiler stopped by the same SIGTERM makes the iteration fail: the run says it
    was the signal, in a few lines, not the helper's error text."""
    import signal

    import davit.tasks.engine as eng

    real = eng.build_model

    def interrupted(*a, **k):
        m = real(*a, **k)
        fwd, calls = m.forward, {"n": 0}

        def forward(*args, **kw):
            if m.training:
                calls["n"] += 1
                if calls["n"] == 2:
                    signal.raise_signal(signal.SIGTERM)  # the loop's handler sets its stop flag
                    raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Terminated.\n" * 50)
            return fwd(*args, **kw)

        m.forward = forward
        return m

    monkeypatch.setattr(eng, "build_model", interrupted)
    args = ["segment", "train", "--preset", "scenes-upernet-demo", "--data", str(scenes), "--out",
            str(tmp_path / "run"), "--progress", "none", "--set", "iters=4", "batch_size=2", "workers=0",
            "crop_size=64", "scale=[64,64]", "channels=8", "aux_channels=8", "threads=1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: stopped by SIGTERM in the middle of a step" in err
    assert "(DataLoader worker (pid 1234)" in err
    assert "run the same command again (same --out) to resume" in err and err.count("pid 1234") == 1
