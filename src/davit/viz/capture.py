"""Attention maps and class activation maps out of a DaViT forward pass, without touching the forward path.

The fast forward runs fused kernels (SDPA, batched channel matmuls) and never materialises attention weights.
Instead of a second, slower forward, temporary hooks record what each attention *receives*: a pre-hook on
every SpatialBlock / ChannelBlock notes the token map size, a forward hook on its ``attn.qkv`` Linear keeps
the fused q/k/v projection. The probabilities are then recomputed from those tensors with the math of
``window_attention_ref`` / ``channel_attention_ref``. The hooks live only inside :func:`attention_hooks`; a
model outside it has no hooks at all, so its forward and its speed are exactly the unhooked ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import _split_heads
from ..layers.blocks import ChannelBlock, SpatialBlock

__all__ = [
    "AttentionMap",
    "attention_hooks",
    "capture_attention",
    "grad_cam",
    "gradcam_and_logits",
    "stage_stride",
]

_NAME = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(\d+)$")


@dataclass
class AttentionMap:
    """Attention probabilities of one block, for every image of the batch.

    ``attn``: spatial blocks (B, nWh, nWw, heads, ws*ws, ws*ws), windows laid out as on the padded map, rows =
    queries, columns = keys, both in row-major order inside the window; channel blocks (B, G, Cg, Cg).
    ``values``: channel blocks only, (B, G, Cg, H, W): the per-channel spatial maps the attention mixes (chunk
    1 of qkv in V1, chunk 3 in V2), i.e. what each "channel token" sees of the image.
    """

    name: str
    kind: str  # "spatial" or "channel"
    stage: int
    block: int
    map_size: tuple[int, int]  # (H, W) of the token map, before padding to the window
    window_size: int | None
    num_heads: int
    attn: Tensor
    values: Tensor | None = None
    v2: bool = False

    @property
    def padded_size(self) -> tuple[int, int]:
        H, W = self.map_size
        if self.window_size is None:
            return H, W
        ws = self.window_size
        return H + (-H) % ws, W + (-W) % ws

    def query_map(self, y: int, x: int) -> Tensor:
        """Spatial blocks: the weights token (y, x) gives to every key, as (B, heads, Hp, Wp) on the padded
        map, zero outside its window. The keys in the padding rows/columns keep their weight (they take
        part)."""
        if self.kind != "spatial":
            raise ValueError(f"query_map is for spatial blocks; {self.name} is a {self.kind} block")
        H, W = self.map_size
        if not (0 <= y < H and 0 <= x < W):
            raise ValueError(f"query ({y}, {x}) is outside the {H}x{W} token map of {self.name}")
        ws = self.window_size
        wy, wx = y // ws, x // ws
        row = self.attn[:, wy, wx, :, (y % ws) * ws + x % ws]  # (B, heads, ws*ws)
        Hp, Wp = self.padded_size
        out = row.new_zeros(row.shape[0], row.shape[1], Hp, Wp)
        out[:, :, wy * ws : (wy + 1) * ws, wx * ws : (wx + 1) * ws] = row.view(*row.shape[:2], ws, ws)
        return out


def stage_stride(model: nn.Module, stage: int, image_size: tuple[int, int], map_size: tuple[int, int]) -> int:
    """Input pixels per token of ``stage``: the model's recorded reduction, else inferred from the sizes
    (padding rounds maps up, so ceil(image / map) can undershoot; the recorded value is exact)."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[stage], dict) and "reduction" in info[stage]:
        return int(info[stage]["reduction"])
    return max(-(-image_size[0] // map_size[0]), -(-image_size[1] // map_size[1]))


def _remember_input(rec: dict, module: nn.Module, args: tuple) -> None:
    rec["input"] = args[0].detach()  # blocks take (B, H, W, C)
    rec["size"] = tuple(args[0].shape[1:3])


@contextmanager
def attention_hooks(model: nn.Module) -> Iterator[dict[str, dict]]:
    """Inside the ``with``, every forward of ``model`` records each block's input and map size into the
    yielded dict (module name -> {"block", "size", "input"}). Only a pre-hook on each block: the forward
    itself runs unchanged (same kernels, bit-identical output); the qkv projections are recomputed from the
    recorded inputs afterwards. All hooks are removed on exit, even after an error."""
    store: dict[str, dict] = {}
    handles = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, (SpatialBlock, ChannelBlock)):
                rec = store[name] = {"block": m}
                handles.append(m.register_forward_pre_hook(partial(_remember_input, rec)))
        if not store:
            raise ValueError(
                f"{type(model).__name__} has no DaViT SpatialBlock/ChannelBlock to take attention from"
            )
        yield store
    finally:
        for h in handles:
            h.remove()


def _window_probs(qkv: Tensor, heads: int, batch: int, size: tuple[int, int], ws: int) -> Tensor:
    # same math as window_attention_ref: softmax(q * d^-0.5 @ k^T) per window and head
    q, k, _ = _split_heads(qkv.float(), heads)  # (B*nW, heads, L, d)
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B*nW, heads, L, L)
    H, W = size
    nh, nw = -(-H // ws), -(-W // ws)
    return attn.view(batch, nh, nw, heads, ws * ws, ws * ws)  # window_partition order: (B, H/ws, W/ws)


def _channel_probs(qkv: Tensor, groups: int, size: tuple[int, int], v2: bool) -> tuple[Tensor, Tensor]:
    # same math as channel_attention_ref; returns (attention (B, G, Cg, Cg), mixed maps (B, G, Cg, H, W))
    q, k, v = _split_heads(qkv.float(), groups)  # each (B, G, N, Cg)
    N, cg = q.shape[-2], q.shape[-1]
    if v2:
        attn = ((q * N**-0.5).transpose(-1, -2) @ k).softmax(dim=-1)
        values = v
    else:  # V1 roles: chunk 2 is the query, chunk 3 the key, chunk 1 the value
        attn = ((k * cg**-0.5).transpose(-1, -2) @ v).softmax(dim=-1)
        values = q
    B, G = q.shape[:2]
    return attn, values.transpose(-1, -2).reshape(B, G, cg, *size)


def _records(store: dict[str, dict]) -> dict[str, AttentionMap]:
    out: dict[str, AttentionMap] = {}
    for i, (name, rec) in enumerate(store.items()):
        if "input" not in rec:
            continue  # the block did not run (e.g. forward_intermediates with stop_early)
        blk, size = rec["block"], rec["size"]
        with torch.no_grad():
            qkv = blk.attention_qkv(rec["input"])
        m = _NAME.search(name)
        stage, block = (int(m.group(1)), int(m.group(2))) if m else (-1, i // 2)
        if isinstance(blk, SpatialBlock):
            ws, heads = blk.window_size, blk.attn.num_heads
            batch = qkv.shape[0] // (-(-size[0] // ws) * -(-size[1] // ws))
            attn = _window_probs(qkv, heads, batch, size, ws)
            out[name] = AttentionMap(name, "spatial", stage, block, size, ws, heads, attn)
        else:
            a = blk.attn
            attn, values = _channel_probs(qkv, a.groups, size, a.v2)
            out[name] = AttentionMap(name, "channel", stage, block, size, None, a.groups, attn, values, a.v2)
    return out


def capture_attention(model: nn.Module, x: Tensor) -> dict[str, AttentionMap]:
    """Run ``model(x)`` once without gradients and return every block's attention, keyed by module name
    (``stages.{i}.blocks.{k}.0`` spatial, ``...1`` channel), in forward order. Put the model in ``eval()``
    first unless you want stochastic depth in the picture."""
    with torch.no_grad(), attention_hooks(model) as store:
        model(x)
    return _records(store)


def gradcam_and_logits(
    model: nn.Module, x: Tensor, target: int | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Grad-CAM on the last stage map and the logits of the same forward pass; see :func:`grad_cam`."""
    if not hasattr(model, "forward_head") or getattr(model, "num_classes", 0) == 0:
        raise ValueError(
            "Grad-CAM needs a classifier: this model has no head (num_classes=0 or a features-only "
            "backbone); build it with num_classes > 0"
        )
    with torch.enable_grad():
        # a leaf that needs grad keeps the graph even when every parameter is frozen
        xg = x.detach().requires_grad_(True)
        feats = model.forward_features(xg)  # (B, C, h, w)
        logits = model.forward_head(feats)
        if target is None:
            tgt = logits.argmax(dim=1)
        else:
            tgt = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0])
            if int(tgt.max()) >= logits.shape[1] or int(tgt.min()) < 0:
                raise ValueError(f"target class {target} is outside 0..{logits.shape[1] - 1}")
        # autograd.grad leaves every .grad untouched: no side effects on the model
        (g,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), feats)
    weights = g.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats.detach()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    # token (i, j) covers input pixels [i*s, (i+1)*s): place the map at stride s, then crop the padding away
    H, W = x.shape[-2:]
    h, w = cam.shape[-2:]
    s = stage_stride(model, -1, (H, W), (h, w))
    cam = F.interpolate(cam, size=(h * s, w * s), mode="bilinear", align_corners=False)[:, 0, :H, :W]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return cam / peak[:, None, None], logits.detach()


def grad_cam(model: nn.Module, x: Tensor, target: int | Tensor | None = None) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the last-stage map: (B, H, W) at input resolution, in [0, 1] (each
    image scaled by its maximum). ``target``: class index (int or per-image tensor); default the top
    prediction."""
    return gradcam_and_logits(model, x, target)[0]
