"""The GEMM floor of a step: its weight-bearing layers' matrix products, replayed alone.

Every implementation of a DaViT step runs the same linear layers and dense convolutions (the stem and the
downsampling layers) with the same shapes: in a forward one GEMM each, in a training step also their input and
weight gradients. (Where a map is not a whole number of attention windows, ports differ in whether the
projections see the padding tokens; timm's do, ours' do not, and the floor is captured from the given model.)
How an implementation lays out tokens, fuses norms and activations or computes attention changes everything
else, not these products. Timed by themselves, back to back with nothing in between, they
bound how fast a step can be on this machine's GEMM library, and so how far one port can get ahead of
another: at most ``other's step / floor``, reached only if everything that is not one of these GEMMs took no
time at all.

:func:`capture_model_gemms` runs one forward with a hook on every ``nn.Linear`` and dense ``nn.Conv2d`` (the
attentions' own products and the depthwise position encodings are not counted) and writes down the calls a
plain port makes for them: a linear's forward ``addmm`` on its tokens as one (tokens, in) matrix, in training
its input gradient and weight gradient ``mm``; a convolution's ``aten.convolution`` and, in training,
``aten.convolution_backward``. :class:`GemmReplay` calls those ops again, alone, on random operands with the
same shapes and strides. All operands are views of one random buffer per dtype and device, so the replay
reads less distinct memory than the step did: if anything, the floor comes out low, which keeps the bound on
the ratio an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

aten = torch.ops.aten


@dataclass(frozen=True)
class TensorSpec:
    """What a replay needs to make an operand like the step's: its shape, strides, dtype and device."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def span(self) -> int:
        """Elements of storage the strided view reaches (0 for an empty tensor)."""
        if any(s == 0 for s in self.shape):
            return 0
        return 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))


def _contiguous(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> TensorSpec:
    stride = torch.empty(shape, device="meta").stride()  # row-major strides, no memory
    return TensorSpec(tuple(shape), stride, dtype, device)


def _transposed(spec: TensorSpec) -> TensorSpec:
    """The ``.t()`` view of a 2-D operand."""
    return TensorSpec(spec.shape[::-1], spec.stride[::-1], spec.dtype, spec.device)


@dataclass(frozen=True)
class GemmCall:
    op: Any  # aten.mm / aten.addmm / aten.convolution / aten.convolution_backward (OpOverload)
    args: tuple  # the call's arguments, each tensor as a TensorSpec
    flops: float  # 2 x the call's multiply-adds


def linear_calls(
    tokens: int,
    layer: nn.Linear,
    dtype: torch.dtype,
    device: torch.device,
    train: bool,
    dgrad: bool,
) -> list[GemmCall]:
    """The forward GEMM of ``layer`` on ``tokens`` rows, then (``train``) its gradients' GEMMs: the input
    gradient only if ``dgrad`` (the layer's input needs one)."""
    i, o = layer.in_features, layer.out_features
    x, w = _contiguous((tokens, i), dtype, device), _contiguous((o, i), dtype, device)
    flops = 2.0 * tokens * i * o
    if layer.bias is not None:
        calls = [GemmCall(aten.addmm.default, (_contiguous((o,), dtype, device), x, _transposed(w)), flops)]
    else:
        calls = [GemmCall(aten.mm.default, (x, _transposed(w)), flops)]
    if train:
        g = _contiguous((tokens, o), dtype, device)
        if dgrad:
            calls.append(GemmCall(aten.mm.default, (g, w), flops))  # (tokens, o) @ (o, i)
        calls.append(GemmCall(aten.mm.default, (_transposed(g), x), flops))  # (o, tokens) @ (tokens, i)
    return calls


def conv_calls(
    name: str, x: Tensor, out: Tensor, layer: nn.Conv2d, train: bool, dgrad: bool
) -> list[GemmCall]:
    """A dense convolution's forward, then (``train``) its backward (input gradient only if ``dgrad``)."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros" or layer.groups != 1:
        raise ValueError(
            f"{name}: only dense convolutions with numeric zero padding are counted, got {layer}"
        )
    dt, dev = out.dtype, out.device
    xs = TensorSpec(tuple(x.shape), tuple(x.stride()), dt, dev)
    ws = _contiguous(tuple(layer.weight.shape), dt, dev)
    bs = None if layer.bias is None else _contiguous(tuple(layer.bias.shape), dt, dev)
    geo = (list(layer.stride), list(layer.padding), list(layer.dilation), False, [0, 0], 1)
    flops = 2.0 * out.numel() * math.prod(layer.weight.shape[1:])
    calls = [GemmCall(aten.convolution.default, (xs, ws, bs, *geo), flops)]
    if train:
        gs = TensorSpec(tuple(out.shape), tuple(out.stride()), dt, dev)
        mask = [dgrad, True, bs is not None]
        bias_sizes = None if bs is None else list(bs.shape)
        calls.append(
            GemmCall(
                aten.convolution_backward.default,
                (gs, xs, ws, bias_sizes, *geo, mask),
                flops * (1 + dgrad),
            )
        )
    return calls


# module attributes the reference path sets: the literal formulations, and no batch slices in CPU inference
_REFERENCE_SETTINGS = {"fast": False, "infer_chunk_tokens": 0}


@contextmanager
def reference_path(model: nn.Module) -> Iterator[None]:
    """Run the model's literal reference formulations (plain aten ops) on the whole batch at once, restoring
    each module's own settings afterwards."""
    saved = [
        (m, name, getattr(m, name))
        for m in model.modules()
        for name in _REFERENCE_SETTINGS
        if hasattr(m, name)
    ]
    for m, name, _ in saved:
        setattr(m, name, _REFERENCE_SETTINGS[name])
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def capture_model_gemms(
    model: nn.Module, x: Tensor, train: bool, dtype: torch.dtype = torch.float32
) -> list[GemmCall]:
    """The GEMM calls a plain port makes for ``model``'s linears and dense convolutions in one inference
    forward (``train=False``) or one training forward + backward on ``x``, in the order it makes them.

    One forward runs (under autocast for a ``dtype`` other than fp32, with gradients on for ``train``; its
    backward is not needed: the shapes say what it would run) with a hook on every ``nn.Linear`` and every
    ``nn.Conv2d`` with ``groups == 1``. A davit model runs its reference path for it, on the whole batch, so
    that every layer is called as a module; its mode and settings are restored afterwards.
    """
    amp = dtype != torch.float32
    forward: list[GemmCall] = []
    backward: list[list[GemmCall]] = []

    def record(calls: list[GemmCall]) -> None:
        forward.append(calls[0])
        if len(calls) > 1:
            backward.append(calls[1:])

    def on_linear(layer: nn.Linear, args: tuple, out: Tensor) -> None:
        inp = args[0]
        tokens = inp.numel() // layer.in_features
        record(linear_calls(tokens, layer, out.dtype, out.device, train, inp.requires_grad))

    def on_conv(name: str):
        def hook(layer: nn.Conv2d, args: tuple, out: Tensor) -> None:
            record(conv_calls(name, args[0], out, layer, train, args[0].requires_grad))

        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(on_linear))
        elif isinstance(m, nn.Conv2d) and m.groups == 1:
            handles.append(m.register_forward_hook(on_conv(name)))
    was_training = model.training
    model.train(train)
    try:
        with reference_path(model), torch.set_grad_enabled(train):
            with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # autograd runs the layers' backward in the reverse order of their forward
    return forward + [c for calls in reversed(backward) for c in calls]


class GemmReplay:
    """Calls the captured GEMMs again, alone, on random operands with the captured shapes and strides."""

    def __init__(self, calls: list[GemmCall], seed: int = 0) -> None:
        if not calls:
            raise ValueError(
                "no GEMM calls to replay: the model has no nn.Linear or dense nn.Conv2d that ran"
            )
        self.calls = calls
        spans: dict[tuple[torch.dtype, torch.device], int] = {}
        for c in calls:
            for a in c.args:
                if isinstance(a, TensorSpec):
                    key = (a.dtype, a.device)
                    spans[key] = max(spans.get(key, 0), a.span)
        gen = torch.Generator().manual_seed(seed)
        buffers = {
            (dt, dev): torch.randn(n, generator=gen).to(device=dev, dtype=dt)
            for (dt, dev), n in spans.items()
        }

        def operand(a: Any) -> Any:
            if isinstance(a, TensorSpec):
                return buffers[(a.dtype, a.device)].as_strided(a.shape, a.stride)
            return a

        self._bound = [(c.op, tuple(operand(a) for a in c.args)) for c in calls]

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.calls)

    def __call__(self) -> None:
        with torch.no_grad():
            for op, args in self._bound:
                op(*args)
