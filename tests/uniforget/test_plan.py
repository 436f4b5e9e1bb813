"""PruningPlan: ratio rules, keep-one rule, exact parameter accounting, FLOPs, save/load and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from uniforget.errors import MaskSetError, PlanError
from uniforget.flops import ReferenceShape, param_count
from uniforget.geometries import TINY, build_unet
from uniforget.masks import MaskSet, mixed_maskset
from uniforget.plan import PruningPlan, make_plan, parse_ratio
from uniforget.prune import prune_unet
from uniforget.targets import discover_targets

REF = ReferenceShape(batch=1, height=8, width=8, seq_len=7)


random_masks = mixed_maskset  # closed, fractional and open gates in every target


@pytest.fixture(scope="module")
def sd1():
    unet = build_unet(TINY["sd1"], seed=0)
    return unet, random_masks(unet)


@pytest.fixture(scope="module")
def auto_plan(sd1):
    unet, ms = sd1
    return make_plan(unet, ms, "auto", REF, with_flops=False, align=1)


@pytest.mark.parametrize("bad", [float("nan"), 1.0, 1.5, -0.01, "abc", "nan", True, None, "1"])
def test_parse_ratio_rejects(bad):
    with pytest.raises(PlanError):
        parse_ratio(bad)


@pytest.mark.parametrize("good,want", [("auto", "auto"), (" AUTO ", "auto"), ("0.05", 0.05), (0, 0.0), (0.5, 0.5)])
def test_parse_ratio_accepts(good, want):
    assert parse_ratio(good) == want


def test_auto_removes_exactly_closed_gates(sd1, auto_plan):
    unet, ms = sd1
    plan = auto_plan
    values = ms.gate_values()
    for t in plan.targets:
        closed = set(torch.nonzero(values[t.key] == 0).flatten().tolist())
        if len(closed) == t.size:  # keep-one rule: the unit with the largest M stays, gate 0 folded
            assert t.kept == (int(torch.argmax(ms.logits[t.key])),) and t.gates == (0.0,)
        else:
            assert set(range(t.size)) - set(t.kept) == closed
            assert all(g > 0 for g in t.gates)
        assert torch.allclose(torch.tensor(t.gates), values[t.key][list(t.kept)])
    assert plan.params_after < plan.params_before
    assert plan.ratio_achieved == pytest.approx(1 - plan.params_after / plan.params_before)


def test_keep_one_rule_when_every_gate_closed():
    unet = build_unet(TINY["sd2"], seed=0)
    ms = random_masks(unet)
    key = next(k for k in ms.logits if k.endswith("/heads"))
    logits = dict(ms.logits)
    logits[key] = torch.full_like(logits[key], -0.4)
    logits[key][1] = -0.2  # largest M, still closed
    plan = make_plan(unet, MaskSet(logits, ms.model_fingerprint), "auto", REF, with_flops=False)
    t = plan.by_key()[key]
    assert t.kept == (1,) and t.gates == (0.0,)
    slim = prune_unet(unet, plan)
    assert slim.get_submodule(t.path).heads == 1


@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.3])
def test_ratio_is_reached_minimally_and_in_gate_order(sd1, ratio):
    unet, ms = sd1
    plan = make_plan(unet, ms, ratio, REF, with_flops=False, align=1)
    assert plan.ratio_achieved >= ratio
    removed, kept = [], []
    for t in plan.targets:
        protect = int(torch.argmax(ms.logits[t.key]))
        for i in range(t.size):
            m = float(ms.logits[t.key][i])
            (kept if i in t.kept else removed).append(m) if i != protect else None
    # most closed first, across kinds: nothing kept is more closed than anything removed
    assert max(removed) <= min(kept)
    # minimal: the achieved ratio overshoots by less than the largest single unit's parameters (< 1% here)
    assert plan.ratio_achieved - ratio < 0.01


def test_param_count_matches_the_slim_model(sd1):
    unet, ms = sd1
    for ratio in ("auto", 0.0, 0.2):
        plan = make_plan(unet, ms, ratio, REF, with_flops=False)
        slim = prune_unet(unet, plan)
        assert param_count(slim) == plan.params_after
        assert plan.params_before == param_count(unet)


def test_flops_fall_with_pruning(sd1):
    unet, ms = sd1
    p0 = make_plan(unet, ms, 0.0, REF)
    p1 = make_plan(unet, ms, 0.2, REF)
    assert p0.flops_before == p0.flops_after == p1.flops_before > 0
    assert p1.flops_after < p1.flops_before
    assert make_plan(unet, ms, 0.2, REF, with_flops=False).flops_after is None
    big = make_plan(unet, ms, 0.2, ReferenceShape(2, 16, 16, 77))
    assert big.flops_before > 4 * p1.flops_before  # 2x batch, 4x pixels


def test_ratio_unreachable(sd1):
    unet, ms = sd1
    with pytest.raises(PlanError, match="cannot be reached"):
        make_plan(unet, ms, 0.95, REF, with_flops=False)


def test_shares_and_effective_gates(auto_plan):
    plan = auto_plan
    eff = plan.effective_gates()
    for t in plan.targets:
        g = eff[t.key]
        assert g.shape == (t.size,)
        gone = [i for i in range(t.size) if i not in t.kept]
        assert torch.all(g[gone] == 0)
    for kind in ("heads", "ffn", "norm"):
        ts = [t for t in plan.targets if t.kind == kind]
        assert plan.closed_shares[kind] == pytest.approx(sum(t.n_removed for t in ts) / sum(t.size for t in ts))
    assert 0 < plan.closed_shares["all"] < 1
    assert plan.mask_closed_shares["all"] >= plan.closed_shares["all"]  # auto removes closed gates, minus keep-one


def test_save_load_round_trip(sd1, tmp_path):
    unet, ms = sd1
    plan = make_plan(unet, ms, 0.1, REF)
    assert plan.flops_after is not None
    loaded = PruningPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    assert loaded.digest() == plan.digest()
    for k, v in plan.effective_gates().items():
        assert torch.equal(v, loaded.effective_gates()[k])


@pytest.mark.parametrize("corrupt", ["truncate", "kept_out_of_range", "unsorted", "gate_gt_1", "format", "no_targets"])
def test_corrupt_plan_fails_with_one_line(sd1, tmp_path, corrupt):
    unet, ms = sd1
    path = make_plan(unet, ms, "auto", REF).save(tmp_path / "plan.json")
    text = path.read_text()
    d = json.loads(text)
    t = next(t for t in d["targets"] if len(t["kept"]) > 1)
    if corrupt == "truncate":
        path.write_text(text[: len(text) // 2])
    else:
        if corrupt == "kept_out_of_range":
            t["kept"][-1] = t["size"]
        elif corrupt == "unsorted":
            t["kept"][0], t["kept"][1] = t["kept"][1], t["kept"][0]
        elif corrupt == "gate_gt_1":
            t["gates"][0] = 1.5
        elif corrupt == "format":
            d["format"] = "something/else"
        elif corrupt == "no_targets":
            del d["targets"]
        path.write_text(json.dumps(d))
    with pytest.raises(PlanError) as e:
        PruningPlan.load(path)
    assert "\n" not in str(e.value)


def test_maskset_for_another_model(sd1):
    unet, ms = sd1
    other = build_unet(TINY["sd1"], seed=1)
    with pytest.raises(MaskSetError, match="learned for model"):
        make_plan(other, ms, "auto", REF, with_flops=False)


def test_maskset_with_nan_or_wrong_size(sd1):
    unet, ms = sd1
    key = next(iter(ms.logits))
    bad = dict(ms.logits)
    bad[key] = ms.logits[key].clone()
    bad[key][0] = math.nan
    with pytest.raises(PlanError, match="NaN"):
        make_plan(unet, MaskSet(bad, ms.model_fingerprint), "auto", REF, with_flops=False)
    bad[key] = torch.zeros(ms.logits[key].numel() + 1)
    with pytest.raises(PlanError, match="gates but the UNet module has"):
        make_plan(unet, MaskSet(bad, ms.model_fingerprint), "auto", REF, with_flops=False)


def test_partial_maskset_prunes_only_its_kinds(sd1):
    unet, ms = sd1
    ffn_only = MaskSet({k: v for k, v in ms.logits.items() if k.endswith("/ffn")}, ms.model_fingerprint)
    plan = make_plan(unet, ffn_only, "auto", REF, with_flops=False)
    assert {t.kind for t in plan.targets} == {"ffn"} and set(plan.closed_shares) == {"ffn", "all"}
    slim = prune_unet(unet, plan)
    heads = [t for t in discover_targets(slim) if t.kind == "heads"]
    assert all(t.size == TINY["sd1"]["attention_head_dim"] for t in heads)


@pytest.mark.parametrize("ratio", ["auto", 0.1, 0.3])
def test_aligned_widths_pad_with_zero_gated_units(sd1, ratio):
    """align=8: every kept width is a multiple of 8 (or the dense width); the units added back are the most open
    of the removed ones and carry gate 0, so the slim model computes what the exact plan's gates say."""
    unet, ms = sd1
    plan = make_plan(unet, ms, ratio, REF, with_flops=False, align=8)
    exact = make_plan(unet, ms, ratio, REF, with_flops=False, align=1)
    assert plan.align == 8 and exact.align == 1
    head_dim = {f"{p}/heads": m.to_q.out_features // m.heads for p, m in unet.named_modules() if hasattr(m, "heads")}
    for t in plan.targets:
        width = len(t.kept) * head_dim.get(t.key, 1)
        assert len(t.kept) == t.size or width % 8 == 0, (t.key, len(t.kept), width)
        logits = ms.logits[t.key]
        zero = [i for i, g in zip(t.kept, t.gates, strict=True) if g == 0.0]
        gone = [i for i in range(t.size) if i not in t.kept]
        if zero and gone:  # padding takes the removed units with the largest M
            assert min(float(logits[i]) for i in zero) >= max(float(logits[i]) for i in gone)
    if ratio == "auto":  # same effective gates as the exact plan: alignment changes no number
        eff, eff_exact = plan.effective_gates(), exact.effective_gates()
        assert all(torch.equal(eff[k], eff_exact[k]) for k in eff)
        assert plan.params_after > exact.params_after  # the zero-gated padding costs parameters
    else:
        assert plan.ratio_achieved >= ratio
        assert any(len(t.kept) % 8 for t in exact.targets)  # the exact plan had unaligned widths to round


def test_align_round_trip_and_old_plans_keep_their_digest(sd1, tmp_path):
    unet, ms = sd1
    exact = make_plan(unet, ms, 0.1, REF, with_flops=False, align=1)
    assert "align" not in exact.to_dict()  # a plan cut before alignment existed hashes as it did
    aligned = make_plan(unet, ms, 0.1, REF, with_flops=False, align=16)
    back = PruningPlan.load(aligned.save(tmp_path / "p.json"))
    assert back.align == 16 and back == aligned and back.digest() == aligned.digest()
    for bad in (0, -8, 2.5, True):
        with pytest.raises(PlanError, match="align"):
            make_plan(unet, ms, 0.1, REF, with_flops=False, align=bad)
