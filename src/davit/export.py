"""`davit export`: ONNX export with a dynamic batch axis, checked against PyTorch with onnxruntime.

Height and width are fixed at export time: the model pads the stem input and the attention windows only
when the size needs it (a Python branch), so a graph traced at one size is only valid for sizes taking the
same branches.
Export once per input size you serve.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .cli import positive_int
from .models import create_model, model_info

__all__ = ["export_onnx", "min_dynamic_size", "ort_session", "verify_onnx"]

EXPORTERS = ("torchscript", "dynamo")


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    img_size: int | tuple[int, int] = 224,
    opset: int | None = None,
    exporter: str = "torchscript",
    trace_batch: int = 2,
    dynamic_size: bool = False,
) -> Path:
    """Write ``model`` (eval, fp32) as ONNX with input ``images`` (B, C, H, W) and a dynamic batch axis B.

    ``exporter``: "torchscript" (tracing; seconds) or "dynamo" (``torch.export``; minutes on a small CPU).
    ``dynamic_size``: H and W dynamic too, from :func:`min_dynamic_size` up (the "dynamo" exporter only: a
    trace records the padding branches taken at ``img_size``; ``torch.export`` sees the model's symbolic-size
    path, which has none).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if dynamic_size and exporter != "dynamo":
        raise ValueError(
            "a dynamic image size needs the 'dynamo' exporter (the torchscript exporter traces one size): "
            "pass exporter='dynamo' (CLI: --exporter dynamo)"
        )
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    lo = min_dynamic_size(model)
    if dynamic_size and min(h, w) < lo:
        raise ValueError(
            f"with a dynamic image size the example size must be at least {lo} px (the smallest size "
            f"exported), got {h}x{w}: pass a larger img_size (CLI: --img-size)"
        )
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: name the .onnx file to write, e.g. {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = torch.randn(trace_batch, model.in_chans, h, w, device=next(model.parameters()).device)
    out_name = "logits" if getattr(model, "num_classes", 1) else "features"
    kw: dict[str, Any] = dict(input_names=["images"], output_names=[out_name])
    if opset is not None:
        kw["opset_version"] = opset
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every shape-dependent Python branch; they are expected (see the module note)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if exporter == "torchscript":
            kw["dynamic_axes"] = {"images": {0: "batch"}, out_name: {0: "batch"}}
            torch.onnx.export(model, (x,), str(out), dynamo=False, **kw)
        else:
            dims = {0: torch.export.Dim("batch", min=1, max=4096)}
            if dynamic_size:
                dims[2] = torch.export.Dim("height", min=lo, max=MAX_DYNAMIC_SIZE)
                dims[3] = torch.export.Dim("width", min=lo, max=MAX_DYNAMIC_SIZE)
            torch.onnx.export(model, (x,), str(out), dynamo=True, dynamic_shapes={"x": dims}, **kw)
    return out


#: Largest height and width of an export with a dynamic image size.
MAX_DYNAMIC_SIZE = 8192


def min_dynamic_size(model: nn.Module) -> int:
    """Smallest height and width of an export with a dynamic image size: one pixel more than the last stage's
    reduction, so that every stage's map is at least 2 px wide. torch specialises sizes 0 and 1, so a
    one-pixel map would pin the program's sizes."""
    info = getattr(model, "feature_info", None)
    return (info[-1]["reduction"] if info else 32) + 1


def ort_session(path: str | os.PathLike, threads: int | None = None, device: str = "cpu") -> Any:
    """An onnxruntime session (all graph optimisations on); ``threads`` sets the intra-op pool size."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeError(
            "onnxruntime is not installed: pip install onnxruntime (or 'davit-pytorch[dev]')"
        ) from e
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=providers)


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | tuple[int, int] | list[tuple[int, int]],
    batch_sizes: tuple[int, ...] = (1, 3),
) -> float:
    """Max abs difference between onnxruntime and PyTorch over random batches of the given sizes, at one
    image size or each of a list of (height, width)."""
    if isinstance(img_size, int):
        sizes = [(img_size, img_size)]
    elif isinstance(img_size, tuple):
        sizes = [img_size]
    else:
        sizes = list(img_size)
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    model = model.eval()
    worst = 0.0
    for (h, w), b in ((hw, b) for hw in sizes for b in batch_sizes):
        x = torch.randn(b, model.in_chans, h, w)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"onnx output shape {got.shape} != PyTorch {ref.shape} at batch {b}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic batch) and verify it with onnxruntime")
    p.add_argument("--model", required=True, help="variant name (see `davit list`)")
    p.add_argument("--checkpoint", default=None, help="weights file (any layout davit.weights reads)")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument(
        "--img-size", type=positive_int, default=None, help="fixed input side (default: the variant's)"
    )
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    p.add_argument(
        "--dynamic-size",
        action="store_true",
        help="let height and width vary too (needs --exporter dynamo); verified at three sizes",
    )
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed by the verification")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if Path(args.out).is_dir():  # before building the model: a bad --out must not cost an export
        raise ValueError(f"--out {args.out} is a folder: name the file, e.g. {Path(args.out) / 'model.onnx'}")
    if not args.atol >= 0:
        raise ValueError(f"--atol must be >= 0 (the largest abs difference allowed), got {args.atol}")
    img = args.img_size or model_info(args.model)["input_size"][1]
    if args.dynamic_size and args.exporter != "dynamo":
        raise ValueError("--dynamic-size needs --exporter dynamo (the torchscript exporter traces one size)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    model = create_model(
        args.model, pretrained=args.checkpoint or False, num_classes=args.num_classes, in_chans=args.in_chans
    ).eval()
    out = export_onnx(
        model, args.out, img, opset=args.opset, exporter=args.exporter, dynamic_size=args.dynamic_size
    )
    axes = "dynamic batch"
    if args.dynamic_size:
        axes += f", height and width from {min_dynamic_size(model)} px"
    size = f"{out.stat().st_size / 2**20:.1f} MB"
    data = out.with_name(out.name + ".data")  # the dynamo exporter writes the weights beside the graph
    if data.is_file():
        size += f" + {data.stat().st_size / 2**20:.1f} MB of weights in {data.name}, keep them together"
    print(f"exported {args.model} at {img}x{img} ({axes}) to {out} ({size})")
    if args.no_verify:
        return 0
    sizes = [(img, img)]
    if args.dynamic_size:
        # two sizes other than the traced one, non-square, one needing padding at every stage
        lo = min_dynamic_size(model)
        sizes += [(img + 13, max(lo, img // 2 + 1)), (max(lo, img - 7), img + 32)]
    diff = verify_onnx(model, out, sizes)
    shown = ", ".join(f"{h}x{w}" for h, w in sizes)
    print(f"onnxruntime vs PyTorch at batch 1 and 3, {shown}: max abs diff {diff:.2e}")
    if not diff <= args.atol:
        raise RuntimeError(f"onnxruntime output differs from PyTorch by {diff:.2e} > --atol {args.atol}")
    return 0
