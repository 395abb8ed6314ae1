"""davit.viz: hooked attention equals the reference math, forward untouched, Grad-CAM, PNG files, CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import davit
from davit.cli import main as cli_main
from davit.layers.attention import channel_attention_ref, window_attention_ref, window_partition
from davit.viz import (
    attention_hooks,
    capture_attention,
    grad_cam,
    load_image,
    load_model,
    resolve_data_config,
    visualize,
    write_demo_sheets,
)
from davit.viz.draw import CELL, DPI, SHEET_CELL


def atto(**kw) -> davit.DaViT:
    return davit.create_model(
        "davit_atto", num_classes=kw.pop("num_classes", 10), in_chans=kw.pop("in_chans", 1), **kw
    ).eval()


def block_inputs_and_qkv(model, x):
    """Walk the model by hand (no hooks) and return, per block name, the qkv its attention receives."""
    qkvs = {}
    with torch.no_grad():
        t = model.stem(x)
        for i, stage in enumerate(model.stages):
            t = stage.downsample(t)
            for k, (sb, cb) in enumerate(stage.blocks):
                s = sb.norm1(sb.cpe1(t))
                ws = sb.window_size
                H, W = s.shape[1:3]
                s = F.pad(s, (0, 0, 0, (-W) % ws, 0, (-H) % ws))
                qkvs[f"stages.{i}.blocks.{k}.0"] = sb.attn.qkv(window_partition(s, ws))
                t = sb(t)
                c = cb.norm1(cb.cpe1(t))
                qkvs[f"stages.{i}.blocks.{k}.1"] = cb.attn.qkv(c.reshape(c.shape[0], -1, c.shape[-1]))
                t = cb(t)
    return qkvs


@pytest.mark.parametrize("v2", [False, True])
def test_hooked_attention_reproduces_reference_outputs(v2):
    # odd sizes: stage 0 is 15x16 tokens, padded to 21x21 (3x3 windows of 7)
    model = atto(channel_attn_v2=v2)
    x = torch.randn(2, 1, 29, 31)
    maps = capture_attention(model, x)
    qkvs = block_inputs_and_qkv(model, x)
    assert list(maps) == list(qkvs) and len(maps) == 2 * sum(model.depths)
    for name, rec in maps.items():
        qkv = qkvs[name]
        assert torch.allclose(rec.attn.sum(-1), torch.ones(()), atol=1e-5)  # rows are distributions
        if rec.kind == "spatial":
            ref = window_attention_ref(qkv, rec.num_heads)  # (B*nW, L, C)
            B, nh, nw, h, L, _ = rec.attn.shape
            v = qkv.view(B * nh * nw, L, 3, h, -1)[:, :, 2].transpose(1, 2)  # (B*nW, h, L, d)
            mine = (rec.attn.reshape(B * nh * nw, h, L, L) @ v).transpose(1, 2).reshape(B * nh * nw, L, -1)
        else:
            ref = channel_attention_ref(qkv, rec.num_heads, v2=v2)  # (B, N, C)
            B, G, cg = rec.attn.shape[:3]
            vals = rec.values.reshape(B, G, cg, -1)  # (B, G, Cg, N): the maps the attention mixes
            mine = (rec.attn @ vals).transpose(-1, -2).transpose(1, 2).reshape(B, -1, G * cg)
        assert torch.allclose(mine, ref, atol=1e-5), name


def test_window_attention_equals_softmax_by_hand_for_one_window():
    model = atto()
    x = torch.randn(2, 1, 29, 31)
    rec = capture_attention(model, x)["stages.0.blocks.0.0"]
    assert rec.map_size == (15, 16) and rec.padded_size == (21, 21) and rec.window_size == 7
    assert rec.attn.shape == (2, 3, 3, 1, 49, 49)
    qkv = block_inputs_and_qkv(model, x)["stages.0.blocks.0.0"]  # (B*9, 49, 96)
    b, wy, wx, C = 1, 2, 1, 32  # a bottom window: it holds padding tokens (rows 15..20)
    win = qkv[b * 9 + wy * 3 + wx]
    q, k = win[:, :C], win[:, C : 2 * C]
    logits = torch.stack(
        [torch.stack([(q[i] * k[j]).sum() for j in range(49)]) for i in range(49)]
    ) / math.sqrt(C)
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    assert torch.allclose(rec.attn[b, wy, wx, 0], e / e.sum(dim=1, keepdim=True), atol=1e-6)
    # the padding keys take part (non-zero weight), as in the released model
    pad_cols = [r * 7 + c for r in range(1, 7) for c in range(7)]  # window rows 15..20 are padding
    assert rec.attn[b, wy, wx, 0][:, pad_cols].sum() > 0


def test_channel_attention_v1_roles_by_hand():
    model = atto()
    x = torch.randn(1, 1, 28, 28)
    rec = capture_attention(model, x)["stages.1.blocks.0.1"]
    qkv = block_inputs_and_qkv(model, x)["stages.1.blocks.0.1"][0]  # (N, 3C), C = 64, 2 groups of 32
    g, C, cg = 1, 64, 32
    k = qkv[:, C + g * cg : C + (g + 1) * cg]  # chunk 2 acts as the query
    v = qkv[:, 2 * C + g * cg : 2 * C + (g + 1) * cg]  # chunk 3 as the key
    expect = torch.softmax(k.T @ v / math.sqrt(cg), dim=-1)
    assert torch.allclose(rec.attn[0, g], expect, atol=1e-6)
    q = qkv[:, g * cg : (g + 1) * cg]  # chunk 1 is what gets mixed
    assert torch.equal(rec.values[0, g].reshape(cg, -1), q.T)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_forward_bit_identical_with_and_without_hooks_and_hooks_removed():
    model = atto()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = model(x)
        with attention_hooks(model) as store:
            assert _hook_count(model) == len(store) > 0  # one pre-hook per block
            hooked = model(x)
        after = model(x)
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert _hook_count(model) == 0
    capture_attention(model, x)
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError), attention_hooks(model):  # hooks go even when the forward fails
        raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_grad_cam_shape_range_and_no_side_effects():
    model = atto(num_classes=5)
    x = torch.randn(2, 1, 29, 27)
    cam = grad_cam(model, x)
    assert (
        cam.shape == (2, 29, 27) and cam.min() >= 0 and torch.allclose(cam.flatten(1).amax(1), torch.ones(2))
    )
    assert all(p.grad is None for p in model.parameters()) and not model.training
    # against a hand computation: ReLU(sum_c mean(dy/dA_c) A_c) on the last-stage map, then upsampled
    feats = model.forward_features(x).detach().requires_grad_(True)
    logits = model.forward_head(feats)
    logits[:, 3].sum().backward()
    raw = F.relu(
        (feats.grad.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True)
    ).detach()  # (2, 1, 2, 2)
    up = F.interpolate(raw, size=(32, 32), mode="bilinear")[
        :, 0, :29, :27
    ]  # stride 16 on a padded 32x32 grid
    assert torch.allclose(grad_cam(model, x, target=3), up / up.flatten(1).amax(1)[:, None, None], atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        grad_cam(model, x, target=5)
    with pytest.raises(ValueError, match="classifier"):
        grad_cam(atto(num_classes=0), x)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    torch.manual_seed(0)
    model = atto()
    out = tmp_path_factory.mktemp("viz")
    names = [f"class{i}" for i in range(10)]
    paths = visualize(
        model, torch.randn(1, 28, 28), out, names, label="class2", queries=[(0.5, 0.5), (0.1, 0.9)]
    )
    return model, paths


def test_pngs_have_expected_pixel_sizes(written):
    model, paths = written
    px = CELL * DPI
    heads = model.stages[0].blocks[0][0].attn.num_heads, 2, 4, 8
    expect = {f"spatial_stage{i}": (max(h, 3) * px, 2 * px) for i, h in enumerate(heads)}  # heads x queries
    expect |= {
        f"channel_stage{i}": (5 * px, min(h, 4) * px) for i, h in enumerate(heads)
    }  # matrix + top-4 maps
    expect |= {"gradcam": (3 * px, px), "sheet": (4 * SHEET_CELL * DPI, 4 * SHEET_CELL * DPI)}
    assert set(paths) == set(expect)
    for name, path in paths.items():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == tuple(int(v) for v in expect[name]), name


def test_demo_sheets_one_per_image(tmp_path, written):
    model, _ = written
    imgs = torch.randn(2, 1, 33, 30)
    paths = write_demo_sheets(
        model, imgs, [1, 7], [f"c{i}" for i in range(10)], tmp_path, mean=[0.3], std=[0.35]
    )
    assert [p.name for p in paths] == ["sheet_0.png", "sheet_1.png"]
    with Image.open(paths[1]) as im:
        assert im.size == (int(4 * SHEET_CELL * DPI),) * 2


@pytest.mark.slow  # ~12 s CPU: first torchvision import, three model loads, four figures
def test_cli_viz_rgb_checkpoint_native_size(tmp_path, capsys):
    from safetensors.torch import save_file

    model = atto(num_classes=4, in_chans=3)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    img = tmp_path / "odd.png"
    Image.fromarray(torch.randint(0, 255, (37, 45, 3), dtype=torch.uint8).numpy()).save(img)
    out = tmp_path / "o"
    args = ["viz", str(img), "--model", "davit_atto", "--checkpoint", str(ckpt), "--out", str(out)]
    rc = cli_main(args + ["--img-size", "native", "--stages", "3", "--class-names", "a,b,c,d"])
    assert rc == 0
    files = sorted(p.name for p in (out / "odd").iterdir())
    assert files == ["channel_stage3.png", "gradcam.png", "sheet.png", "spatial_stage3.png"]
    assert cli_main(args + ["--stages", "7"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli_main(args + ["--class-names", "a,b"]) == 2
    assert "2 class names" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(args + ["--queries", "2,0.5"])


def test_run_metadata_of_trainer_checkpoint_drives_model_and_preprocessing(tmp_path):
    # the trainer writes model, classes, img_size, mean/std into the safetensors header (JSON values)
    from safetensors.torch import save_file

    model = atto(num_classes=3)
    ckpt = tmp_path / "model.safetensors"
    meta = {
        "model": "davit_atto",
        "classes": '["x", "y", "z"]',
        "img_size": "24",
        "mean": "[0.25]",
        "std": "[0.5]",
        "crop_pct": "1.0",
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt), metadata=meta)
    loaded, cfg = load_model(None, ckpt)
    assert loaded.num_classes == 3 and loaded.in_chans == 1 and cfg["classes"] == ["x", "y", "z"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    dcfg = resolve_data_config(loaded, cfg)
    assert dcfg["input_size"] == (1, 24, 24) and dcfg["mean"] == (0.25,) and dcfg["std"] == (0.5,)
    img = tmp_path / "g.png"
    Image.fromarray(torch.full((50, 40), 64, dtype=torch.uint8).numpy()).save(img)
    x = load_image(img, dcfg)
    assert x.shape == (1, 24, 24) and torch.allclose(
        x, torch.full_like(x, (64 / 255 - 0.25) / 0.5), atol=1e-2
    )
    # without metadata: ImageNet statistics averaged for one channel, the variant's input size
    d0 = resolve_data_config(atto())
    assert d0["input_size"] == (1, 32, 32) and d0["mean"] == pytest.approx((0.449,), abs=1e-3)


def test_fashion_mnist_test_image_source():
    pytest.importorskip("davit.data.fashion_mnist")
    from davit.cli_viz import _source

    img, label, stem = _source("fashion-mnist:0", [])
    assert img.size == (28, 28) and label == "Ankle boot" and stem == "fashion-mnist_0"
    assert _source("shirt.png", []) == ("shirt.png", None, "shirt")
    with pytest.raises(ValueError, match="0..9999"):
        _source("fashion-mnist:10000", [])
