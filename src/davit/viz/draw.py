"""Matplotlib figures of the captured attention and Grad-CAM maps.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, Agg canvas), with a fixed size
and no tight bounding box, so every PNG has exactly ``panels x CELL x DPI`` pixels. Geometry: token (i, j) of
a stage with stride ``s`` covers input pixels [i*s, (i+1)*s) x [j*s, (j+1)*s); maps are drawn at that place
over the image and the axes are limited to the image, which hides the padding tokens beyond its edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from .capture import AttentionMap

CELL = 2.0  # inches per panel in the detail figures
SHEET_CELL = 2.5  # inches per panel in the summary sheet
DPI = 100

__all__ = [
    "CELL",
    "SHEET_CELL",
    "DPI",
    "to_display",
    "spatial_figure",
    "channel_figure",
    "gradcam_figure",
    "sheet_figure",
    "save",
]


def _figure(
    cols: float,
    rows: float,
    cell: float,
    left: float = 0.1,
    bottom: float = 0.1,
    top: float = 0.35,
    wspace: float = 0.08,
    hspace: float = 0.2,
) -> Figure:
    """A figure of ``cols x rows`` panels of ``cell`` inches. Margins in inches, gaps as fractions of a panel.
    Fixed margins instead of constrained layout: half the rendering time, and the size never moves."""
    w, h = cols * cell, rows * cell
    fig = Figure(figsize=(w, h), dpi=DPI)
    fig.subplots_adjust(
        left=left / w, right=1 - 0.1 / w, bottom=bottom / h, top=1 - top / h, wspace=wspace, hspace=hspace
    )
    return fig


def to_display(
    img: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """Normalised (C, H, W) model input -> displayable (H, W) grey or (H, W, 3) array in [0, 1]. Without
    mean/std, the image is stretched to its own min..max (right for grey images whatever their
    normalisation)."""
    img = img.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        img = (img * s + m).clamp(0, 1)
    else:
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo).clamp_min(1e-12)
    if img.shape[0] == 1:
        return img[0].numpy()
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).numpy()
    return img.mean(0).numpy()  # other channel counts: show the channel mean in grey


def _image(ax, disp: np.ndarray, dim: float = 1.0) -> None:
    H, W = disp.shape[:2]
    ax.imshow(
        disp * dim,
        cmap="gray" if disp.ndim == 2 else None,
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(0, W, H, 0),
    )
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(
    ax,
    fmap: np.ndarray,
    stride: int,
    origin: tuple[int, int] = (0, 0),
    cmap: str = "inferno",
    alpha: float = 0.6,
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    # fmap (h, w) tokens placed at pixel origin (y0, x0), each token stride x stride pixels; axes limits kept
    y0, x0 = origin
    h, w = fmap.shape
    xl, yl = ax.get_xlim(), ax.get_ylim()
    ax.imshow(
        fmap,
        cmap=cmap,
        alpha=alpha,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        extent=(x0, x0 + w * stride, y0 + h * stride, y0),
    )
    ax.set_xlim(*xl)
    ax.set_ylim(*yl)


def _window_grid(ax, step: int, H: int, W: int) -> None:
    for x in range(step, W, step):
        ax.axvline(x, color="white", lw=0.6, alpha=0.7)
    for y in range(step, H, step):
        ax.axhline(y, color="white", lw=0.6, alpha=0.7)


def _token(p: tuple[int, int], stride: int, size: tuple[int, int]) -> tuple[int, int]:
    return min(p[0] // stride, size[0] - 1), min(p[1] // stride, size[1] - 1)


def _spatial_panel(
    ax, rec: AttentionMap, disp: np.ndarray, query: tuple[int, int], stride: int, weights: Tensor
) -> None:
    """Image, window grid, the query's window coloured by ``weights`` (ws*ws), the query marked."""
    H, W = disp.shape[:2]
    ws = rec.window_size
    ty, tx = _token(query, stride, rec.map_size)
    wy, wx = ty // ws, tx // ws
    _image(ax, disp, dim=0.8)
    w = weights.view(ws, ws).numpy()
    _overlay(ax, w, stride, (wy * ws * stride, wx * ws * stride), vmin=0.0, vmax=float(w.max()), alpha=0.7)
    _window_grid(ax, ws * stride, H, W)
    ax.add_patch(
        Rectangle(
            (wx * ws * stride, wy * ws * stride),
            ws * stride,
            ws * stride,
            fill=False,
            edgecolor="cyan",
            lw=1.2,
        )
    )
    ax.plot([(tx + 0.5) * stride], [(ty + 0.5) * stride], marker="+", color="lime", ms=8, mew=1.5)


def _query_row(rec: AttentionMap, query: tuple[int, int], stride: int, b: int) -> Tensor:
    ty, tx = _token(query, stride, rec.map_size)
    ws = rec.window_size
    return rec.attn[b, ty // ws, tx // ws, :, (ty % ws) * ws + tx % ws]  # (heads, ws*ws)


def spatial_figure(
    rec: AttentionMap,
    disp: np.ndarray,
    queries: Sequence[tuple[int, int]],
    stride: int,
    max_heads: int = 8,
    b: int = 0,
) -> Figure:
    """Rows: query pixels (y, x); columns: heads (at least 3 columns wide). Each panel: the query's weights
    over its window."""
    heads = min(rec.num_heads, max_heads)
    cols = max(heads, 3)  # room for the title when a stage has one or two heads
    fig = _figure(cols, len(queries), CELL, top=0.62)
    axes = fig.subplots(len(queries), cols, squeeze=False)
    for ax in axes[:, heads:].flat:
        ax.set_axis_off()
    for r, q in enumerate(queries):
        row = _query_row(rec, q, stride, b)
        for h in range(heads):
            _spatial_panel(axes[r, h], rec, disp, q, stride, row[h])
            axes[r, h].set_title(f"query (y={q[0]}, x={q[1]}) head {h}", fontsize=7)
    H, W = rec.map_size
    fig.suptitle(
        f"window attention {rec.name}\n{H}x{W} tokens, window {rec.window_size}, {stride} px/token"
        + (f", {heads} of {rec.num_heads} heads" if heads < rec.num_heads else ""),
        fontsize=8,
    )
    return fig


def _channel_matrix(ax, a: np.ndarray, title: str) -> None:
    ax.imshow(a, cmap="viridis", vmin=0.0, vmax=float(a.max()), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xlabel("key channel", fontsize=6)
    ax.set_ylabel("query channel", fontsize=6)
    ax.tick_params(labelsize=5)


def _channel_map(ax, disp: np.ndarray, vmap: np.ndarray, stride: int) -> None:
    _image(ax, disp, dim=0.8)
    lo, hi = float(vmap.min()), float(vmap.max())
    _overlay(ax, (vmap - lo) / max(hi - lo, 1e-12), stride, cmap="magma", vmin=0.0, vmax=1.0, alpha=0.65)


def most_attended(rec: AttentionMap, group: int, k: int, b: int = 0) -> tuple[list[int], list[float]]:
    """The ``k`` channels of a group that receive the most attention (column mean of the Cg x Cg matrix)."""
    recv = rec.attn[b, group].mean(dim=0)
    top = recv.topk(min(k, recv.numel()))
    return top.indices.tolist(), top.values.tolist()


def channel_figure(
    rec: AttentionMap, disp: np.ndarray, stride: int, max_groups: int = 4, top_k: int = 4, b: int = 0
) -> Figure:
    """Rows: groups. First column: the Cg x Cg attention matrix; then the spatial maps of the ``top_k`` most
    attended channels (the maps the attention mixes), over the image."""
    groups = min(rec.num_heads, max_groups)
    cg = rec.attn.shape[-1]
    top_k = min(top_k, cg)
    fig = _figure(1 + top_k, groups, CELL, left=0.45, bottom=0.4, top=0.7, wspace=0.25, hspace=0.35)
    axes = fig.subplots(groups, 1 + top_k, squeeze=False)
    for g in range(groups):
        _channel_matrix(axes[g, 0], rec.attn[b, g].numpy(), f"group {g}: {cg}x{cg} attention")
        idx, val = most_attended(rec, g, top_k, b)
        for j, (c, v) in enumerate(zip(idx, val)):
            _channel_map(axes[g, 1 + j], disp, rec.values[b, g, c].numpy(), stride)
            axes[g, 1 + j].set_title(f"channel {g * cg + c}: receives {v:.3f}", fontsize=7)
    H, W = rec.map_size
    fig.suptitle(
        f"channel attention {rec.name} ({'V2' if rec.v2 else 'V1'})\n{H}x{W} tokens, "
        f"{rec.num_heads} groups of {cg} channels" + (f" (first {groups})" if groups < rec.num_heads else ""),
        fontsize=8,
    )
    return fig


def _probs_panel(ax, probs: Tensor, names: Sequence[str], k: int = 5) -> None:
    top = probs.topk(min(k, probs.numel()))
    labels = [names[i] if i < len(names) else f"class {i}" for i in top.indices.tolist()]
    ax.barh(range(len(labels))[::-1], top.values.numpy(), color="tab:blue")
    ax.set_yticks(range(len(labels))[::-1], labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_title("top predictions", fontsize=8)
    for y, v in zip(range(len(labels))[::-1], top.values.tolist()):
        inside = v > 0.8  # long bars carry their label inside
        ax.text(
            v - 0.02 if inside else v + 0.02,
            y,
            f"{v:.1%}",
            va="center",
            ha="right" if inside else "left",
            color="white" if inside else "black",
            fontsize=7,
        )


def _cam_panel(ax, disp: np.ndarray, cam: Tensor) -> None:
    _image(ax, disp, dim=0.8)
    _overlay(ax, cam.numpy(), 1, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)


def gradcam_figure(
    disp: np.ndarray, cam: Tensor, probs: Tensor, names: Sequence[str], label: str | None = None
) -> Figure:
    """Image, Grad-CAM of the top prediction over it, top-5 probabilities."""
    fig = _figure(3, 1, CELL, left=0.05, bottom=0.3, top=0.25, wspace=0.35)
    a0, a1, a2 = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=(1, 1, 1.2)))
    _image(a0, disp)
    a0.set_title("input" + (f" (true: {label})" if label else ""), fontsize=8)
    _cam_panel(a1, disp, cam)
    p = int(probs.argmax())
    a1.set_title(f"Grad-CAM for {names[p] if p < len(names) else f'class {p}'}", fontsize=8)
    _probs_panel(a2, probs, names)
    return fig


def sheet_figure(
    disp: np.ndarray,
    spatial: dict[int, AttentionMap],
    channel: dict[int, AttentionMap],
    strides: dict[int, int],
    query: tuple[int, int],
    cam: Tensor | None,
    probs: Tensor | None,
    names: Sequence[str],
    label: str | None = None,
    title: str = "",
    b: int = 0,
) -> Figure:
    """Summary: input + Grad-CAM + predictions; per stage the window attention of ``query`` (mean over heads),
    the channel-attention matrix of group 0, and the spatial map of that group's most attended channel."""
    stages = sorted(set(spatial) | set(channel))
    ncols = max(3, len(stages))
    fig = _figure(ncols, 4, SHEET_CELL, left=0.45, bottom=0.35, top=0.55, wspace=0.3, hspace=0.45)
    gs = fig.add_gridspec(4, ncols)
    ax = fig.add_subplot(gs[0, 0])
    _image(ax, disp)
    ax.set_title("input" + (f"  (true: {label})" if label else ""), fontsize=8)
    ax.plot([query[1] + 0.5], [query[0] + 0.5], marker="+", color="lime", ms=9, mew=1.5)
    if cam is not None and probs is not None:
        ax = fig.add_subplot(gs[0, 1])
        _cam_panel(ax, disp, cam)
        p = int(probs.argmax())
        ax.set_title(
            f"Grad-CAM: {names[p] if p < len(names) else f'class {p}'} {float(probs[p]):.1%}", fontsize=8
        )
        _probs_panel(fig.add_subplot(gs[0, 2:]), probs, names)
    for col, st in enumerate(stages):
        if st in spatial:
            rec = spatial[st]
            ax = fig.add_subplot(gs[1, col])
            _spatial_panel(ax, rec, disp, query, strides[st], _query_row(rec, query, strides[st], b).mean(0))
            ax.set_title(
                f"stage {st} window attention\n{rec.num_heads} heads (mean), window {rec.window_size}",
                fontsize=7,
            )
        if st in channel:
            rec = channel[st]
            cg = rec.attn.shape[-1]
            _channel_matrix(
                fig.add_subplot(gs[2, col]),
                rec.attn[b, 0].numpy(),
                f"stage {st} channel attention\ngroup 0 of {rec.num_heads} ({cg}x{cg})",
            )
            (c,), (v,) = most_attended(rec, 0, 1, b)
            ax = fig.add_subplot(gs[3, col])
            _channel_map(ax, disp, rec.values[b, 0, c].numpy(), strides[st])
            ax.set_title(f"stage {st}: map of channel {c}\n(most attended in group 0, {v:.3f})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at its own size (no tight bounding box, so the pixel size is predictable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
