import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import davit.tasks.engine as engine
import davit.tasks.predict as predict
from davit.cli import main
from davit.tasks.config import TaskConfig
from davit.tasks.predict import predict_files


class _Detector(nn.Module):
    """Stands in for Mask R-CNN: one fixed detection (or none) per image, whatever the image."""

    def __init__(self, label: int | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))  # predict_files finds the device from the parameters
        self.label = label

    def forward(self, images):
        out = []
        for img in images:
            h, w = img.shape[1:]
            n = 0 if self.label is None else 1
            masks = torch.zeros(n, 1, h, w)
            masks[:, :, 2:10, 2:10] = 1.0
            out.append(
                dict(
                    boxes=torch.tensor([[2.0, 2.0, 10.0, 10.0]] * n).reshape(n, 4),
                    labels=torch.full((n,), self.label or 0, dtype=torch.int64),
                    scores=torch.full((n,), 0.9),
                    masks=masks,
                )
            )
        return out


def _png(path, seed: int, size: int = 24):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return path


def _cfg(**kw) -> TaskConfig:
    return TaskConfig(**{"task": "detect", "num_classes": 3, **kw})


@pytest.fixture
def drawn_text(monkeypatch):
    """The box labels predict_files draws, captured instead of drawn."""
    texts = []

    def spy(image, boxes, labels=None, **kw):
        texts.extend(labels)
        return image

    monkeypatch.setattr(predict, "draw_bounding_boxes", spy)
    return texts


def test_unreadable_files_are_skipped_and_the_rest_written(tmp_path):
    good = _png(tmp_path / "good.png", 0)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(tmp_path / "src" / "t.png", 1, 64).read_bytes()[:200])
    written, skipped = predict_files(_Detector(), _cfg(), [text, good, truncated], tmp_path / "out")
    assert written == [tmp_path / "out" / "good.png"] and written[0].is_file()
    assert [b.path for b in skipped] == [str(text), str(truncated)]
    assert all(b.reason for b in skipped)
    assert not (tmp_path / "out" / "text.png").exists()


def test_predict_cli_reports_skipped_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "load_run", lambda run, device, task=None: (_Detector(), _cfg()))
    good = _png(tmp_path / "good.png", 0)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    assert main(["detect", "predict", "run", str(bad), str(good), "--out", str(out), "--device", "cpu"]) == 1
    cap = capsys.readouterr()
    assert "wrote 1 PNGs" in cap.out and "skipped 1 unreadable file" in cap.out
    assert f"{bad}: skipped, cannot read: UnidentifiedImageError" in cap.err
    assert (out / "good.png").is_file()
    assert main(["detect", "predict", "run", str(good), "--out", str(out), "--device", "cpu"]) == 0


def test_repeated_stems_get_distinct_output_names(tmp_path):
    names = (("x", "a.png"), ("y", "a.png"), (".", "a-2.png"))
    files = [_png(tmp_path / d / n, i) for i, (d, n) in enumerate(names)]
    written, skipped = predict_files(_Detector(), _cfg(), files, tmp_path / "out")
    assert not skipped
    assert [p.name for p in written] == ["a.png", "a-3.png", "a-2.png"]  # a-2 is another input's own name
    # nothing overwritten: each output is its own input (no detections, so the image is drawn unchanged)
    for f, p in zip(files, written):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(f)))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    (written,), _ = predict_files(_Detector(), _cfg(), [tmp_path / "grey16.png"], tmp_path / "out")
    drawn = np.asarray(Image.open(written)).astype(int)
    assert drawn[0, 0].tolist() == [0, 0, 0] and drawn[-1, -1].tolist() == [255, 255, 255]
    np.testing.assert_allclose(drawn[..., 0], np.rint(ramp / 257), atol=1)


def test_detection_labels_use_coco_category_names_by_id(tmp_path, drawn_text):
    texts = drawn_text
    ann = tmp_path / "instances_val.json"
    cats = [dict(id=1, name="person"), dict(id=18, name="dog"), dict(id=90, name="toothbrush")]
    ann.write_text(json.dumps(dict(images=[], annotations=[], categories=cats)))
    img = _png(tmp_path / "a.png", 0)
    cfg = _cfg(num_classes=91, data=None, val_ann=str(ann))
    predict_files(_Detector(label=18), cfg, [img], tmp_path / "out")
    assert texts == ["dog 0.90"]  # id 18, not the 18th category in the list
    # no instances JSON: ids are drawn as numbers
    texts.clear()
    predict_files(_Detector(label=18), _cfg(num_classes=91), [img], tmp_path / "out")
    assert texts == ["18 0.90"]


def test_scenes_meta_names_come_first(scenes, tmp_path, drawn_text):
    cfg = _cfg(num_classes=11, data=str(scenes))
    predict_files(_Detector(label=1), cfg, [_png(tmp_path / "a.png", 0)], tmp_path / "out")
    assert drawn_text == ["T-shirt/top 0.90"]


@pytest.mark.parametrize("bad_json", ["{not json", json.dumps({"images": []})])
def test_broken_instances_json_warns_and_draws_ids(tmp_path, drawn_text, bad_json):
    ann = tmp_path / "ann.json"
    ann.write_text(bad_json)
    img = _png(tmp_path / "a.png", 0)
    with pytest.warns(UserWarning, match="no class names from"):
        predict_files(_Detector(label=2), _cfg(val_ann=str(ann)), [img], tmp_path / "o")
    assert drawn_text == ["2 0.90"]
