"""ONNX export: dynamic batch round trip against PyTorch with onnxruntime, odd sizes that need padding."""

from __future__ import annotations

import json

import pytest

from davit import create_model
from davit.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from davit.export import export_onnx, min_dynamic_size, verify_onnx  # noqa: E402


def test_round_trip_dynamic_batch(tmp_path):
    model = create_model("davit_atto", num_classes=10).eval()
    path = export_onnx(model, tmp_path / "atto.onnx", img_size=32)
    (inp,) = onnx.load(str(path)).graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    # traced at batch 2; run at two other batch sizes
    assert verify_onnx(model, path, 32, batch_sizes=(1, 5)) <= 1e-4


@pytest.mark.slow
def test_round_trip_dynamic_batch_and_image_size(tmp_path):
    # torch.export sees the symbolic-size path (windows gathered by computed indices, no padding branch), so
    # one ONNX graph serves sizes whose stage maps need padding or not, odd or even, square or not
    model = create_model("davit_atto", num_classes=10).eval()
    path = export_onnx(model, tmp_path / "atto.onnx", img_size=(64, 80), exporter="dynamo", dynamic_size=True)
    (inp,) = onnx.load(str(path)).graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))
    lo = min_dynamic_size(model)
    assert lo == 17  # davit_atto reduces by 16 (stem stride 2, three downsamplings)
    sizes = [(64, 80), (56, 56), (50, 50), (97, 33), (lo, 224)]
    assert verify_onnx(model, path, sizes, batch_sizes=(1, 3)) <= 1e-4


def test_dynamic_size_needs_the_dynamo_exporter(tmp_path, capsys):
    model = create_model("davit_atto").eval()
    with pytest.raises(ValueError, match="needs the 'dynamo' exporter"):
        export_onnx(model, tmp_path / "a.onnx", img_size=32, dynamic_size=True)
    with pytest.raises(ValueError, match="at least 17 px"):
        export_onnx(model, tmp_path / "a.onnx", img_size=16, exporter="dynamo", dynamic_size=True)
    rc = main(["export", "--model", "davit_atto", "--dynamic-size", "--out", str(tmp_path / "b.onnx")])
    assert rc != 0 and "--dynamic-size needs --exporter dynamo" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_cli_export_odd_size_needing_padding(tmp_path, capsys):
    # 45 px: the stem pads 45 -> 46, and every stage pads its map to a multiple of the 7x7 window
    out = tmp_path / "odd.onnx"
    rc = main(["export", "--model", "davit_atto", "--img-size", "45", "--format", "onnx", "--out", str(out)])
    assert rc == 0 and out.is_file()
    text = capsys.readouterr().out
    # the command itself compared onnxruntime with PyTorch at batch 1 and 3 and fails above --atol 1e-4
    assert "max abs diff" in text


def test_cli_export_missing_checkpoint_is_clear(tmp_path, capsys):
    rc = main(
        [
            "export",
            "--model",
            "davit_atto",
            "--checkpoint",
            str(tmp_path / "nope.safetensors"),
            "--out",
            str(tmp_path / "x.onnx"),
        ]
    )
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [(["--atol", "-1"], "--atol must be >= 0"), (["--in-chans", "0"], "in_chans must be >= 1")],
)
def test_cli_export_bad_arguments_are_clear(tmp_path, capsys, extra, message):
    out = tmp_path / "x.onnx"
    assert main(["export", "--model", "davit_atto", "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_export_to_a_folder_is_refused_before_exporting(tmp_path, capsys):
    assert main(["export", "--model", "davit_atto", "--out", str(tmp_path)]) == 2
    assert "is a folder: name the file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a folder"):  # the library function checks too
        export_onnx(create_model("davit_atto"), tmp_path, 32)
    assert list(tmp_path.iterdir()) == []


def test_bench_onnxruntime_backend(tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "ort.json"
    args = "bench --model davit_atto --backend onnxruntime --img-size 16 -b 2 --device cpu --repeats 1"
    assert main(f"{args} --warmup 1 --threads 1 --peak-n 128 --json {out}".split()) == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["flavour"] == "onnxruntime" and res["img_per_s"] > 0 and res["peak_mem_mb"] is None
    assert list(scratch.iterdir()) == []  # the exported model is not left behind


def test_a_zero_image_size_is_refused_not_read_as_the_default(tmp_path, capsys):
    from davit.cli import main

    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", "davit_atto", "--img-size", "0", "--out", str(out)])
    assert e.value.code == 2 and "--img-size: must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()
