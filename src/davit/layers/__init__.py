"""DaViT layers: attention functions and blocks."""

from .attention import (
    ChannelAttention,
    WindowAttention,
    channel_attention,
    channel_attention_ref,
    window_attention,
    window_attention_ref,
    window_partition,
    window_partition_gather,
    window_reverse,
    window_reverse_gather,
)
from .blocks import ChannelBlock, ConvPosEnc, DropPath, Mlp, SpatialBlock, drop_path
from .norm import LayerNorm

__all__ = [
    "ChannelAttention",
    "WindowAttention",
    "channel_attention",
    "channel_attention_ref",
    "window_attention",
    "window_attention_ref",
    "window_partition",
    "window_partition_gather",
    "window_reverse",
    "window_reverse_gather",
    "ChannelBlock",
    "ConvPosEnc",
    "DropPath",
    "LayerNorm",
    "Mlp",
    "SpatialBlock",
    "drop_path",
]
