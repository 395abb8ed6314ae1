"""The oneDNN linear operator of training and compiled code (davit.layers.fused) equals F.linear, forward and
backward, and its registration (fake tensor rule, autograd) is what torch.compile and opcheck expect."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import davit
from davit.layers import fused, native

pytestmark = pytest.mark.skipif(not fused._MKLDNN, reason="this PyTorch build has no oneDNN linear kernel")


@pytest.fixture(autouse=True)
def _onednn_training_on():
    """The ops' tests run on every CPU; which CPUs use them by default is tested separately."""
    previous = fused.set_onednn_training(True), fused.set_onednn_compiled_inference(True)
    yield
    fused.set_onednn_training(previous[0])
    fused.set_onednn_compiled_inference(previous[1])


@pytest.mark.parametrize(
    "vendor,capability,expected",
    [
        ("AuthenticAMD", "AVX512", True),  # MKL stays on AVX2 there: oneDNN's AVX-512 GEMMs pay
        ("GenuineIntel", "AVX512", False),  # MKL runs AVX-512 itself: the op only adds overhead (4-11 %)
        ("AuthenticAMD", "AVX2", False),
        ("", "DEFAULT", False),
    ],
)
def test_default_onednn_training_by_cpu(monkeypatch, vendor, capability, expected):
    monkeypatch.delenv("DAVIT_ONEDNN_TRAINING", raising=False)
    assert fused.default_onednn_training(vendor, capability) is expected


def test_default_onednn_training_env_override(monkeypatch):
    monkeypatch.setenv("DAVIT_ONEDNN_TRAINING", "1")
    assert fused.default_onednn_training("GenuineIntel", "AVX512") is True
    monkeypatch.setenv("DAVIT_ONEDNN_TRAINING", "0")
    assert fused.default_onednn_training("AuthenticAMD", "AVX512") is False
    monkeypatch.setenv("DAVIT_ONEDNN_TRAINING", "yes")
    with pytest.warns(UserWarning, match="DAVIT_ONEDNN_TRAINING='yes' ignored: set it to 1 .* or 0"):
        assert fused.default_onednn_training("GenuineIntel", "AVX512") is False


@pytest.mark.parametrize(
    "capability,expected",
    # measured on Zen 4, Zen 5 and Intel with AMX; AVX2 emulated on Zen 4
    [("AVX512", True), ("AVX2", True), ("DEFAULT", False)],
)
def test_default_onednn_compiled_inference_by_cpu(monkeypatch, capability, expected):
    monkeypatch.delenv("DAVIT_ONEDNN_COMPILED_INFERENCE", raising=False)
    assert fused.default_onednn_compiled_inference(capability) is expected
    monkeypatch.setenv("DAVIT_ONEDNN_COMPILED_INFERENCE", "0" if expected else "1")
    assert fused.default_onednn_compiled_inference(capability) is not expected
    monkeypatch.setenv("DAVIT_ONEDNN_COMPILED_INFERENCE", "on")
    with pytest.warns(UserWarning, match="DAVIT_ONEDNN_COMPILED_INFERENCE='on' ignored"):
        assert fused.default_onednn_compiled_inference(capability) is expected


def test_compiled_inference_and_training_settings_are_separate(monkeypatch):
    """Compiled inference follows its own setting and training its own: on Intel AVX-512 CPUs the defaults
    differ (oneDNN in compiled inference, F.linear in training)."""
    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=5, stem_stride=4).eval()
    x = torch.randn(2, 3, 32, 32)
    ops = torch.ops.davit
    fused.set_onednn_training(False)  # the fixture restores both settings
    with torch.no_grad():
        targets, _ = _graph_targets(model, x)
    assert ops.onednn_linear_add.default in targets, "compiled inference left oneDNN with training's setting"
    torch._dynamo.reset()
    targets, _ = _graph_targets(model, x)  # gradients on: training's setting, F.linear
    assert not {op for op in targets if "onednn" in str(op)}, targets
    fused.set_onednn_training(True)
    fused.set_onednn_compiled_inference(False)
    torch._dynamo.reset()
    with torch.no_grad():
        targets, _ = _graph_targets(model, x)
    assert not {op for op in targets if "onednn" in str(op)}, targets
    torch._dynamo.reset()
    targets, _ = _graph_targets(model, x)
    assert ops.onednn_linear.default in targets


@pytest.mark.parametrize("shape", [(37, 24), (2, 9, 24), (3, 5, 7, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_forward_and_grads_equal_f_linear(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    up = torch.randn(*shape[:-1], 40)
    out = fused.onednn_linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x, w] + ([b] if bias else [])
    g = torch.autograd.grad((out * up).sum(), params)
    g_ref = torch.autograd.grad((ref * up).sum(), params)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def _assert_product_within_bound(got, a, b):
    """``got`` equals ``a @ b`` within the error bound of any fp32 summation order of its k products (``k u
    sum |a b|``, u = 2^-24) from the float64 product: oneDNN's convolutions sum in another order than MKL's
    ``mm``, and in AVX2 code (emulated, session 49) a weight gradient over 300 tokens differed from it by
    1.5e-5 where an element cancelled to 0.32, beyond a fixed 1e-5."""
    exact = a.double() @ b.double()
    bound = a.shape[-1] * 2.0**-24 * (a.double().abs() @ b.double().abs())
    assert got.shape == exact.shape
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("mkn", [(37, 24, 40), (1, 8, 3), (300, 96, 5)])
def test_weight_grad_as_conv_equals_mm(mkn):
    m, k, n = mkn
    torch.manual_seed(0)
    g, x = torch.randn(m, n), torch.randn(m, k)
    _assert_product_within_bound(fused._weight_grad(g, x), g.t(), x)
    _assert_product_within_bound(g.t() @ x, g.t(), x)


@pytest.mark.parametrize("mkn", [(37, 24, 40), (1, 8, 3), (300, 96, 5)])
@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)])
def test_conv_grads_equal_matmuls(mkn, mask):
    """The eager backward's input and weight gradients from one 1x1 convolution backward: either or both."""
    m, k, n = mkn
    torch.manual_seed(0)
    g, x, w = torch.randn(m, n), torch.randn(m, k), torch.randn(n, k)
    gx, gw = fused._conv_grads(g, x, w, *mask)
    assert (gx is not None, gw is not None) == mask
    if mask[0]:
        assert gx.shape == (m, k)
        torch.testing.assert_close(gx, g @ w, rtol=1e-5, atol=1e-5)
    if mask[1]:
        _assert_product_within_bound(gw, g.t(), x)


@pytest.mark.skipif(not fused._MKLDNN, reason="torch built without oneDNN")
@pytest.mark.parametrize("mkn", [(37, 24, 40), (1, 8, 3), (300, 96, 5), (1031, 384, 96)])
@pytest.mark.parametrize("strided", [False, True])
def test_input_grad_equals_matmul(mkn, strided):
    """The training linears' input gradient as oneDNN's linear on the transposed weight (read as a view):
    ``g @ w`` to fp32 round-off, for contiguous and transposed (non-contiguous) ``g``."""
    m, k, n = mkn
    torch.manual_seed(0)
    w = torch.randn(n, k)
    g = torch.randn(n, m).t() if strided else torch.randn(m, n)
    gx = fused._input_grad(g, w)
    assert gx.shape == (m, k) and gx.is_contiguous()
    ref = g.double() @ w.double()
    bound = 4 * n * 2.0**-24 * (g.double().abs() @ w.double().abs())
    assert ((gx.double() - ref).abs() <= bound).all()


def test_onednn_linear_frozen_weight_and_frozen_input():
    """Gradients for the input only (a frozen layer inside a trained model) and the weight only."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 24), torch.randn(40, 24), torch.randn(40)
    up = torch.randn(2, 7, 40)
    for x_grad in (True, False):
        xs, ws = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(not x_grad)
        wanted = xs if x_grad else ws
        got = torch.autograd.grad((fused.onednn_linear(xs, ws, b) * up).sum(), wanted)[0]
        xr, wr = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(not x_grad)
        ref = torch.autograd.grad((F.linear(xr, wr, b) * up).sum(), xr if x_grad else wr)[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_large_weights_take_the_mm_weight_grad(monkeypatch):
    """Above _MAX_CONV_WGRAD weight elements the weight gradient is ``mm`` (the conv's scratch buffer would
    raise the peak memory): both branches give F.linear's gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 11, 24)
    w = torch.randn(40, 24, requires_grad=True)
    up = torch.randn(3, 11, 40)
    ref = torch.autograd.grad((F.linear(x, w) * up).sum(), w)[0]
    for bound in (1 << 20, 0):
        monkeypatch.setattr(fused, "_MAX_CONV_WGRAD", bound)
        got = torch.autograd.grad((fused.onednn_linear(x, w, None) * up).sum(), w)[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_onednn_linear_non_contiguous_input():
    torch.manual_seed(0)
    x = torch.randn(6, 24, 10).transpose(1, 2)  # (6, 10, 24), not contiguous
    w, b = torch.randn(16, 24), torch.randn(16)
    torch.testing.assert_close(fused.onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_onednn_linear_opcheck():
    """PyTorch's own check of a custom op: schema, fake tensor rule, autograd registration, AOT dispatch."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8, requires_grad=True)
    w = torch.randn(12, 8, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    torch.library.opcheck(fused.onednn_linear, (x, w, b))
    torch.library.opcheck(fused.onednn_linear, (x, w, None))


def _train_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_model_training_onednn_equals_plain_linear(monkeypatch):
    """Every linear of a training step through oneDNN (size threshold off) against F.linear: same logits and
    gradients to fp32 rounding."""
    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=7, stem_stride=4)
    x = torch.randn(2, 3, 60, 44)
    calls = []
    real = fused.onednn_linear
    monkeypatch.setattr(fused, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    out, g = _train_grads(model, x)
    assert calls, "the training step did not go through the oneDNN linear"
    fused.set_onednn_training(False)  # the fixture restores the setting
    n = len(calls)
    out_ref, g_ref = _train_grads(model, x)
    assert len(calls) == n, "set_onednn_training(False) still used the oneDNN linear"
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler: no native bias + GELU")
def test_training_runs_each_mlp_as_one_function(monkeypatch, aot_capture):
    """CPU fp32 training runs every MLP (whole maps and the chunks of large ones) as :func:`train_mlp`, whose
    backward multiplies by GELU's derivative in fc2's input-gradient GEMM: eager as one autograd function,
    compiled (fullgraph) as the opaque ``davit::train_mlp`` with ``davit::mlp_hidden_grad`` in its backward,
    with the outputs and gradients of the three-op path and of the reference path; with the setting off,
    without gradients, or with a hook on fc2 (which then fires) it does not."""
    from davit.layers import blocks

    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=7).train()
    mlps = [m for m in model.modules() if isinstance(m, blocks.Mlp)]
    x = torch.randn(2, 3, 45, 33)
    calls = []
    real = fused.train_mlp
    monkeypatch.setattr(blocks, "train_mlp", lambda x, *a: calls.append(x.shape) or real(x, *a))
    out, g = _train_grads(model, x)
    assert len(calls) == len(mlps)
    model.set_fast(False)
    out_ref, g_ref = _train_grads(model, x)
    model.set_fast(True)
    fused.set_train_mlp(False)
    try:
        out_ops, g_ops = _train_grads(model, x)
    finally:
        fused.set_train_mlp(True)
    assert len(calls) == len(mlps)
    for o, grads in ((out_ref, g_ref), (out_ops, g_ops)):
        torch.testing.assert_close(out, o, rtol=1e-5, atol=1e-5)
        for a, r in zip(g, grads):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    # compiled: the forward graph holds the op once per MLP, the backward graph the hidden-gradient op
    graphs, out_c, g_c = _aot_graphs(aot_capture, model, x)
    fw, bw = graphs["forward"], graphs["backward"]
    assert _count(fw, torch.ops.davit.train_mlp.default) == len(mlps)
    assert _count(bw, torch.ops.davit.mlp_hidden_grad.default) == len(mlps)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    for a, r in zip(g_c, g):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    # chunks of at most 32 tokens in the first stages
    monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 32)
    calls.clear()
    out_chunks, g_chunks = _train_grads(model, x)
    assert len(calls) > len(mlps) and max(c[0] for c in calls) == 32
    torch.testing.assert_close(out_chunks, out, rtol=1e-5, atol=1e-5)
    for a, r in zip(g_chunks, g):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 1 << 30)
    calls.clear()
    with torch.no_grad():
        model(x)
    assert calls == []
    seen = []
    handle = mlps[0].fc2.register_forward_hook(lambda *a: seen.append(1))
    try:
        _train_grads(model, x)
    finally:
        handle.remove()
    assert seen == [1] and len(calls) == len(mlps) - 1


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler: no native bias + GELU")
def test_training_with_plain_linears_runs_each_mlp_as_one_function(monkeypatch, aot_capture):
    """Where oneDNN's training linears are off, CPU fp32 training with the plain setting on (AVX2 CPUs'
    default) runs every MLP as :func:`train_mlp` on ``F.linear``'s GEMMs, with the outputs and gradients of
    the three ops and of the reference path, whole and in chunks; compiled (fullgraph) as the opaque
    ``davit::train_mlp`` with its backward in the open (no ``davit::mlp_hidden_grad``); with the setting off,
    without gradients, or below the size floor, it does not."""
    from davit.layers import blocks

    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    fused.set_onednn_training(False)  # the fixture restores it
    previous = fused.set_plain_train_mlp(True)
    try:
        torch.manual_seed(0)
        model = davit.create_model("davit_atto", num_classes=7).train()
        mlps = [m for m in model.modules() if isinstance(m, blocks.Mlp)]
        x = torch.randn(2, 3, 45, 33)
        plain = []
        real = fused._TrainMlp.apply
        monkeypatch.setattr(fused._TrainMlp, "apply", lambda *a: plain.append(a[-1]) or real(*a))
        out, g = _train_grads(model, x)
        assert plain == [True] * len(mlps)
        model.set_fast(False)
        out_ref, g_ref = _train_grads(model, x)
        model.set_fast(True)
        fused.set_plain_train_mlp(False)
        out_ops, g_ops = _train_grads(model, x)
        assert len(plain) == len(mlps), "set_plain_train_mlp(False) still ran the function"
        fused.set_plain_train_mlp(True)
        for o, grads in ((out_ref, g_ref), (out_ops, g_ops)):
            torch.testing.assert_close(out, o, rtol=1e-5, atol=1e-5)
            for a, r in zip(g, grads):
                torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
        # compiled: the op once per MLP, flagged plain, and its backward traced in the open
        torch._dynamo.reset()
        graphs, out_c, g_c = _aot_graphs(aot_capture, model, x)
        ops = [n for n in graphs["forward"].graph.nodes if n.target == torch.ops.davit.train_mlp.default]
        assert len(ops) == len(mlps) and all(n.args[5] is True for n in ops)
        assert _count(graphs["backward"], torch.ops.davit.mlp_hidden_grad.default) == 0
        torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
        for a, r in zip(g_c, g):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
        monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 32)
        plain.clear()
        out_chunks, g_chunks = _train_grads(model, x)
        assert len(plain) > len(mlps) and set(plain) == {True}
        torch.testing.assert_close(out_chunks, out, rtol=1e-5, atol=1e-5)
        for a, r in zip(g_chunks, g):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
        monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 1 << 30)
        fc1 = mlps[0].fc1
        h = torch.randn(5, fc1.in_features)
        assert fused.plain_train_mlp(h, fc1)
        with torch.no_grad():
            assert not fused.plain_train_mlp(h, fc1)
        monkeypatch.setattr(fused, "_MIN_MACS", 5 * fc1.in_features * fc1.out_features + 1)
        assert not fused.plain_train_mlp(h, fc1)
        fused.set_plain_train_mlp(False)
        monkeypatch.setattr(fused, "_MIN_MACS", 0)
        assert not fused.plain_train_mlp(h, fc1)
    finally:
        fused.set_plain_train_mlp(previous)
        torch._dynamo.reset()


@pytest.mark.parametrize("capability,expected", [("AVX2", True), ("AVX512", False), ("DEFAULT", False)])
def test_default_plain_train_mlp_by_cpu(capability, expected):
    assert fused.default_plain_train_mlp(capability) is expected


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler: no native bias + GELU")
@pytest.mark.parametrize("bias", [True, False])
def test_train_mlp_ops_opcheck(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w1, w2 = (torch.randn(64, 16) / 4).requires_grad_(), (torch.randn(16, 64) / 8).requires_grad_()
    b1, b2 = (torch.randn(64).requires_grad_(), torch.randn(16).requires_grad_()) if bias else (None, None)
    torch.library.opcheck(fused.train_mlp_op, (x, w1, b1, w2, b2))
    g, d = torch.randn(10, 16), torch.randn(10, 64)
    torch.library.opcheck(fused.mlp_hidden_grad, (g, d, w2.detach()))
    torch.testing.assert_close(fused.mlp_hidden_grad(g, d, w2.detach()), (g @ w2.detach()) * d)
    y = fused.train_mlp_op(x, w1, b1, w2, b2)[0]
    want = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    params = [t for t in (x, w1, b1, w2, b2) if t is not None]
    gy = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(want, params, gy)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_small_linears_and_other_dtypes_keep_f_linear():
    layer = torch.nn.Linear(32, 96)
    assert not fused.onednn_training(torch.randn(64, 49, 32), layer)  # the demo's stage-1 qkv: 9.6 M MACs
    assert fused.onednn_training(torch.randn(64, 196, 32), layer)
    assert not fused.onednn_training(torch.randn(64, 196, 32, dtype=torch.float64), layer.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.onednn_training(torch.randn(64, 196, 32), layer)


def test_compiled_training_step_fullgraph_with_onednn_linear(monkeypatch):
    """dynamo traces the custom op (fake tensor rule) and AOT autograd differentiates it (aot_eager: the
    graphs inductor would get, without its minutes of C++ compilation)."""
    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=5, stem_stride=4)
    x = torch.randn(2, 3, 32, 32)
    out_ref, g_ref = _train_grads(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, g = _train_grads(compiled, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("input_grad", [False, True])
def test_compiled_backward_keeps_the_conv_grads_opaque(monkeypatch, aot_capture, input_grad):
    """Under torch.compile the linear's gradients are opaque ops (``davit::conv_weight_grad`` for the weight
    alone, ``davit::conv_linear_grads`` for input and weight), not the convolution's views traced in the
    open (inductor relaid those out into transposed copies). Same gradients as eager code."""
    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    backend, graphs = aot_capture
    backward_graphs = graphs["backward"]
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, requires_grad=input_grad)
    w = torch.randn(40, 24, requires_grad=True)
    up = torch.randn(3, 7, 40)

    def loss(x, w):
        return (fused.onednn_linear(x, w, None) * up).sum()

    wanted = (x, w) if input_grad else (w,)
    eager = torch.autograd.grad(loss(x, w), wanted)
    compiled = torch.autograd.grad(torch.compile(loss, backend=backend, fullgraph=True)(x, w), wanted)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(eager[-1], (up.reshape(-1, 40).t() @ x.reshape(-1, 24)), rtol=1e-5, atol=1e-4)
    if input_grad:
        torch.testing.assert_close(eager[0], up @ w, rtol=1e-5, atol=1e-4)
    (graph,) = backward_graphs
    targets = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    op = torch.ops.davit.conv_linear_grads if input_grad else torch.ops.davit.conv_weight_grad
    assert op.default in targets, targets
    assert torch.ops.aten.convolution_backward.default not in targets, targets


def test_conv_linear_grads_opcheck():
    torch.manual_seed(0)
    for weight_grad in (True, False):
        args = (torch.randn(30, 16), torch.randn(30, 8), torch.randn(16, 8), weight_grad)
        torch.library.opcheck(fused.conv_linear_grads, args)


@pytest.mark.skipif(not fused._MKLDNN, reason="torch built without oneDNN")
def test_linear_input_grad_opcheck():
    torch.manual_seed(0)
    torch.library.opcheck(fused.linear_input_grad, (torch.randn(30, 16), torch.randn(16, 8)))


def test_conv_weight_grad_opcheck():
    torch.manual_seed(0)
    torch.library.opcheck(fused.conv_weight_grad, (torch.randn(30, 16), torch.randn(30, 8)))


# how inference runs its linears: oneDNN's fused kernels, MKL's GEMMs with in-place epilogues (the Intel
# AVX-512 default of eager inference), or oneDNN with packed weights (opt-in in eager inference, the default
# in compiled inference's opaque ops, which the tests below call directly: both settings follow ``packed``)
GEMM_PATHS = [(True, False), (False, False), (False, True)]


@pytest.mark.parametrize("onednn_gemms,packed", GEMM_PATHS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_inference_ops_opcheck_and_values(bias, onednn_gemms, packed, monkeypatch):
    monkeypatch.setattr(fused, "_INFER_ONEDNN_GEMMS", onednn_gemms)
    monkeypatch.setattr(fused, "_PACKED_WEIGHTS", packed)
    monkeypatch.setattr(fused, "_COMPILED_PACKED", packed)
    torch.manual_seed(0)
    x, other = torch.randn(3, 5, 8), torch.randn(3, 5, 12)
    w, b = torch.randn(12, 8), torch.randn(12) if bias else None
    torch.library.opcheck(fused.onednn_linear_gelu, (x, w, b))
    torch.library.opcheck(fused.onednn_linear_add, (x, other, w, b))
    torch.testing.assert_close(fused.onednn_linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
    torch.testing.assert_close(fused.onednn_linear_add(x, other, w, b), F.linear(x, w, b) + other)


@pytest.mark.parametrize("capability,apart", [("AVX512", False), ("AVX2", True), ("DEFAULT", True)])
def test_gelu_apart_from_the_gemm_where_not_avx512(capability, apart):
    # oneDNN's GELU epilogue in AVX2 code ran at 0.76-0.90x the GEMM then the native bias + GELU (session 48)
    assert fused.default_gelu_apart(capability) is apart


@pytest.mark.parametrize("bias", [True, False])
def test_inference_gelu_apart_equals_the_fused_linear(bias, monkeypatch):
    calls = []
    real = native.bias_gelu_

    def spy(a, b):
        calls.append(tuple(a.shape))
        return real(a, b)

    monkeypatch.setattr(native, "bias_gelu_", spy)
    x = torch.randn(3, 5, 8)
    w, b = torch.randn(32, 8), torch.randn(32) if bias else None
    previous = fused.set_gelu_apart(True)
    try:
        with torch.inference_mode():
            apart = fused.infer_linear(x, w, b, "gelu")
            fused.infer_linear(x, w[:12], None if b is None else b[:12], "gelu")  # width 12: fused
            fused.set_gelu_apart(False)
            fused_out = fused.infer_linear(x, w, b, "gelu")
    finally:
        fused.set_gelu_apart(previous)
    assert calls == [(3, 5, 32)] and native.native_library() is not None
    torch.testing.assert_close(apart, F.gelu(F.linear(x, w, b)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apart, fused_out, atol=1e-5, rtol=1e-5)


def test_model_inference_with_gelu_apart_equals_reference():
    m = davit.create_model("davit_atto", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    previous = fused.set_gelu_apart(True)
    try:
        with torch.inference_mode():
            apart = m(x)
            fused.set_gelu_apart(False)
            fused_out = m(x)
            m.set_fast(False)
            ref = m(x)
    finally:
        fused.set_gelu_apart(previous)
    assert (apart - ref).abs().max().item() <= 1e-5
    assert (apart - fused_out).abs().max().item() <= 1e-5


def _graph_targets(model, x, dynamic=None):
    """The call targets of the graph dynamo captures from ``model(x)`` (fullgraph), and the output."""
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(model, backend=capture, fullgraph=True, dynamic=dynamic)(x)
    (graph,) = graphs
    return {n.target for n in graph.graph.nodes if n.op == "call_function"}, out


@pytest.mark.parametrize("onednn_gemms,packed", GEMM_PATHS)
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_inference_ops_opcheck_and_values(bias, onednn_gemms, packed, monkeypatch):
    """The norm + MLP and norm + attention ops of compiled inference equal their plain compositions, also
    where the chunks (here of 10 tokens) do not divide the rows, windows or images, and for any layout of
    the input."""
    from davit.layers import attention as A

    monkeypatch.setattr(fused, "INFER_OP_CHUNK_TOKENS", 10)
    monkeypatch.setattr(fused, "_INFER_ONEDNN_GEMMS", onednn_gemms)
    monkeypatch.setattr(fused, "_PACKED_WEIGHTS", packed)
    monkeypatch.setattr(fused, "_COMPILED_PACKED", packed)
    torch.manual_seed(0)
    C, eps = 8, 1e-5
    nw, nb = (torch.randn(C), torch.randn(C)) if bias else (None, None)  # with and without affine norms

    def norm(t):
        return F.layer_norm(t, (C,), nw, nb, eps)

    x = torch.randn(5, 7, C)
    w1, w2 = torch.randn(4 * C, C) * 0.3, torch.randn(C, 4 * C) * 0.3
    b1, b2 = (torch.randn(4 * C), torch.randn(C)) if bias else (None, None)
    torch.library.opcheck(fused.onednn_norm_mlp_add, (x, nw, nb, eps, w1, b1, w2, b2))
    mlp = x + F.linear(F.gelu(F.linear(norm(x), w1, b1)), w2, b2)
    torch.testing.assert_close(fused.onednn_norm_mlp_add(x, nw, nb, eps, w1, b1, w2, b2), mlp)
    # the input in another layout (the blocks pass contiguous maps; the op must not depend on it)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(fused.onednn_norm_mlp_add(x_t, nw, nb, eps, w1, b1, w2, b2), mlp)

    wq, bq = torch.randn(3 * C, C) * 0.3, (torch.randn(3 * C) if bias else None)
    for maps, (Hp, Wp) in [
        (torch.randn(3, 5, 9, C), (8, 12)),  # padded to 8 x 12 by windows of 4: chunks of one image
        (torch.randn(3, 4, 8, C).permute(0, 2, 1, 3).transpose(1, 2), (4, 8)),  # no padding, strided input
    ]:
        H, W = maps.shape[1:3]
        args = (maps, nw, nb, eps, wq, bq, 2, 4)
        torch.library.opcheck(A.onednn_window_attention_map, args)
        padded = F.pad(norm(maps), (0, 0, 0, Wp - W, 0, Hp - H))  # zero tokens after the norm, as the release
        ref = A.window_attention_ref(F.linear(A.window_partition(padded, 4), wq, bq), 2)
        ref = A.window_reverse(ref, 4, Hp, Wp)[:, :H, :W]
        torch.testing.assert_close(A.onednn_window_attention_map(*args), ref)
    for groups, v2 in [(2, False), (2, True), (1, False)]:  # per-group and batched fast paths, V1 and V2
        tokens = torch.randn(5, 4, C)  # 5 images of 4 tokens: chunks of 2 images
        args = (tokens, nw, nb, eps, wq, bq, groups, v2)
        torch.library.opcheck(A.onednn_channel_attention, args)
        ref = A.channel_attention_ref(F.linear(norm(tokens), wq, bq), groups, v2)
        torch.testing.assert_close(A.onednn_channel_attention(*args), ref)


CHUNKED_OPS = ("onednn_norm_mlp_add", "onednn_window_attention_map", "onednn_channel_attention")


def _layer_norms(gm) -> int:
    """How many layer norms the captured graph ``gm`` runs in the open."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is F.layer_norm)


def test_compiled_inference_runs_norms_mlps_and_attentions_as_chunked_ops(monkeypatch):
    """Compiled CPU inference runs each block's norm with its MLP branch or its attention (qkv + attention) as
    one opaque op on chunks and the projections + residual adds as the fused linear, with the eager logits
    (also with chunks of one window or one image); a hooked norm stays in the graph (its hook fires); with
    gradients on, the plain differentiable linear instead."""
    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=5, stem_stride=4).eval()
    x = torch.randn(2, 3, 32, 32)
    ops = torch.ops.davit
    chunked = {getattr(ops, name).default for name in CHUNKED_OPS}
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        ref = model(x)
        targets, out = _graph_targets(model, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert chunked <= targets, targets
        assert ops.onednn_linear_add.default in targets, targets
        torch._dynamo.reset()
        torch.compile(model, backend=capture, fullgraph=True)(x)
        # the blocks' norms are inside the ops: left are the stem's, the downsamplings' and the head's, and
        # the first norm of the spatial blocks whose maps (4, 2 and 1 px) are smaller than a window
        n_open = 1 + (len(model.stages) - 1) + 1 + sum(len(s.blocks) for s in model.stages[1:])
        assert _layer_norms(graphs[-1]) == n_open
        torch._dynamo.reset()
        monkeypatch.setattr(fused, "INFER_OP_CHUNK_TOKENS", 1)
        _, out = _graph_targets(model, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        seen = []
        block = model.stages[0].blocks[0][1]  # a channel block
        handle = block.norm2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        try:
            out = torch.compile(model, backend=capture, fullgraph=True)(x)
        finally:
            handle.remove()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert seen, "the hooked norm ran inside an opaque op"
        assert _layer_norms(graphs[-1]) == n_open + 1
    torch._dynamo.reset()
    targets, _ = _graph_targets(model, x)  # gradients enabled: the ops have no autograd formula
    assert not (chunked | {ops.onednn_linear_add.default, ops.onednn_linear_gelu.default}) & targets
    assert ops.onednn_linear.default in targets


def test_symbolic_size_inference_runs_window_attention_on_whole_maps(monkeypatch):
    """With symbolic image sizes compiled CPU inference runs each window attention as the map-level op (norm,
    pad, partition, attend and reverse inside, per image) instead of the index gathers, with the eager logits
    at a size whose maps need padding; so do static graphs, except on a map smaller than one window."""
    monkeypatch.setattr(fused, "_MIN_MACS", 0)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=5).eval()
    ops = torch.ops.davit
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, 50, 66)
            ref = model(x)
            targets, out = _graph_targets(model, x, dynamic=True)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert ops.onednn_window_attention_map.default in targets, targets
            assert torch.ops.aten.index_select.default not in targets, targets  # no gathers left
            torch._dynamo.reset()
            targets, out = _graph_targets(model, x, dynamic=False)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert ops.onednn_window_attention_map.default in targets
            # at 12 px every map is smaller than a window (6, 3, 2, 1 px): the one-padded attention instead
            torch._dynamo.reset()
            x = torch.randn(2, 3, 12, 12)
            targets, out = _graph_targets(model, x, dynamic=False)
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
            assert ops.onednn_window_attention_map.default not in targets
            assert ops.onednn_channel_attention.default in targets
    finally:
        torch._dynamo.reset()


# ----- convolutions as opaque ops in compiled CPU code ------------------------------------------------------
CONV_CASES = [  # (B, C, H, W), channels-last input, (out, in/groups, k, k), stride, padding, groups
    ((2, 6, 9, 7), True, (6, 1, 3, 3), 1, 1, 6),  # position encoding: depthwise on a permuted NHWC map
    ((2, 3, 19, 13), False, (8, 3, 7, 7), 4, 3, 1),  # stem: NCHW images
    ((2, 4, 6, 8), True, (10, 4, 2, 2), 2, 0, 1),  # downsampling
    ((3, 5, 1, 1), True, (5, 1, 3, 3), 1, 1, 5),  # a one-pixel map: size-one dimensions, ambiguous strides
    ((2, 1, 9, 9), False, (4, 1, 7, 7), 4, 3, 1),  # one input channel (grey images)
]


def _conv_inputs(shape, channels_last, wshape, bias):
    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as the blocks pass their maps
    w = torch.randn(wshape) * 0.3
    b = torch.randn(wshape[0]) if bias else None
    return x, w, b


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_op_opcheck_and_values(case, bias):
    """The fake kernel gives the real kernel's shapes and strides (inductor asserts them at run time: a
    mismatch on small maps failed the first prototype), and values and gradients are F.conv2d's."""
    shape, channels_last, wshape, stride, padding, groups = case
    x, w, b = _conv_inputs(shape, channels_last, wshape, bias)
    args = [stride, stride], [padding, padding], groups
    x.requires_grad_(), w.requires_grad_()
    if bias:
        b.requires_grad_()
    torch.library.opcheck(fused.conv2d, (x, w, b, *args))
    out = fused.conv2d(x, w, b, *args)
    ref = F.conv2d(x, w, b, stride, padding, 1, groups)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(ref)
    params = [x, w] + ([b] if bias else [])
    grads, ref_grads = (torch.autograd.grad((y * up).sum(), params) for y in (out, ref))
    for g, gr in zip(grads, ref_grads):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)
    grad = up if not channels_last else up.contiguous(memory_format=torch.channels_last)
    mask = [True, True, bias]
    torch.library.opcheck(fused.conv2d_backward, (grad, x.detach(), w.detach(), *args, mask))


def _aot_graphs(aot_capture, model, x):
    """The latest forward and backward graphs the ``aot_capture`` backend kept for a compiled training step
    of ``model``, and that step's output and grads."""
    backend, graphs = aot_capture
    before = {kind: len(kept) for kind, kept in graphs.items()}
    out, grads = _train_grads(torch.compile(model, backend=backend, fullgraph=True), x)
    # a step that compiled nothing (dynamo's cache) would leave the previous call's graphs as the latest
    new = all(len(kept) > before[kind] for kind, kept in graphs.items())
    assert new, "the compiled step made no new graphs: torch._dynamo.reset() before compiling again"
    return {kind: kept[-1] for kind, kept in graphs.items()}, out, grads


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_compiled_cpu_graphs_hold_no_aten_convolution(aot_capture):
    """Compiled CPU fp32 code runs the stem, downsampling and position-encoding convolutions as the opaque
    ``davit::conv2d`` (backward ``davit::conv2d_backward``): no ``aten.convolution`` is left, so inductor's
    layout optimisation (on for any CPU graph with one) stays off. Same output and gradients as eager; with
    the ops switched off the graph holds the aten convolution and inductor would re-lay it out."""
    from torch._inductor.graph import GraphLowering

    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=5, stem_stride=4)
    x = torch.randn(2, 3, 40, 36)
    out_ref, g_ref = _train_grads(model, x)
    graphs, out, grads = _aot_graphs(aot_capture, model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    fw, bw = _targets(graphs["forward"]), _targets(graphs["backward"])
    assert torch.ops.davit.conv2d.default in fw and torch.ops.aten.convolution.default not in fw, fw
    assert torch.ops.davit.conv2d_backward.default in bw, bw
    assert torch.ops.aten.convolution_backward.default not in bw, bw
    assert not GraphLowering.decide_layout_opt(graphs["forward"], is_inference=False)

    torch._dynamo.reset()
    previous = fused.set_opaque_convs(False)
    try:
        graphs, _, _ = _aot_graphs(aot_capture, model, x)
    finally:
        fused.set_opaque_convs(previous)
    assert torch.ops.aten.convolution.default in _targets(graphs["forward"])
    if torch.backends.mkldnn.is_available():
        assert GraphLowering.decide_layout_opt(graphs["forward"], is_inference=False)


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target == target for n in gm.graph.nodes)


def test_compiled_training_adds_biases_apart(monkeypatch, aot_capture):
    """Compiled CPU fp32 training computes each biased linear whose consumer takes a fused add (MLP, output
    projections, the channel attention's qkv) as a matmul plus a separate add, which inductor folds into the
    consumer's kernel, instead of aten's addmm (a pass that writes the bias over the whole output). The
    window attention's qkv, read by the attention kernel as strided views, and the head keep addmm. Same
    output and gradients as eager; switched off, every linear is an addmm again."""
    monkeypatch.setattr(fused, "_ONEDNN_TRAINING", False)  # the F.linear path (AMD CPUs default to oneDNN)
    # the three ops of each MLP (AVX2 CPUs default to one opaque op per MLP, whose GEMMs are not in the graph)
    monkeypatch.setattr(fused, "_PLAIN_TRAIN_MLP", False)
    # static sizes, as counted below: after an earlier test compiled the model's code for another image size,
    # dynamo's automatic dynamic shapes would make them symbolic (and some paths take their symbolic branch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=5, stem_stride=4)
    kinds = (davit.layers.SpatialBlock, davit.layers.ChannelBlock)
    blocks = [m for m in model.modules() if isinstance(m, kinds)]
    n_spatial = sum(isinstance(b, kinds[0]) for b in blocks)
    x = torch.randn(2, 3, 40, 36)
    out_ref, g_ref = _train_grads(model, x)
    graphs, out, grads = _aot_graphs(aot_capture, model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    fw = graphs["forward"]
    addmm, mm = torch.ops.aten.addmm.default, torch.ops.aten.mm.default
    # fc1, fc2, proj per block; qkv in channel blocks unless the native channel-attention kernel reads it
    qkv_apart = not native.channel_attention_supports(torch.empty(1, 1, 1), 1, width=96)
    apart = 3 * len(blocks) + (len(blocks) - n_spatial) * qkv_apart

    torch._dynamo.reset()
    # (fc1's GEMM also runs without its bias where the native bias + GELU operator takes the bias: off too)
    previous, gelu = fused.set_bias_apart(False), fused.set_native_bias_gelu(False)
    try:
        graphs, _, _ = _aot_graphs(aot_capture, model, x)
    finally:
        fused.set_bias_apart(previous)
        fused.set_native_bias_gelu(gelu)
    plain = graphs["forward"]
    assert _count(plain, mm) == 0
    # the rest (window qkv, the downsampling convs' matmuls on small maps, the head) keep their addmm
    assert _count(fw, mm) == apart
    assert _count(fw, addmm) == _count(plain, addmm) - apart


def test_bias_apart_only_in_compiled_cpu_fp32_training():
    """Eager code, inference and unbiased or hooked layers keep the plain linear."""
    lin, bare = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    assert not fused.bias_apart(x, lin)  # eager

    @torch.compile(backend="eager", fullgraph=True)
    def seen(x, layer):
        return torch.tensor(fused.bias_apart(x, layer))

    assert seen(x, lin)
    assert not seen(x, bare)
    with torch.no_grad():
        assert not seen(x, lin)
    assert not seen(x.double(), lin.double())
    handle = lin.register_forward_hook(lambda *a: None)
    try:
        assert not seen(x, lin)
    finally:
        handle.remove()


# ----- packed inference weights -----------------------------------------------------------------------------
def test_packed_weights_are_opt_in(monkeypatch):
    """Off by default; DAVIT_INFER_PACKED_WEIGHTS=1 turns them on, =0 keeps them off."""
    monkeypatch.delenv("DAVIT_INFER_PACKED_WEIGHTS", raising=False)
    assert fused.default_packed_weights() is False
    monkeypatch.setenv("DAVIT_INFER_PACKED_WEIGHTS", "1")
    assert fused.default_packed_weights() is True
    monkeypatch.setenv("DAVIT_INFER_PACKED_WEIGHTS", "0")
    assert fused.default_packed_weights() is False


@pytest.mark.parametrize("rows", [(1,), (5,), (3136 + 7,), (3, 49)])  # above and below the layout's row hint
def test_packed_weight_linears_equal_f_linear(rows, monkeypatch):
    monkeypatch.setattr(fused, "_PACKED_WEIGHTS", True)
    torch.manual_seed(0)
    w, b = torch.randn(48, 16) / 4, torch.randn(48)
    x, r = torch.randn(*rows, 16), torch.randn(*rows, 48)
    assert fused.packed_weight(w) is not None  # the packed path is what runs below
    with torch.no_grad():
        torch.testing.assert_close(fused.infer_linear(x, w, b), F.linear(x, w, b))
        torch.testing.assert_close(fused.infer_linear(x, w, None, "gelu"), F.gelu(F.linear(x, w)))
        torch.testing.assert_close(fused.infer_linear_add(x, r, w, b), F.linear(x, w, b) + r)


def test_packed_weight_follows_its_weight(monkeypatch):
    """The packed copy is made once per weight and remade whenever the weight changes; it goes with the
    weight, and never applies where it could go stale or does not fit."""
    import gc

    monkeypatch.setattr(fused, "_PACKED_WEIGHTS", True)
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(7, 16)
    w = lin.weight
    first = fused.packed_weight(w)
    assert first is not None and fused.packed_weight(w) is first  # cached
    before = fused.packed_weight_bytes()
    assert before >= 24 * 16 * 4
    with torch.no_grad():
        w.mul_(-2.0)  # an in-place update (as load_state_dict does): a new copy, the new values
        assert fused.packed_weight(w) is not first
        torch.testing.assert_close(fused.infer_linear(x, w, lin.bias), lin(x))
        w.data = torch.randn(24, 16)  # new storage under the same parameter
        torch.testing.assert_close(fused.infer_linear(x, w, lin.bias), lin(x))
        lin.load_state_dict({"weight": torch.randn(24, 16), "bias": torch.randn(24)})
        torch.testing.assert_close(fused.infer_linear(x, w, lin.bias), lin(x))
    key = id(w)
    del lin, w
    gc.collect()
    assert key not in fused._PACKED  # freed with its weight
    assert fused.packed_weight(torch.randn(fused.PACK_MAX_ELEMENTS // 16 + 1, 16)) is None  # too large
    assert fused.packed_weight(torch.randn(8, 4, dtype=torch.float64)) is None
    with torch.inference_mode():
        frozen = torch.randn(8, 4)  # no version counter: an in-place update could not be told
    assert fused.packed_weight(frozen) is None
    kept = torch.randn(8, 4)
    assert fused.packed_weight(kept) is not None
    fused.set_packed_weights(False)  # off: nothing packed, nothing kept
    assert fused.packed_weight(kept) is None and not fused._PACKED


def test_compiled_packed_weights_are_on_by_default(monkeypatch):
    """On where oneDNN is available; DAVIT_COMPILED_PACKED_WEIGHTS=0 turns them off, =1 keeps them on."""
    monkeypatch.delenv("DAVIT_COMPILED_PACKED_WEIGHTS", raising=False)
    assert fused.default_compiled_packed_weights() is fused._MKLDNN
    monkeypatch.setenv("DAVIT_COMPILED_PACKED_WEIGHTS", "0")
    assert fused.default_compiled_packed_weights() is False
    monkeypatch.setenv("DAVIT_COMPILED_PACKED_WEIGHTS", "1")
    assert fused.default_compiled_packed_weights() is fused._MKLDNN
    monkeypatch.setenv("DAVIT_COMPILED_PACKED_WEIGHTS", "yes")  # not 0/1: the default, and a warning
    with pytest.warns(UserWarning, match=r"'yes' ignored: set it to 1 \(packed weights\) or 0 \(the weights"):
        assert fused.default_compiled_packed_weights() is fused._MKLDNN


@pytest.mark.parametrize("compiled", [False, True])
def test_model_inference_with_packed_weights_equals_reference(compiled, monkeypatch):
    """davit_atto's CPU inference with packed weights (eager with its opt-in setting, and inside compiled
    inference's opaque ops with theirs alone) equals the literal reference path, at an odd image size; with
    compiled inference's setting off, its ops pack nothing (read when they run: no recompile)."""
    if not fused._MKLDNN:
        pytest.skip("no oneDNN in this PyTorch build")
    monkeypatch.setattr(fused, "_PACKED_WEIGHTS", not compiled)
    monkeypatch.setattr(fused, "_COMPILED_PACKED", compiled)
    monkeypatch.setattr(fused, "_ONEDNN_COMPILED_INFERENCE", True)  # the opaque ops also on AVX2-only CPUs
    monkeypatch.setattr(fused, "_MIN_MACS", 0)  # compiled: every linear in the opaque ops at this tiny size
    fused._PACKED.clear()
    torch.manual_seed(0)
    model = davit.create_model("davit_atto", num_classes=10).eval()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        model.set_fast(False)
        ref = model(x)
        model.set_fast(True)
        fn = torch.compile(model, fullgraph=True) if compiled else model
        out = fn(x)
    packed = [w for w in weights if id(w) in fused._PACKED]  # the packed path ran for the blocks' linears
    # all but the head's (a plain linear) and, compiled, the last stage's qkv (its 1 x 2 map is one window,
    # which compiled code attends to in the open)
    assert len(packed) >= len(weights) - (2 if compiled else 1), (len(packed), len(weights))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if compiled:
        fused.set_compiled_packed_weights(False)  # monkeypatch restores the setting
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(fn(x), ref, rtol=1e-5, atol=1e-5)
        assert not any(id(w) in fused._PACKED for w in weights)
