import math

import pytest
import torch

from davit import create_model
from davit.train.optim import (
    ReplannedSchedule,
    build_optimizer,
    build_scheduler,
    layer_id,
    lr_at,
    param_groups,
)


def _tiny():
    return create_model("davit_atto", num_classes=10, in_chans=1, depths=(1, 1, 2, 1))


def test_weight_decay_only_on_ndim_ge_2():
    m = _tiny()
    groups = param_groups(m, 0.05)
    decayed = {n for g in groups if g["weight_decay"] == 0.05 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    params = dict(m.named_parameters())
    assert decayed == {n for n, p in params.items() if p.ndim >= 2}
    assert plain == {n for n, p in params.items() if p.ndim < 2} == m.no_weight_decay()
    assert (
        "stages.0.blocks.0.0.attn.qkv.weight" in decayed and "stages.0.blocks.0.0.cpe1.proj.weight" in decayed
    )
    assert "head.norm.weight" in plain and "stages.0.blocks.0.0.attn.qkv.bias" in plain
    opt = build_optimizer(m, "adamw", 1e-3, 0.05)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


def test_layer_decay_scales():
    m = _tiny()  # 5 dual blocks: stem 0, blocks 1..5, head 6
    depths = m.depths
    assert layer_id("stem.conv.weight", depths) == 0
    assert layer_id("stages.0.blocks.0.0.attn.qkv.weight", depths) == 1
    assert layer_id("stages.2.downsample.conv.weight", depths) == 3
    assert layer_id("stages.2.blocks.1.1.mlp.fc1.weight", depths) == 4
    assert layer_id("head.fc.weight", depths) == 6
    groups = param_groups(m, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.fc.weight"] == 1.0 and scale["stem.conv.weight"] == 0.5**6


def test_schedule_values_match_spec():
    # SPEC 5 in steps: 10 steps/epoch, 300 epochs cosine (warmup 5 from 1e-6), then 10 cooldown at 1e-5
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    spe = 10
    s = build_scheduler(opt, "cosine", 300, spe, 5, 1e-6, 1e-5)
    assert lr_at(s, 0) == pytest.approx(1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)  # set at construction
    assert lr_at(s, 25) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 25 / 50)  # linear warmup
    peak = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 50 / 3000))
    assert lr_at(s, 50) == pytest.approx(peak) and peak > 0.999e-3  # warmup ends at the (cosine) peak
    assert lr_at(s, 1500) == pytest.approx((1e-3 + 1e-5) / 2)  # half way through the cosine
    assert lr_at(s, 3000) == pytest.approx(1e-5)
    assert lr_at(s, 3050) == pytest.approx(1e-5)  # cooldown epochs stay at min_lr
    s.step_update(1500)
    assert opt.param_groups[0]["lr"] == pytest.approx((1e-3 + 1e-5) / 2)


def test_replanned_schedule_stretches_the_rest_continuously():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    base = build_scheduler(opt, "cosine", 10, 10, 1, 1e-6, 1e-5)  # 100 steps, 10 of warmup
    ref = [lr_at(base, t) for t in range(101)]
    s = ReplannedSchedule(base)
    assert [lr_at(s, t) for t in range(101)] == ref  # no re-plan: the base schedule itself
    s.replan(40, 120)  # 60 steps were left; now 120: the rest runs at half speed
    assert [lr_at(s, t) for t in range(41)] == ref[:41]  # the past is unchanged
    assert lr_at(s, 40) == ref[40] and lr_at(s, 60) == pytest.approx(ref[50])  # continuous, then stretched
    assert lr_at(s, 160) == pytest.approx(1e-5) and lr_at(s, 159) > 1e-5  # ends at min_lr, at the new end
    s.replan(100, 20)  # shrunk again: 60 steps' worth of the stretched plan left, now 20
    assert lr_at(s, 100) == pytest.approx(ref[70]) and lr_at(s, 110) == pytest.approx(ref[85])
    assert lr_at(s, 120) == pytest.approx(1e-5) and lr_at(s, 500) == pytest.approx(1e-5)
    base2 = build_scheduler(opt, "cosine", 10, 10, 1, 1e-6, 1e-5)
    replayed = ReplannedSchedule(base2, [(40, 120), (100, 20)])
    assert [lr_at(replayed, t) for t in range(130)] == [lr_at(s, t) for t in range(130)]
    with pytest.raises(ValueError, match="step order"):
        s.replan(90, 10)
    s.step_update(110)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref[85])


def test_schedule_applies_layer_scale():
    m = _tiny()
    opt = build_optimizer(m, "adamw", 1e-3, 0.05, layer_decay=0.5)
    s = build_scheduler(opt, "cosine", 10, 10, 0, 1e-6, 0.0)
    s.step_update(50)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(lr_at(s, 50) * g["lr_scale"])


def test_unsupported_optimizer_is_error():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(_tiny(), "sgd", 0.1, 0.0)


def test_fused_adamw_when_possible_and_same_update_as_loop():
    torch.manual_seed(0)
    m = _tiny()
    ref = create_model("davit_atto", num_classes=10, in_chans=1, depths=(1, 1, 2, 1))
    ref.load_state_dict(m.state_dict())
    opt = build_optimizer(m, "adamw", 1e-3, 0.05)
    assert all(g["fused"] for g in opt.param_groups)
    loop = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in param_groups(ref, 0.05)],
        lr=1e-3, weight_decay=0.05, foreach=False,
    )
    for step in range(3):
        for net, o in ((m, opt), (ref, loop)):
            # the same synthetic gradients for both: model gradients of near-zero terms (q biases of a
            # 1-token channel attention) are rounding noise that Adam's normalisation would amplify
            g = torch.Generator().manual_seed(step)
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            o.step()
    for (n, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_fused_not_used_for_frozen_only_or_integer_parameters():
    from davit.train.optim import fused_kwargs

    assert fused_kwargs([torch.nn.Parameter(torch.zeros(2))]) == {"fused": True}
    assert fused_kwargs([torch.nn.Parameter(torch.zeros(2), requires_grad=False)]) == {}
    assert fused_kwargs([torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)]) == {}
