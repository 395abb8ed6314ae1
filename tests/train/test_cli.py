"""`davit eval` / `davit predict` on what `davit train` leaves behind: output folders of runs, run folders on
image-folder data, training checkpoints (with EMA), and the results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from davit.cli import main
from davit.train.trainer import train


@pytest.fixture
def folder_run(tmp_path, tiny_cfg):
    """A finished tiny run (with EMA) on a 3-class image folder, in a folder the trainer names under runs/."""
    from davit.data import make_image_folder

    root = make_image_folder(str(tmp_path / "imgs"), per_class=4, size=(20, 20))
    over = dict(dataset="folder", data_dir=root, num_classes=None, in_chans=3, train_samples=None)
    over.update(val_samples=None, batch_size=4, epochs=1, warmup_epochs=0, model_ema=True)
    res = train(tiny_cfg(**over))
    return Path(res["run_dir"]), res


def _eval(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["eval", *args, "-j", "0", "-b", "4"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_eval_takes_the_runs_dataset_and_an_output_folder(folder_run, tmp_path, capsys):
    """The README's pair `davit train --output runs/x` + `davit eval runs/x`: the newest run inside is used
    (with a note), and evaluated on the run's own image folder, not Fashion-MNIST."""
    run, res = folder_run
    out_json = tmp_path / "ev.json"
    rc, out, err = _eval([str(run.parent), "--results-file", str(out_json)], capsys)
    assert rc == 0, out + err
    assert f"using its run {run.name}" in err
    assert "on folder/val (12 images)" in out
    assert "glibc malloc:" in out  # CPU: the allocator setting, as training prints it (davit.alloc)
    ev = json.loads(out_json.read_text())
    assert ev["top1"] == pytest.approx(res["top1"]) and ev["confusion"] == res["confusion"]
    assert ev["classes"] == ["cat", "dog", "fish"]
    img = str(run.parents[1] / "imgs/val/cat/cat_0000.png")
    assert main(["predict", img, "--checkpoint", str(run.parent)]) == 0


def test_eval_tta_flip_scores_each_image_with_its_mirror(folder_run, tmp_path, capsys):
    run, _ = folder_run
    results = {}
    for name, extra in {"plain": [], "flip": ["--tta-flip"]}.items():
        f = tmp_path / f"{name}.json"
        # --json: the alias `davit bench` and `davit predict` users reach for, same as --results-file
        rc, out, err = _eval([str(run), "--json" if extra else "--results-file", str(f), *extra], capsys)
        assert rc == 0, out + err
        assert ("(flip TTA)" in out) == bool(extra)
        results[name] = json.loads(f.read_text())
    assert results["flip"]["tta_flip"] and not results["plain"]["tta_flip"]
    assert results["flip"]["count"] == results["plain"]["count"] == 12
    # random colour images are not mirror-symmetric: the averaged logits give another loss
    assert results["flip"]["loss"] != pytest.approx(results["plain"]["loss"], rel=1e-6)


def test_eval_refuses_a_dataset_with_other_classes(folder_run, capsys):
    run, _ = folder_run
    rc, out, err = _eval([str(run), "--dataset", "fashion-mnist"], capsys)
    assert rc == 2
    assert "3-class model but fashion-mnist/val" in err and "has 10 classes" in err and "--dataset" in err


def test_eval_and_predict_take_training_checkpoints(folder_run, tmp_path, capsys):
    """ckpt-*.pt and best.pt are rebuilt from the run config inside them; --use-ema takes their EMA weights:
    the same results as the run's final model.safetensors / model_ema.safetensors (1 epoch: same weights)."""
    run, _ = folder_run
    (best,) = run.glob("checkpoints/best.pt")
    (last,) = run.glob("checkpoints/ckpt-*.pt")
    results = {}
    for name, args in {
        "final": [str(run)],
        "best": [str(best)],
        "last": [str(last)],
        "final_ema": [str(run), "--use-ema"],
        "best_ema": [str(best), "--use-ema"],
    }.items():
        f = tmp_path / f"{name}.json"
        rc, out, err = _eval([*args, "--results-file", str(f)], capsys)
        assert rc == 0, out + err
        results[name] = json.loads(f.read_text())
    for name in ("best", "last"):
        assert results[name]["confusion"] == results["final"]["confusion"]
        assert results[name]["loss"] == pytest.approx(results["final"]["loss"], rel=1e-6)
        assert results[name]["classes"] == ["cat", "dog", "fish"]
    assert results["best_ema"]["loss"] == pytest.approx(results["final_ema"]["loss"], rel=1e-6)
    assert results["best_ema"]["loss"] != pytest.approx(results["final"]["loss"], rel=1e-6)
    img = str(run.parents[1] / "imgs/val/dog/dog_0000.png")
    assert main(["predict", img, "--checkpoint", str(best), "--json", "-k", "3", "--use-ema"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert sorted(t["class"] for t in pred[0]["top_k"]) == ["cat", "dog", "fish"]


def test_use_ema_on_a_checkpoint_without_ema_is_refused(tiny_cfg, capsys):
    res = train(tiny_cfg(experiment="noema", epochs=1))
    best = Path(res["run_dir"]) / "checkpoints/best.pt"
    rc, out, err = _eval([str(best), "--use-ema", "--num-samples", "8"], capsys)
    assert rc == 2 and "holds no EMA weights" in err


def test_results_file_is_json_with_null_for_classes_without_images(folder_run, tmp_path, capsys):
    run, _ = folder_run
    f = tmp_path / "few.json"
    data = ["--dataset", "folder", "--data-dir", str(run.parents[1] / "imgs"), "--num-samples", "4"]
    rc, out, err = _eval([str(run), *data, "--results-file", str(f)], capsys)  # cat images only
    assert rc == 0, out + err

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    ev = json.loads(f.read_text(), parse_constant=refuse)
    assert ev["per_class_acc"][1:] == [None, None] and isinstance(ev["per_class_acc"][0], float)


@pytest.mark.parametrize("cmd", [["eval"], ["predict", "--checkpoint"]])
def test_a_missing_checkpoint_is_named_as_missing(cmd, tmp_path, capsys):
    # not "does not say which model it holds", which sent users looking for a --model flag
    gone = tmp_path / "no-such-run"
    rc = main([*cmd, str(gone), *(["x.png"] if cmd[0] == "predict" else [])])
    err = capsys.readouterr().err
    assert rc == 2 and f"{gone} not found" in err and "which model" not in err, err
