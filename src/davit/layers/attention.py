"""The two DaViT attentions as plain tensor functions, with thin module wrappers.

Every function takes the fused ``qkv`` projection (last dim 3C, chunk order q, k, v as the checkpoints store it)
and returns the attended tokens *before* the output projection. The ``*_ref`` functions are the literal
formulations of SPEC section 3 and are what tests compare against; the un-suffixed functions are the fast paths
the model runs. Both must agree to fp32 round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "window_partition",
    "window_reverse",
    "window_attention_ref",
    "window_attention",
    "channel_attention_ref",
    "channel_attention",
    "WindowAttention",
    "ChannelAttention",
]


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``ws`` -> (B * nW, ws * ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def window_reverse(windows: Tensor, ws: int, H: int, W: int) -> Tensor:
    """(B * nW, ws * ws, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def _split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    # (B, N, 3C) -> three (B, heads, N, C/heads) views; no copy
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _merge_heads(x: Tensor) -> Tensor:
    # (B, heads, N, d) -> (B, N, heads * d)
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


def window_attention_ref(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention inside each window. qkv: (B*nW, L, 3C) -> (B*nW, L, C)."""
    q, k, v = _split_heads(qkv, num_heads)
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    return _merge_heads(attn.softmax(dim=-1) @ v)


def window_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Fast path of :func:`window_attention_ref` (fused SDPA kernel)."""
    q, k, v = _split_heads(qkv, num_heads)
    return _merge_heads(F.scaled_dot_product_attention(q, k, v))


def channel_attention_ref(qkv: Tensor, groups: int, v2: bool = False) -> Tensor:
    """Channel group attention over all N positions. qkv: (B, N, 3C) -> (B, N, C).

    V1 (the ImageNet release): A = softmax((k * Cg^-0.5)^T v), out = (A q^T)^T, i.e. chunk 2 is the query,
    chunk 3 the key and chunk 1 the value. V2 (Florence-2): A = softmax(q^T k * N^-0.5), out = (A v^T)^T.
    """
    q, k, v = _split_heads(qkv, groups)  # each (B, G, N, Cg)
    N, cg = q.shape[-2], q.shape[-1]
    if v2:
        attn = ((q * N**-0.5).transpose(-1, -2) @ k).softmax(dim=-1)  # (B, G, Cg, Cg)
        out = (attn @ v.transpose(-1, -2)).transpose(-1, -2)
    else:
        attn = ((k * cg**-0.5).transpose(-1, -2) @ v).softmax(dim=-1)
        out = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
    return _merge_heads(out)


def channel_attention(qkv: Tensor, groups: int, v2: bool = False) -> Tensor:
    """Fast path of :func:`channel_attention_ref`.

    Written as ``out = value @ A^T`` so the result comes out directly in (B, G, N, Cg) without the two transposes
    of the literal form, and the (Cg x Cg) logits are formed by one batched matmul over the strided views.
    """
    q, k, v = _split_heads(qkv, groups)
    N, cg = q.shape[-2], q.shape[-1]
    if v2:
        query, key, value, scale = q, k, v, N**-0.5
    else:
        query, key, value, scale = k, v, q, cg**-0.5
    attn = torch.matmul(query.transpose(-1, -2), key).mul_(scale).softmax(dim=-1)  # (B, G, Cg, Cg)
    return _merge_heads(torch.matmul(value, attn.transpose(-1, -2)))


class WindowAttention(nn.Module):
    """Window self-attention on (B*nW, L, C) tokens: qkv projection, attention, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fast = True  # False selects the literal reference formulation (tests, debugging)

    def attend(self, x: Tensor) -> Tensor:
        """Attention output before the output projection (blocks fuse the projection with the residual)."""
        fn = window_attention if self.fast else window_attention_ref
        return fn(self.qkv(x), self.num_heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.attend(x))


class ChannelAttention(nn.Module):
    """Channel group attention on (B, N, C) tokens; ``v2`` selects the Florence-2 formulation."""

    def __init__(self, dim: int, groups: int, qkv_bias: bool = True, v2: bool = False) -> None:
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible by groups {groups}")
        self.groups = groups
        self.v2 = v2
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fast = True

    def attend(self, x: Tensor) -> Tensor:
        """Attention output before the output projection (blocks fuse the projection with the residual)."""
        fn = channel_attention if self.fast else channel_attention_ref
        return fn(self.qkv(x), self.groups, self.v2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.attend(x))
