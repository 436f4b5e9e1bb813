"""Physical pruning: slim == gated (fp32, <= 1e-5) on SD1/SD2/SDXL-like UNets at three input shapes.

Random masks close heads, FFN neurons and norm channels in every transformer block and leave fractional
gates on kept units, so both removal and folding are exercised.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from uniforget.errors import PlanError
from uniforget.fingerprint import model_fingerprint
from uniforget.flops import ReferenceShape
from uniforget.gating import attach_gates
from uniforget.geometries import TINY, build_unet, example_inputs
from uniforget.masks import MaskSet
from uniforget.plan import PruningPlan, TargetPlan, make_plan
from uniforget.prune import SlimLayerNorm, check_parity, prune_unet
from uniforget.targets import discover_targets

REF = ReferenceShape(batch=1, height=8, width=8, seq_len=7)
SHAPES = [(1, 8, 8, 7), (2, 16, 16, 77), (3, 16, 24, 5)]  # (batch, latent h, latent w, text tokens)
ATOL = 1e-5


def random_masks(unet, seed: int = 0) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    logits = {}
    for t in discover_targets(unet):
        m = torch.rand(t.size, generator=g) * 1.9 - 0.45  # closed (<0.12), fractional, open (>0.88)
        m[0] = -0.3  # every target loses at least one unit
        m[-1] = 0.5  # and keeps a fractional one (unless keep-one decides otherwise)
        logits[t.key] = m
    return MaskSet(logits, model_fingerprint(unet))


@pytest.fixture(scope="module", params=sorted(TINY))
def geometry(request):
    unet = build_unet(TINY[request.param], seed=0)
    return request.param, unet, random_masks(unet)


@pytest.mark.parametrize("ratio", ["auto", 0.15])
def test_slim_equals_gated_at_three_shapes(geometry, ratio):
    name, unet, ms = geometry
    plan = make_plan(unet, ms, ratio, REF, with_flops=False)
    per_kind = {k: sum(t.n_removed for t in plan.targets if t.kind == k) for k in ("heads", "ffn", "norm")}
    assert all(v > 0 for v in per_kind.values()), per_kind
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    slim = prune_unet(unet, plan)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items()), "dense UNet was modified"
    for b, h, w, s in SHAPES:
        inputs = example_inputs(unet, batch=b, height=h, width=w, seq_len=s, seed=b + h)
        res = check_parity(unet, slim, plan, inputs, atol=ATOL)
        assert res, f"{name} ratio {ratio} shape {(b, h, w, s)}: max abs {res.max_abs:.3g}"
        with torch.no_grad():
            dense = unet(**inputs).sample
            slim_out = slim(**inputs).sample
        # the masks matter: slim is far from the ungated model, so parity above is not trivially true
        assert (dense - slim_out).abs().max() > 100 * ATOL


def test_attention_bookkeeping(geometry):
    name, unet, ms = geometry
    plan = make_plan(unet, ms, "auto", REF, with_flops=False)
    slim = prune_unet(unet, plan)
    for t in plan.targets:
        m = slim.get_submodule(t.path)
        if t.kind == "heads":
            hd = unet.get_submodule(t.path).to_q.out_features // t.size
            assert m.heads == m.sliceable_head_dim == len(t.kept)
            assert m.inner_dim == m.inner_kv_dim == m.to_q.out_features == len(t.kept) * hd
            assert m.to_out[0].in_features == len(t.kept) * hd
        elif t.kind == "norm" and t.n_removed:
            assert isinstance(m, SlimLayerNorm) and m.kept.tolist() == list(t.kept)
            assert m.full_width == t.size
        elif t.kind == "ffn":
            assert m.net[2].in_features == len(t.kept)
            assert m.net[0].proj.out_features == 2 * len(t.kept)  # GEGLU: value and gate rows together


def test_open_gates_give_bit_identical_model():
    unet = build_unet(TINY["sdxl"], seed=0)
    ms = MaskSet({t.key: torch.ones(t.size) for t in discover_targets(unet)}, model_fingerprint(unet))
    plan = make_plan(unet, ms, "auto", REF, with_flops=False)
    assert plan.params_after == plan.params_before
    slim = prune_unet(unet, plan)
    inputs = example_inputs(unet, batch=2, seed=0)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, slim(**inputs).sample)


def test_inplace_and_fingerprint_check():
    unet = build_unet(TINY["sd1"], seed=0)
    plan = make_plan(unet, random_masks(unet), "auto", REF, with_flops=False)
    other = build_unet(TINY["sd1"], seed=1)
    with pytest.raises(PlanError, match="plan was made for model"):
        prune_unet(other, plan)
    slim = prune_unet(unet, plan, inplace=True)
    assert slim is unet


def test_plan_for_other_geometry_is_refused():
    unet = build_unet(TINY["sd1"], seed=0)
    plan = make_plan(unet, random_masks(unet), "auto", REF, with_flops=False)
    sd2 = build_unet(TINY["sd2"], seed=0)
    with pytest.raises(PlanError, match="does not exist in this UNet|units but this UNet has"):
        prune_unet(sd2, plan, check_fingerprint=False)


class _Wrap(nn.Module):
    """A lone transformer block (so feed-forward variants the UNet config cannot select can be tested)."""

    def __init__(self, activation_fn: str, self_attn2: bool):
        super().__init__()
        self.block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=None if self_attn2 else 24,
                                           double_self_attention=self_attn2, activation_fn=activation_fn,
                                           attention_bias=True)

    def forward(self, x, ctx):
        return self.block(x, encoder_hidden_states=ctx)


@pytest.mark.parametrize("act,self_attn2", [("gelu", False), ("gelu-approximate", True), ("swiglu", False)])
def test_other_feed_forwards_and_self_attention_norm2(act, self_attn2):
    torch.manual_seed(0)
    model = _Wrap(act, self_attn2).eval()
    g = torch.Generator().manual_seed(0)
    targets = []
    for t in discover_targets(model):
        v = torch.rand(t.size, generator=g)
        v[0] = 0.0
        kept = tuple(i for i in range(t.size) if v[i] > 0)
        targets.append(TargetPlan(t.key, t.kind, t.size, kept, tuple(float(v[i]) for i in kept)))
    plan = PruningPlan(tuple(targets), "-", "auto", 0.0, 0, 0, None, None, REF, {}, {})
    slim = prune_unet(model, plan, check_fingerprint=False)
    x, ctx = torch.randn(2, 10, 32), None if self_attn2 else torch.randn(2, 5, 24)
    with torch.no_grad(), attach_gates(model, plan.effective_gates()):
        ref = model(x, ctx)
    with torch.no_grad():
        out = slim(x, ctx)
    assert (out - ref).abs().max() <= ATOL
    if self_attn2:  # norm2 feeds q, k and v of a self-attention attn2
        assert slim.block.attn2.to_k.in_features == len(plan.by_key()["block.norm2/norm"].kept)


def test_slim_unet_exports_to_onnx_and_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    unet = build_unet(TINY["sd1"], seed=0)
    plan = make_plan(unet, random_masks(unet), "auto", REF, with_flops=False)
    slim = prune_unet(unet, plan)
    inp = example_inputs(unet, batch=1, seed=0)

    class Fwd(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, ehs):
            return self.m(sample, timestep, ehs).sample

    path = tmp_path / "slim.onnx"
    args = (inp["sample"], inp["timestep"], inp["encoder_hidden_states"])
    torch.onnx.export(Fwd(slim), args, str(path), dynamo=False, opset_version=17,
                      input_names=["sample", "timestep", "ehs"], output_names=["out"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"sample": args[0].numpy(), "timestep": args[1].numpy(), "ehs": args[2].numpy()})[0]
    with torch.no_grad():
        ref = slim(*args).sample
    assert abs(out - ref.numpy()).max() <= 1e-4


def test_aligned_plan_keeps_parity_and_drops_needless_gathers():
    """An aligned plan still gives slim == gated; a norm that keeps every channel stays a plain LayerNorm."""
    from uniforget.flops import reference_inputs
    from uniforget.prune import require_parity

    unet = build_unet(TINY["sd1"], seed=0)
    g = torch.Generator().manual_seed(3)
    logits = {t.key: torch.randn(t.size, generator=g) for t in discover_targets(unet)}
    norm_key = next(k for k in logits if k.endswith("/norm"))
    logits[norm_key] = torch.full_like(logits[norm_key], 3.0)
    logits[norm_key][:3] = -3.0  # 3 of 32 channels closed: align 8 rounds 29 kept back up to 32
    ms = MaskSet(logits, model_fingerprint(unet))
    ref = ReferenceShape(1, 8, 8, 7)
    for align in (1, 8):
        plan = make_plan(unet, ms, "auto", ref, with_flops=False, align=align)
        slim = prune_unet(unet, plan)
        norm = slim.get_submodule(norm_key.rsplit("/", 1)[0])
        assert isinstance(norm, SlimLayerNorm) == (align == 1), (align, type(norm).__name__)
        assert require_parity(check_parity(unet, slim, plan, reference_inputs(unet, ref), atol=1e-5))
