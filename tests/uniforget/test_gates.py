"""Gates: exactly 1 at init (bit-identical model), exactly 0 closes exactly one unit, hooks leave no trace."""

from __future__ import annotations

import pytest
import torch

from uniforget.gates import M_MAX, M_MIN, GateConfig, hard_concrete, relaxed_mask
from uniforget.gating import attach_gates, gate_module
from uniforget.geometries import TINY, build_unet, example_inputs
from uniforget.learn import GateParams
from uniforget.targets import discover_targets


def _run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.fixture(scope="module", params=sorted(TINY))
def geometry(request):
    unet = build_unet(TINY[request.param], seed=0)
    return request.param, unet, example_inputs(unet, batch=2, seed=1)


def test_hard_concrete_endpoints():
    cfg = GateConfig()
    assert torch.equal(hard_concrete(torch.tensor([cfg.init])), torch.ones(1))
    m = torch.linspace(M_MIN, M_MAX, 401)
    g = hard_concrete(m)
    assert torch.all(g[m <= 0.119] == 0) and torch.all(g[m >= 0.881] == 1)
    assert torch.all(g.diff() >= 0), "gate must be monotone in M"
    assert 0 < float(hard_concrete(torch.tensor(0.5))) < 1
    # the L1 stand-in is smooth and strictly increasing, so the sparsity term always has a gradient
    r = relaxed_mask(m)
    assert torch.all(r.diff() > 0)
    assert float(relaxed_mask(torch.tensor(0.0))) == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_init_gates_bit_identical(geometry):
    name, unet, inputs = geometry
    ref = _run(unet, inputs)
    gp = GateParams(discover_targets(unet), GateConfig())
    with attach_gates(unet, gp.sources()):
        gated = _run(unet, inputs)
    assert torch.equal(gated, ref), f"{name}: gated model at init differs from the original"
    assert torch.equal(_run(unet, inputs), ref), f"{name}: removing the hooks did not restore the model"


def _zero_unit_in_weights(unet, target, j):
    """The reference surgery: the same unit removed from the weights, no hooks."""
    mod = gate_module(unet, target)
    with torch.no_grad():
        if target.kind == "norm":
            mod.weight[j] = 0
            mod.bias[j] = 0
        elif target.kind == "ffn":
            mod.weight[:, j] = 0
        else:  # heads: the head's input columns of to_out
            hd = mod.in_features // target.size
            mod.weight[:, j * hd:(j + 1) * hd] = 0


@pytest.mark.parametrize("kind", ["heads", "ffn", "norm"])
def test_closed_gate_zeros_exactly_its_unit(geometry, kind):
    name, unet, inputs = geometry
    target = [t for t in discover_targets(unet, [kind])][-1]
    j = target.size // 2
    g = torch.ones(target.size)
    g[j] = 0.0
    ref = _run(unet, inputs)
    with attach_gates(unet, {target.key: g}):
        gated = _run(unet, inputs)
    assert not torch.allclose(gated, ref, atol=1e-7), f"{name}/{kind}: closing a unit changed nothing"

    # the signal the gate scales: only unit j is zero, everything else is untouched
    seen = {}
    mod = gate_module(unet, target)
    with attach_gates(unet, {target.key: g}):
        if kind == "norm":
            h = mod.register_forward_hook(lambda _m, _i, out: seen.setdefault("x", out.detach().clone()))
        else:
            h = mod.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0].detach().clone()))
        _run(unet, inputs)
        h.remove()
    x = seen["x"]
    width = x.shape[-1] // target.size
    unit = x[..., j * width:(j + 1) * width]
    assert torch.all(unit == 0)
    others = torch.cat([x[..., : j * width], x[..., (j + 1) * width:]], dim=-1)
    assert torch.count_nonzero(others) > 0.9 * others.numel()

    # and the gated model equals the model with that unit's weights removed
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    try:
        _zero_unit_in_weights(unet, target, j)
        surgery = _run(unet, inputs)
    finally:
        unet.load_state_dict(state)
    torch.testing.assert_close(gated, surgery, rtol=0, atol=1e-5)
    assert torch.equal(_run(unet, inputs), ref)


def test_all_closed_ffn_removes_every_feedforward(geometry):
    name, unet, inputs = geometry
    targets = discover_targets(unet, ["ffn"])
    closed = {t.key: torch.zeros(t.size) for t in targets}
    with attach_gates(unet, closed):
        gated = _run(unet, inputs)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    try:
        for t in targets:
            _zero_unit_in_weights(unet, t, slice(None))
        surgery = _run(unet, inputs)
    finally:
        unet.load_state_dict(state)
    torch.testing.assert_close(gated, surgery, rtol=0, atol=1e-5)


def test_gate_gradient_reaches_params_inside_active_region():
    unet = build_unet(TINY["sd1"], seed=0)
    inputs = example_inputs(unet, batch=1, seed=2)
    gp = GateParams(discover_targets(unet, ["ffn"]), GateConfig())
    # at init (clamped at exactly 1) the reconstruction gradient is zero: METHOD.md's reason for a small lr
    with attach_gates(unet, gp.sources()):
        unet(**inputs).sample.pow(2).mean().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in gp.params.values())
    for p in gp.params.values():
        p.grad = None
        p.data.fill_(0.5)
    with attach_gates(unet, gp.sources()):
        unet(**inputs).sample.pow(2).mean().backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in gp.params.values())
