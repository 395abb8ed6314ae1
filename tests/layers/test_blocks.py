"""Block-level fast paths (small-map shortcuts, oneDNN inference kernels) equal the literal formulations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from davit.layers import ChannelBlock, ConvPosEnc, SpatialBlock, fused, native
from davit.layers.attention import channel_attention, channel_attention_ref
from davit.layers.blocks import _depthwise3x3_tiny


def _grads(module, x):
    out = module(x)
    g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                            [x, *module.parameters()])
    return out, g


@pytest.mark.parametrize("hw", [(1, 1), (1, 3), (3, 1), (2, 2), (1, 4), (4, 1)])
def test_depthwise_taps_equal_conv2d(hw):
    torch.manual_seed(0)
    x = torch.randn(3, *hw, 5, dtype=torch.float64)
    w = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    ref = F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=1, groups=5).permute(0, 2, 3, 1)
    torch.testing.assert_close(_depthwise3x3_tiny(x, w, b), ref)
    torch.testing.assert_close(_depthwise3x3_tiny(x, w, None), ref - b)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 3), (3, 3)])  # (3, 3) takes the conv path
def test_conv_pos_enc_small_maps_forward_and_grads(hw):
    torch.manual_seed(0)
    m = ConvPosEnc(6).double()
    x = torch.randn(2, *hw, 6, dtype=torch.float64, requires_grad=True)
    out, g = _grads(m, x)
    m.fast = False
    out_ref, g_ref = _grads(m, x)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("qkv_bias", [True, False])
# single padded window .. several windows
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (7, 6), (5, 7), (6, 9)])
def test_spatial_block_padding_shortcut_equals_literal_padding(hw, qkv_bias):
    torch.manual_seed(0)
    blk = SpatialBlock(16, num_heads=2, window_size=7, qkv_bias=qkv_bias).double()
    with torch.no_grad():  # non-zero biases, so the padding tokens are not trivial keys
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, *hw, 16, dtype=torch.float64, requires_grad=True)
    out, g = _grads(blk, x)
    for m in blk.modules():
        if hasattr(m, "fast"):
            m.fast = False
    out_ref, g_ref = _grads(blk, x)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_padding_shortcut_changes_the_result_if_padding_were_ignored():
    # guards the test above: dropping the padding keys (plain attention over the real tokens) differs
    torch.manual_seed(0)
    blk = SpatialBlock(16, num_heads=2, window_size=7).double()
    x = torch.randn(1, 2, 2, 16, dtype=torch.float64)
    with torch.no_grad():
        full = blk(x)
        blk.window_size = 2  # same map, no padding at all
        assert (blk(x) - full).abs().max() > 1e-3


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (9, 9), (14, 14)])
def test_blocks_fp32_inference_fast_vs_literal(hw, onednn, monkeypatch):
    # CPU fp32 inference takes the oneDNN kernels (qkv, fc1+GELU, proj/fc2+residual), or MKL's GEMMs with
    # in-place epilogues where the setting is off (the Intel AVX-512 default), and the
    # per-group channel attention; all within fp32 round-off of the literal path
    monkeypatch.setattr(fused, "_INFER_ONEDNN_GEMMS", onednn)
    calls = []
    if fused._MKLDNN:
        real = torch.ops.mkldnn._linear_pointwise

        class Spy:  # the op and its .binary overload (linear + residual add), counted
            def __call__(self, *a):
                return calls.append(1) or real(*a)

            def binary(self, *a):
                return calls.append(1) or real.binary(*a)

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    torch.manual_seed(0)
    blocks = [SpatialBlock(96, 3), ChannelBlock(96, 3)]
    x = torch.randn(2, *hw, 96)
    for blk in blocks:
        blk.eval()
        with torch.no_grad():
            fast = blk(x)
            for m in blk.modules():
                if hasattr(m, "fast"):
                    m.fast = False
            ref = blk(x)
        assert (fast - ref).abs().max().item() <= 2e-5
    if fused._MKLDNN:
        assert bool(calls) is onednn, f"{len(calls)} oneDNN linear calls with the oneDNN GEMMs {onednn}"


@pytest.mark.parametrize("block", [SpatialBlock, ChannelBlock])
def test_position_encoding_adds_in_place_unless_its_conv_is_hooked(block):
    """Eager CPU inference with torch's convolution (the native position-encoding kernel off) adds a position
    encoding's input into its conv's fresh output; a forward hook on the conv must still see that output
    unchanged, and the block's output must be the same, bit for bit, either way. A hooked conv also keeps
    the native kernel out (it would hide the conv's output from the hook), to fp32 round-off of its result."""
    torch.manual_seed(0)
    blk = block(32, 2).eval()
    x = torch.randn(2, 9, 9, 32)
    previous = native.set_pos_enc_kernel(False)
    try:
        with torch.no_grad():
            plain = blk(x)
    finally:
        native.set_pos_enc_kernel(previous)
    with torch.no_grad():
        kernel = blk(x)
    torch.testing.assert_close(kernel, plain, atol=1e-5, rtol=1e-5)
    seen = []
    for cpe in (blk.cpe1, blk.cpe2):
        cpe.proj.register_forward_hook(lambda _m, _i, out: seen.append((out, out.clone())))
    with torch.no_grad():
        hooked = blk(x)
    assert len(seen) == 2
    for out, copy in seen:
        assert torch.equal(out, copy)
    assert torch.equal(hooked, plain)


@pytest.mark.parametrize(
    "vendor,capability,expected",
    [("GenuineIntel", "AVX512", False), ("AuthenticAMD", "AVX512", True), ("GenuineIntel", "AVX2", True)],
)
def test_default_inference_onednn_gemms_by_cpu(monkeypatch, vendor, capability, expected):
    """MKL's GEMMs on Intel AVX-512 CPUs (faster than oneDNN's there), oneDNN's fused kernels elsewhere;
    DAVIT_ONEDNN_INFERENCE_GEMMS=0/1 overrides."""
    monkeypatch.delenv("DAVIT_ONEDNN_INFERENCE_GEMMS", raising=False)
    assert fused.default_inference_onednn_gemms(vendor, capability) is expected
    monkeypatch.setenv("DAVIT_ONEDNN_INFERENCE_GEMMS", "0" if expected else "1")
    assert fused.default_inference_onednn_gemms(vendor, capability) is not expected


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("groups", [2, 3, 8])
def test_channel_attention_per_group_inference_path(groups, v2):
    torch.manual_seed(0)
    qkv = torch.randn(2, 37, 3 * 16 * groups, dtype=torch.float64)
    with torch.no_grad():  # CPU, no autograd: the per-group bmm path
        fast = channel_attention(qkv, groups, v2)
    torch.testing.assert_close(fast, channel_attention_ref(qkv, groups, v2))


@pytest.mark.parametrize("hw", [(2, 2), (14, 14)])
def test_blocks_fp32_training_fast_vs_literal(hw):
    # CPU fp32 with autograd (the training path: SDPA, batched channel attention, tap-sum CPE on tiny maps,
    # padding-free one-window attention): forward and every gradient within fp32 round-off
    torch.manual_seed(0)
    for blk in [SpatialBlock(96, 3), ChannelBlock(96, 3)]:
        x = torch.randn(2, *hw, 96, requires_grad=True)
        out, g = _grads(blk, x)
        for m in blk.modules():
            if hasattr(m, "fast"):
                m.fast = False
        out_ref, g_ref = _grads(blk, x)
        torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-5)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (7, 7), (9, 12)])
def test_spatial_block_training_and_inference_placements_agree(hw):
    # with autograd the output projection runs inside the windows (less saved memory), without it after
    # un-windowing (fused with the residual add); both must be the same function, padding included
    torch.manual_seed(0)
    blk = SpatialBlock(16, num_heads=2, window_size=7).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, *hw, 16, dtype=torch.float64)
    with torch.no_grad():
        inference = blk(x)
    training = blk(x.requires_grad_())
    assert training.requires_grad
    torch.testing.assert_close(training, inference, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("block", [SpatialBlock, ChannelBlock])
def test_mlp_in_token_chunks_in_cpu_training_equals_the_whole_map(monkeypatch, block):
    from davit.layers import blocks

    torch.manual_seed(0)
    b = block(32, 2, drop_path=0.0).train()
    x = torch.randn(2, 9, 11, 32, requires_grad=True)  # 198 tokens: chunks of 40 + a remainder of 38
    up = torch.randn(2, 9, 11, 32)

    def run():
        x.grad = None
        b.zero_grad(set_to_none=True)
        out = b(x)
        (out * up).sum().backward()
        return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in b.parameters()]

    monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 10**9)
    whole, g_whole = run()
    monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 40)
    fc2_rows = []
    real = blocks.linear

    def counting(t, layer, *a, **k):
        if layer is b.mlp.fc2:
            fc2_rows.append(t.shape[0])
        return real(t, layer, *a, **k)

    monkeypatch.setattr(blocks, "linear", counting)
    chunked, g_chunked = run()
    assert fc2_rows == [40, 40, 40, 40, 38]
    torch.testing.assert_close(chunked, whole)
    for a, r in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    fc2_rows.clear()
    with torch.no_grad():  # inference keeps the whole map (fused with the residual add on CPU)
        b.eval()(x)
    assert 40 not in fc2_rows


@pytest.mark.parametrize("block", [SpatialBlock, ChannelBlock])
def test_compiled_training_runs_large_mlps_in_a_fixed_number_of_chunks(monkeypatch, block):
    """Compiled CPU fp32 training splits an MLP whose map has enough tokens per image into the fixed number of
    chunks eager training's rule gives at COMPILED_TRAIN_MLP_BATCH, with the whole map's outputs and
    gradients, and another batch size runs the same graph (the count does not depend on the symbolic batch);
    with oneDNN's training linears off, where the MLP function runs on F.linear's GEMMs (AVX2 CPUs' default)
    too; with the setting off, or with neither (the three ops), the map stays whole."""
    from davit.layers import blocks, fused

    # 9 x 11 = 99 tokens per image: 99 * COMPILED_TRAIN_MLP_BATCH // TRAIN_MLP_CHUNK_TOKENS = 3 chunks
    monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 99 * blocks.COMPILED_TRAIN_MLP_BATCH // 3)
    monkeypatch.setattr(fused, "_ONEDNN_TRAINING", True)
    torch.manual_seed(0)
    b = block(32, 2, drop_path=0.0).train()

    def run(fn, batch):
        torch.manual_seed(batch)
        x = torch.randn(batch, 9, 11, 32, requires_grad=True)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        b.zero_grad(set_to_none=True)
        out = fn(x)
        (out * torch.randn(out.shape)).sum().backward()
        return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in b.parameters()]

    def compiled(graphs):
        def keep(gm, _inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        return torch.compile(b, backend=keep, fullgraph=True)

    graphs = []
    fn = compiled(graphs)
    for batch in (2, 3):
        out, grads = run(fn, batch)
        ref, ref_grads = run(b, batch)  # eager: 198 or 297 tokens, below two of eager's chunks: the whole map
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    assert len(graphs) == 1  # batch 3 ran batch 2's graph
    splits = [n.args[1:] for n in graphs[0].graph.nodes if n.target == "tensor_split"]
    assert splits == [(3,)]

    graphs = []
    previous = blocks.set_compiled_mlp_chunks(False)
    try:
        out, grads = run(compiled(graphs), 2)
    finally:
        blocks.set_compiled_mlp_chunks(previous)
    assert not [n for n in graphs[0].graph.nodes if n.target == "tensor_split"]

    monkeypatch.setattr(fused, "_ONEDNN_TRAINING", False)
    for plain, expected in ((True, [(3,)]), (False, [])):
        monkeypatch.setattr(fused, "_PLAIN_TRAIN_MLP", plain)
        graphs = []
        out, grads = run(compiled(graphs), 2)
        ref, ref_grads = run(b, 2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
        splits = [n.args[1:] for n in graphs[0].graph.nodes if n.target == "tensor_split"]
        assert splits == expected, plain


def test_compiled_training_with_symbolic_image_sizes_keeps_whole_maps(monkeypatch):
    """With symbolic H and W the MLP's chunk count is not decided (the whole map), so no guard on the token
    count: image sizes on both sides of the chunks' threshold run one graph. Before session 52 the chunk test
    took dynamo's symbolic sizes for concrete ones and guarded the graph on them; a size across it recompiled
    (minutes for a whole model's training graph on 2 cores)."""
    from davit.layers import blocks, fused

    # 99 tokens per image and more: 3 chunks or more where the sizes are static
    monkeypatch.setattr(blocks, "TRAIN_MLP_CHUNK_TOKENS", 99 * blocks.COMPILED_TRAIN_MLP_BATCH // 3)
    monkeypatch.setattr(fused, "_ONEDNN_TRAINING", True)
    torch.manual_seed(0)
    b = blocks.SpatialBlock(32, 2, drop_path=0.0).train()
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(b, backend=keep, fullgraph=True)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for hw in [(9, 11), (5, 7), (14, 20)]:  # 99, 35 and 280 tokens per image
                x = torch.randn(2, *hw, 32, requires_grad=True)
                torch._dynamo.mark_dynamic(x, 1)
                torch._dynamo.mark_dynamic(x, 2)
                out = fn(x)
                torch.testing.assert_close(out, b(x), rtol=1e-5, atol=1e-5)
                out.sum().backward()
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert not [n for n in graphs[0].graph.nodes if n.target == "tensor_split"]
