"""DaViT: the trunk, the classification model, the feature (dense-prediction) model and the variant table.

Tokens flow through the stages as channels-last maps (B, H, W, C); public outputs are NCHW like every other
vision backbone. Parameter names equal timm's ``davit.py`` so its state dicts load directly; every other
layout is mapped by :mod:`davit.weights`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import ChannelBlock, LayerNorm, SpatialBlock
from .layers.attention import _traced, known_true
from .layers.fused import conv as run_conv
from .layers.fused import has_hooks

__all__ = ["DaViT", "DaViTFeatures", "create_model", "list_models", "model_info", "VARIANTS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def strided_conv(conv: nn.Conv2d, x: Tensor, fast: bool = True) -> Tensor:
    """``conv(x)`` for the stem and downsample convs, exact also where oneDNN is not.

    On Intel CPUs with AVX-512/AMX, torch 2.14.1's oneDNN (3.12) returns wrong values (errors of order 1,
    sometimes NaN/inf, varying from call to call) for a strided bfloat16 convolution whose output is one
    column wide, e.g. a 447x1 image through the stem (tests/faults/test_fuzz.py found it; fp32, fp16, stride 1
    and one-row outputs are right). With ``stride`` zero columns added on the right the output is two columns
    wide and its first column is the same sum (those columns were zero padding anyway), so we drop the second.
    Only one-column outputs on CPU take this path: a few extra zeros for a degenerate shape."""
    s = conv.stride[1]
    if s > 1 and x.is_cpu and x.shape[-1] + 2 * conv.padding[1] - conv.kernel_size[1] < s:
        return run_conv(F.pad(x, (0, s)), conv, fast)[..., :1]
    return run_conv(x, conv, fast)  # compiled CPU code: as an opaque op (davit.layers.fused.conv)


class Stem(nn.Module):
    """Zero-pad right/bottom to a multiple of the stride, Conv2d(k7, s4, p3), LayerNorm. NCHW in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, stride: int = 4, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=stride, padding=3)
        self.norm = LayerNorm(dim, eps=norm_eps)
        self.fast = True

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        s = self.stride
        if self.fast and x.is_cpu and x.dim() == 4 and x.shape[0] > 1 and not _traced():
            # eager CPU: the images in channels-last memory, so that oneDNN's convolution writes its output
            # channels-last and the (B, H, W, C) permute below is contiguous. From NCHW images the layer norm
            # copied the permuted map (and its saved input again in the backward), the convolution's
            # backward its gradient, and inference's native layer norm (contiguous input only) did not run.
            # The same values (bit-identical on davit_tiny's stem). In davit_tiny's eager training step at
            # batch 8 (profiled, Zen 4, session 41) the two copies of the map (3.9 ms) give way to one of the
            # images (0.4 ms); one image alone (eager inference's slices) was slower, 0.88 against 0.77 ms,
            # hence batches only. Not in compiled code: its training step was no faster (0.975x, 11 rounds)
            x = x.contiguous(memory_format=torch.channels_last)
        # known_true: the plain test for concrete sizes; with symbolic sizes (torch.compile) it is
        # false unless it holds for every size, so the graph pads by amounts that may be zero where a branch
        # would guard on the size's class and recompile for the other one. The amounts as ceiling divisions
        # keep later size expressions short.
        pad_b, pad_r = (H + s - 1) // s * s - H, (W + s - 1) // s * s - W
        if not (known_true(pad_b == 0) and known_true(pad_r == 0)):
            x = F.pad(x, (0, pad_r, 0, pad_b))
        return self.norm(strided_conv(self.conv, x).permute(0, 2, 3, 1))  # (B, H/4, W/4, C)


class ConvStem(nn.Module):
    """Conv2d(k3 s2) -> BatchNorm -> GELU -> Conv2d(k3 s2) -> LayerNorm (``stride`` 4; for 2 the first conv
    has stride 1). NCHW in, NHWC out, ceil(H/stride) x ceil(W/stride) tokens like :class:`Stem`.

    Not in the paper: for small images trained from scratch on a budget. A nonlinear two-layer stem gives each
    token a richer 4x4 patch than one linear 7x7 conv, which made a 28 px Fashion-MNIST model learn faster per
    image at the same step time (docs/benchmarks.md, Fashion-MNIST demo)."""

    def __init__(self, in_chans: int, dim: int, stride: int = 4, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if stride not in (2, 4):
            raise ValueError(f"the conv stem has stride 2 or 4, got stem_stride={stride}")
        self.stride = stride
        self.conv1 = nn.Conv2d(in_chans, dim, kernel_size=3, stride=stride // 2, padding=1)
        self.bn1 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.norm = LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(strided_conv(self.conv1, x)))
        return self.norm(strided_conv(self.conv, x).permute(0, 2, 3, 1))


def default_patch_linear_side(capability: str | None = None) -> int:
    """The largest map side (height and width) on which :class:`Downsample`'s k2 s2 convolution runs in
    training as a linear layer on 2x2 patches (see its forward): 8, or 14 where torch's CPU capability is AVX2
    (no AVX-512). There oneDNN's convolution weight gradient runs at 38-61 GFLOP/s (session 49), and on an
    AVX2-only CPU emulated on the Zen 4 VM (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, session
    50, forward + backward per call after a 64 MB pass, 15 alternating rounds) the patches' linear was 1.42x,
    1.21x and 2.09x as fast as the convolution on davit_tiny's 14 x 14 x 384 -> 768 downsampling at batch 8,
    32 and 2; on 28 x 28 x 192 -> 384 maps 1.12x, 0.98x and 1.14x (kept on the convolution). With AVX-512
    the 14 x 14 map was level (1.03x) and the larger ones 0.76-0.78x."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return 14 if capability == "AVX2" else 8


_PATCH_LINEAR_SIDE = default_patch_linear_side()


def set_patch_linear_side(side: int | None) -> int:
    """Set the largest map side on which training runs the downsampling convolutions as linears on 2x2
    patches on the CPU (``None``: :func:`default_patch_linear_side`; other devices keep 8). Read by eager
    code on each call and when torch.compile traces. Returns the previous setting."""
    global _PATCH_LINEAR_SIDE
    previous = _PATCH_LINEAR_SIDE
    _PATCH_LINEAR_SIDE = default_patch_linear_side() if side is None else int(side)
    return previous


def patch_linear_side() -> int:
    """The setting of :func:`set_patch_linear_side` (``davit bench`` prints it)."""
    return _PATCH_LINEAR_SIDE


class Downsample(nn.Module):
    """LayerNorm, then Conv2d(k2 s2) after zero-padding to even size, or Conv2d(k3 s2 p1) (overlapped)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 2, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if kernel_size not in (2, 3):
            raise ValueError(f"downsample kernel_size must be 2 or 3, got {kernel_size}")
        self.even_k = kernel_size == 2
        self.norm = LayerNorm(in_dim, eps=norm_eps, autocast_out=True)  # feeds the conv only
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride=2, padding=0 if self.even_k else 1)
        self.fast = True

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C')
        x = self.norm(x)
        B, H, W, C = x.shape
        if self.even_k:
            # as in Stem.forward: with symbolic sizes, padding by amounts that may be zero instead of a guard
            # on the parity
            Hp, Wp = (H + 1) // 2 * 2, (W + 1) // 2 * 2
            if not (known_true(Hp == H) and known_true(Wp == W)):
                x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
                H, W = Hp, Wp
        # a graph with symbolic sizes keeps the conv (the size test would be a guard)
        side = _PATCH_LINEAR_SIDE if x.is_cpu else 8
        small = self.even_k and known_true(H <= side) and known_true(W <= side)
        if small and self.fast and torch.is_grad_enabled() and not has_hooks(self.conv):
            # k2 s2 on a small map, in training: the conv is a linear layer on 2x2 patches. oneDNN's conv
            # backward on such maps costs 2-4x the linear's (batch 64, fwd + bwd: 5.0 vs 1.3 ms for 2x2x128
            # -> 256, 2.4 vs 1.2 ms for 4x4x64 -> 128); on large maps the conv wins, hence the size limit
            # (larger on AVX2-only CPUs: default_patch_linear_side).
            patches = x.reshape(B, H // 2, 2, W // 2, 2, C).transpose(2, 3).reshape(B, H // 2, W // 2, 4 * C)
            weight = self.conv.weight.permute(0, 2, 3, 1).reshape(self.conv.out_channels, 4 * C)
            return F.linear(patches, weight, self.conv.bias)
        return strided_conv(self.conv, x.permute(0, 3, 1, 2), self.fast).permute(0, 2, 3, 1)


#: Tokens (pixels of the stage's map times images) per slice of the batch in CPU inference. A stage that runs
#: a batch at once allocates its activations at full batch size: for davit_tiny at batch 16, 224 px, the first
#: stage's MLP hidden map is 77 MB and its qkv 58 MB, above glibc's largest mmap threshold (32 MiB), so every
#: such buffer is mapped fresh, faulted in page by page and zeroed by the kernel on every call (107-126 k page
#: faults per forward). One 56 x 56 image per slice keeps the first stage's buffers under 5 MB, reused from
#: the heap and mostly in cache: 1.12x faster at batch 16, 1.23x at batch 64 on a 2-core Zen 4 VM
#: (docs/benchmarks.md, session 23).
INFER_CHUNK_TOKENS = 3136


def in_slices(fn: Callable[[Tensor], Tensor], x: Tensor, n: int) -> Tensor:
    """``fn(x)`` computed on slices of ``n`` images of the batch (all at once if ``n`` is 0), for functions
    that treat each image on its own."""
    if not n or n >= x.shape[0]:
        return fn(x)
    out = None
    for i in range(0, x.shape[0], n):
        y = fn(x[i : i + n])
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out[i : i + n] = y
    return out


def stem_then_stage(stem: nn.Module, stage: DaViTStage, x: Tensor) -> Tensor:
    """``stage(stem(x))`` for the first stage; in CPU inference the two run together on slices of the batch,
    so the stem's full-batch output is never allocated either."""
    r = stem.stride
    n = stage.inference_slice(x, -(-x.shape[2] // r) * -(-x.shape[3] // r), stem)
    if n:
        return in_slices(lambda t: stage._forward(stem(t)), x, n)
    return stage(stem(x))


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(has_hooks(m) for m in module.modules())


class DaViTStage(nn.Module):
    """Optional downsample, then ``depth`` dual blocks (SpatialBlock, ChannelBlock)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path_rates: Sequence[float],
        downsample: bool,
        down_kernel_size: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        channel_attn_v2: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim, dim, down_kernel_size, norm_eps) if downsample else nn.Identity()
        blocks = []
        for k in range(depth):
            blocks.append(
                nn.Sequential(
                    SpatialBlock(
                        dim, num_heads, window_size, mlp_ratio, qkv_bias, drop_path_rates[2 * k], norm_eps
                    ),
                    ChannelBlock(
                        dim,
                        num_heads,
                        mlp_ratio,
                        qkv_bias,
                        drop_path_rates[2 * k + 1],
                        channel_attn_v2,
                        norm_eps,
                    ),
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False
        self.infer_chunk_tokens = INFER_CHUNK_TOKENS

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1], x.shape[2]
        if not isinstance(self.downsample, nn.Identity):
            H, W = (H + 1) // 2, (W + 1) // 2
        return in_slices(self._forward, x, self.inference_slice(x, H * W))

    def inference_slice(self, x: Tensor, tokens: int, *before: nn.Module) -> int:
        """Images per slice of the batch ``x`` when this stage runs in CPU inference on a map of ``tokens``
        pixels per image (see INFER_CHUNK_TOKENS), or 0: the whole batch at once (training, GPU, tracing,
        compiling, or a batch that is one slice anyway). ``before``: modules that would run on the slices
        too (the stem)."""
        if (
            self.infer_chunk_tokens <= 0
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or self.training
            or any(m.training for m in before)
            or _traced()
            or torch.jit.is_scripting()
        ):
            return 0
        n = max(1, self.infer_chunk_tokens // max(1, tokens))
        if n >= x.shape[0] or any(_hooked(m) for m in (self, *before)):
            return 0  # hooks would fire once per slice
        return n

    def _forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class ClassifierHead(nn.Module):
    """Global mean pool -> LayerNorm (norm AFTER pooling, as released) -> dropout -> Linear."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:  # x: (B, H, W, C)
        x = self.drop(self.norm(x.mean(dim=(1, 2))))
        return x if pre_logits else self.fc(x)


class DaViT(nn.Module):
    """Dual Attention Vision Transformer (Ding et al., ECCV 2022).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 keeps pooling + norm and drops the Linear.
        depths: dual blocks per stage (one dual block = SpatialBlock + ChannelBlock); as many stages as
            entries (four in the paper, three in the Fashion-MNIST demo, whose fourth map would be 1x1).
        embed_dims: channels per stage.
        num_heads: window-attention heads = channel-attention groups per stage.
        window_size: spatial attention window.
        drop_path_rate: stochastic depth, linearly increasing over all 2*sum(depths) blocks
            (official schedule).
        down_kernel_size: 2 (k2 s2, released T/S/B/L) or 3 (k3 s2 p1, overlapped; paper H/G and Florence-2).
        channel_attn_v2: Florence-2 channel attention (standard q/k/v roles, N^-0.5 scale).
        stem_stride: 4 as released; the small-image variants use 2.
        conv_stem: replace the released stem (one Conv2d k7) by :class:`ConvStem` (two 3x3 convs); not in
            the paper, used by the Fashion-MNIST demo.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (1, 1, 3, 1),
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        down_kernel_size: int = 2,
        channel_attn_v2: bool = False,
        stem_stride: int = 4,
        conv_stem: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not (len(depths) == len(embed_dims) == len(num_heads)):
            raise ValueError("depths, embed_dims and num_heads must have one entry per stage")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1 (3 for RGB, 1 for grey images), got {in_chans}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.window_size = window_size
        self.stem = (ConvStem if conv_stem else Stem)(in_chans, embed_dims[0], stem_stride, norm_eps)
        n_blocks = 2 * sum(depths)
        # python-side linspace (works under a meta-device context, unlike torch.linspace().tolist())
        dpr = (
            [drop_path_rate * i / (n_blocks - 1) for i in range(n_blocks)]
            if n_blocks > 1
            else [drop_path_rate]
        )
        stages, start = [], 0
        self.feature_info: list[dict[str, Any]] = []
        for i, (d, dim, heads) in enumerate(zip(depths, embed_dims, num_heads)):
            stages.append(
                DaViTStage(
                    embed_dims[i - 1] if i else dim,
                    dim,
                    d,
                    heads,
                    window_size,
                    dpr[start : start + 2 * d],
                    downsample=i > 0,
                    down_kernel_size=down_kernel_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    channel_attn_v2=channel_attn_v2,
                    norm_eps=norm_eps,
                )
            )
            start += 2 * d
            self.feature_info.append(dict(num_chs=dim, reduction=stem_stride * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(embed_dims[-1], num_classes, drop_rate, norm_eps)
        self.apply(_init_weights)

    # ----- model surface ---------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each dual block in the backward pass instead of storing its activations."""
        for s in self.stages:
            s.grad_checkpointing = enable

    def set_inference_slices(self, tokens: int = INFER_CHUNK_TOKENS) -> None:
        """CPU inference runs each stage on slices of the batch of about ``tokens`` tokens (0: the whole
        batch at once). Same results; see INFER_CHUNK_TOKENS for why."""
        for s in self.stages:
            s.infer_chunk_tokens = int(tokens)

    def set_fast(self, enable: bool = True) -> None:
        """Select the fast attention/MLP kernels (default) or the literal reference formulations."""
        for m in self.modules():
            if hasattr(m, "fast"):
                m.fast = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: every tensor with ndim < 2 (biases, norms),
        as in the recipe."""
        return {n for n, p in self.named_parameters() if p.ndim < 2}

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier Linear with a freshly initialised one (0 removes it)."""
        self.num_classes = num_classes
        dev = self.head.norm.weight.device
        self.head.fc = (
            nn.Linear(self.num_features, num_classes, device=dev) if num_classes > 0 else nn.Identity()
        )
        if num_classes > 0:
            _init_weights(self.head.fc)

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) for a single image"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point image tensor, got {x.dtype}; convert with x.float() "
                "and normalise (e.g. /255, then mean/std)"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                f"build the model with in_chans={x.shape[1]} or convert the images"
            )
        if x.shape[0] == 0:
            raise ValueError("empty batch: the input has batch size 0")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"empty image: height and width must be >= 1, got {tuple(x.shape[2:])}")

    def _run_stages(self, x: Tensor, take: set[int] | None = None, stop: int | None = None):
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input(x)
        feats = []
        last = len(self.stages) - 1 if stop is None else stop
        for i, stage in enumerate(self.stages):
            x = stage(x) if i else stem_then_stage(self.stem, stage, x)
            if take is not None and i in take:
                feats.append(x)
            if i >= last:
                break
        return x, feats

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) image -> last-stage map (B, C4, H/32, W/32), NCHW, before pooling and head norm."""
        return self._run_stages(x)[0].permute(0, 3, 1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """NCHW last-stage map -> logits (or the pooled, normed features with ``pre_logits``)."""
        return self.head(x.permute(0, 2, 3, 1), pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        stop_early: bool = False,
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs as NCHW maps. ``indices``: last n stages if int, all if None, else those indices."""
        take = _take_indices(len(self.stages), indices)
        x, feats = self._run_stages(x, set(take), max(take) if stop_early or intermediates_only else None)
        feats = [f.permute(0, 3, 1, 2) for f in feats]
        if intermediates_only:
            return feats
        return x.permute(0, 3, 1, 2), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._run_stages(x)[0])


class FeatureInfo(list):
    """List of ``dict(num_chs, reduction, module)`` per returned map, with timm-style accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


class DaViTFeatures(nn.Module):
    """Backbone for dense prediction: the DaViT trunk returning NCHW stage maps.

    ``out_norm=True`` adds a LayerNorm on each returned stage output (the detection/segmentation form of the
    official mmdet/mmseg backbone, keys ``out_norms.{i}``). Parameter names of the trunk equal the
    classifier's, so a classification checkpoint loads with only the head keys unused.
    """

    def __init__(
        self, model: DaViT, out_indices: Sequence[int] | None = None, out_norm: bool = False
    ) -> None:
        super().__init__()
        n = len(model.stages)
        if out_indices is None:  # every stage: (0, 1, 2, 3) for the paper's models
            out_indices = range(n)
        out_indices = tuple(i % n if i < 0 else i for i in out_indices)
        if not out_indices or any(i < 0 or i >= n for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in [0, {n - 1}], got {out_indices}")
        self.out_indices = out_indices
        self.in_chans = model.in_chans
        self.stem = model.stem
        self.stages = model.stages[: max(out_indices) + 1]
        self.feature_info = FeatureInfo(model.feature_info[i] for i in out_indices)
        self.out_norms = (
            nn.ModuleList(LayerNorm(model.embed_dims[i]) for i in out_indices) if out_norm else None
        )
        self._check = model.check_input

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    set_inference_slices = DaViT.set_inference_slices

    def forward(self, x: Tensor) -> list[Tensor]:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x) if i else stem_then_stage(self.stem, stage, x)
            if i in self.out_indices:
                y = x
                if self.out_norms is not None:
                    y = self.out_norms[self.out_indices.index(i)](y)
                outs.append(y.permute(0, 3, 1, 2))
        return outs


def _take_indices(n: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: must take between 1 and {n} stages")
        return list(range(n - indices, n))
    out = sorted(i % n if i < 0 else i for i in indices)
    if any(i >= n for i in out):
        raise ValueError(f"stage indices {list(indices)} out of range for {n} stages")
    return out


def _init_weights(m: nn.Module) -> None:
    # SPEC: Linear trunc_normal(0.02) with zero bias; LayerNorm 1/0 and convs keep PyTorch defaults
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----- variant table ---------------------------------------------------------------------------------------
_T = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
_S = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
_B = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
_L = dict(depths=(1, 1, 9, 1), embed_dims=(192, 384, 768, 1536), num_heads=(6, 12, 24, 48), window_size=12)
_H = dict(depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64))
_G = dict(depths=(1, 1, 12, 3), embed_dims=(384, 768, 1536, 3072), num_heads=(12, 24, 48, 96))
_FL = dict(window_size=12, down_kernel_size=3, channel_attn_v2=True)


def _meta(
    img: int = 224,
    crop_pct: float = 0.95,
    hf_hub_id: str | None = None,
    top1: float | None = None,
    params: int | None = None,
    gmacs: float | None = None,
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
    license: str = "apache-2.0",
    **kw: Any,
) -> dict[str, Any]:
    return dict(
        input_size=(3, img, img),
        crop_pct=crop_pct,
        interpolation="bicubic",
        mean=mean,
        std=std,
        hf_hub_id=hf_hub_id,
        paper_top1=top1,
        num_params=params,
        gmacs=gmacs,
        license=license,
        **kw,
    )


# name -> (architecture kwargs, metadata). `num_params`/`gmacs` are the SPEC figures (1000-class head where
# one exists) and are checked by the tests against the built models.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "davit_tiny": (
        _T,
        _meta(hf_hub_id="timm/davit_tiny.msft_in1k", top1=82.8, params=28_360_168, gmacs=4.54),
    ),
    "davit_small": (
        _S,
        _meta(hf_hub_id="timm/davit_small.msft_in1k", top1=84.2, params=49_745_896, gmacs=8.80),
    ),
    "davit_base": (
        _B,
        _meta(hf_hub_id="timm/davit_base.msft_in1k", top1=84.6, params=87_954_408, gmacs=15.51),
    ),
    "davit_large": (_L, _meta(img=384, crop_pct=1.0, top1=87.5, params=196_811_752, gmacs=102.97)),
    # paper H/G: overlapped 3x3 downsampling, window 16, 512 px (SPEC section 1)
    "davit_huge": (
        {**_H, "window_size": 16, "down_kernel_size": 3},
        _meta(img=512, crop_pct=1.0, top1=90.2, params=362_700_000, gmacs=334.0),
    ),
    "davit_giant": (
        {**_G, "window_size": 16, "down_kernel_size": 3},
        _meta(img=512, crop_pct=1.0, top1=90.4, params=1_437_400_000, gmacs=1038.0),
    ),
    # timm's davit_huge / davit_giant: 2x2 downsampling, window 7, 224 px
    "davit_huge_k2": (_H, _meta(params=348_900_000)),
    "davit_giant_k2": (_G, _meta(params=1_406_500_000)),
    # Florence-2 vision towers: V2 channel attention, window 12, overlapped downsampling,
    # 768 px, no classifier
    "davit_base_fl": (
        {**_B, **_FL, "num_classes": 0},
        _meta(img=768, crop_pct=1.0, hf_hub_id="microsoft/Florence-2-base", license="mit"),
    ),
    "davit_huge_fl": (
        {**_H, **_FL, "num_classes": 0},
        _meta(img=768, crop_pct=1.0, hf_hub_id="microsoft/Florence-2-large", license="mit"),
    ),
    # small variants for small images and CPUs (not in the paper): stem stride 2, so a 28 px image gives
    # 14/7/4/2 maps and the 7x7 window covers stage 1; heads of 16 or 32 channels
    "davit_atto": (
        dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), stem_stride=2),
        _meta(img=32, crop_pct=1.0, license="mit"),
    ),
    "davit_femto": (
        dict(depths=(1, 1, 2, 1), embed_dims=(48, 96, 192, 384), num_heads=(3, 6, 12, 24), stem_stride=2),
        _meta(img=32, crop_pct=1.0, license="mit"),
    ),
    "davit_pico": (
        dict(depths=(1, 1, 3, 1), embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), stem_stride=2),
        _meta(img=32, crop_pct=1.0, license="mit"),
    ),
}

# The official training recipe's drop path per variant (SPEC section 5); 0 where no recipe states one.
DEFAULT_DROP_PATH = {"davit_tiny": 0.1, "davit_small": 0.2, "davit_base": 0.4}


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style ``pattern``."""
    import fnmatch

    return sorted(n for n in VARIANTS if fnmatch.fnmatch(n, pattern))


def split_name(name: str) -> tuple[str, str | None]:
    """``"davit_tiny.msft_in1k"`` -> ``("davit_tiny", "msft_in1k")``, timm's ``variant.tag`` naming;
    a plain variant name gives ``(name, None)``. The tag must be the variant's released-weights tag."""
    base, _, tag = name.partition(".")
    if not tag:
        return name, None
    _check_name(base)
    from .weights import released_tag

    have = released_tag(base)
    if tag != have:
        avail = f"its only tag is {have!r}" if have else "it has no released weights, so no tag"
        raise ValueError(
            f"unknown pretrained tag {tag!r} in {name!r}: {avail}; or use the plain name {base!r}"
        )
    return base, tag


def model_info(name: str) -> dict[str, Any]:
    """Architecture kwargs and metadata (input size, crop_pct, mean/std, params, GMACs, paper top-1)
    of a variant (``name`` may carry timm's ``.tag``)."""
    base, _tag = split_name(name)
    arch, meta = VARIANTS[_check_name(base)]
    return {"name": base, "arch": dict(arch), **meta}


def _check_name(name: str) -> str:
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    return name


def _check_options(kwargs: dict[str, Any]) -> None:
    """An architecture option DaViT does not take is named, with the closest ones it does: a typo such as
    ``windowsize=12`` otherwise surfaces as a bare TypeError from ``__init__``."""
    import inspect

    known = [p for p in inspect.signature(DaViT.__init__).parameters if p not in ("self", "kwargs")]
    for k in kwargs:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=2, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise TypeError(f"unknown model option {k!r}.{hint} Options: {', '.join(known)}")


def create_model(
    name: str,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    out_norm: bool = False,
    **kwargs: Any,
) -> DaViT | DaViTFeatures:
    """Build a DaViT variant.

    Args:
        name: one of :func:`list_models`, optionally with timm's tag (``"davit_tiny.msft_in1k"``), which
            names the weights ``pretrained=True`` fetches.
        pretrained: False; True or a tag (``"msft_in1k"``) to download the released weights through the
            Hugging Face hub cache; or a path to a local checkpoint in any layout
            :mod:`davit.weights` accepts.
        num_classes: classifier outputs (default: the variant's, 1000 or 0 for Florence-2 towers).
        in_chans: input channels.
        drop_path_rate: stochastic depth (official linear schedule over all blocks).
        features_only: return a :class:`DaViTFeatures` backbone giving NCHW stage maps.
        out_indices / out_norm: which stage maps (default: all), and a LayerNorm on each (dense-prediction
            form).
        **kwargs: architecture overrides, e.g. ``window_size=12``, ``drop_rate``.
    """
    name, tag = split_name(name)
    if tag is not None and pretrained is True:
        pretrained = tag
    arch, _meta_ = VARIANTS[_check_name(name)]
    _check_options(kwargs)
    if num_classes is not None and num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: no classifier, features only), got {num_classes}")
    cfg = {**arch, **kwargs}
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    model = DaViT(in_chans=in_chans, drop_path_rate=drop_path_rate, **cfg)
    model.pretrained_cfg = {"name": name, **_meta_}
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model, name, pretrained)
    if features_only:
        feats = DaViTFeatures(model, out_indices, out_norm)
        feats.pretrained_cfg = model.pretrained_cfg
        return feats
    return model
