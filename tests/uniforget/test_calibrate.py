"""--beta auto: the ladder stops at the budget, the split is deterministic, and only neutral prompts are read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from uniforget.calibrate import (
    CalibrationConfig,
    CalibrationError,
    Rung,
    calibrate,
    close_call,
    parse_ladder,
    split_prompts,
)
from uniforget.geometries import tiny_pipeline
from uniforget.learn import LearnConfig, learn_masks
from uniforget.sampler import SamplerConfig, encode_prompts

PROMPTS = ["a red circle", "a blue square", "green triangle on white", "small yellow star", "two grey dots",
           "a big orange ring", "a purple cross", "black dot on gray"]
FAST = LearnConfig(steps=4, batch=2, lr=0.1, sampler=SamplerConfig(steps=2, guidance_scale=3.0), seed=3)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(image_size=8, text_len=32)


def test_split_is_deterministic_disjoint_and_complete():
    a, h = split_prompts(PROMPTS, 0.25, seed=0)
    assert (a, h) == split_prompts(PROMPTS, 0.25, seed=0)
    assert len(h) == 2 and not set(a) & set(h) and sorted(a + h) == sorted(PROMPTS)
    assert split_prompts(PROMPTS, 0.25, seed=1) != (a, h)
    with pytest.raises(CalibrationError, match="at least 2"):
        split_prompts(["one"], 0.5)


@pytest.mark.parametrize("kw, msg", [({"ladder": (2.0, 1.0)}, "increase"), ({"ladder": ()}, "ladder"),
                                     ({"budget": 0.0}, "budget"), ({"holdout": 1.0}, "holdout"),
                                     ({"rung_steps": 0}, "rung steps"), ({"statistic": "mean"}, "statistic"),
                                     ({"drift_seeds": 0}, "drift seeds")])
def test_bad_calibration_options(kw, msg):
    with pytest.raises(CalibrationError, match=msg):
        CalibrationConfig(**kw)


def test_parse_ladder():
    assert parse_ladder("1, 2,5") == (1.0, 2.0, 5.0)
    with pytest.raises(CalibrationError):
        parse_ladder("1,x")


def test_ladder_keeps_the_strongest_rung_within_budget(pipe):
    learn, held = split_prompts(PROMPTS, 0.25)
    cl, ch = encode_prompts(pipe, learn), encode_prompts(pipe, held)
    cal = CalibrationConfig(ladder=(0.0, 50.0, 5000.0), budget=1e9, rung_steps=3)
    everything = calibrate(pipe.unet, pipe.scheduler, cl, ch, FAST, cal)
    assert [r.beta for r in everything.rungs] == [0.0, 50.0, 5000.0] and everything.chosen == 2
    drifts = [r.drift_rel for r in everything.rungs]
    assert drifts[0] == 0.0 and drifts[2] > 0  # beta 0 keeps every gate at 1: exactly the original
    assert everything.maskset.meta["beta_mode"] == "auto" and everything.maskset.meta["beta"] == "5000.0"
    ses = everything.maskset.meta["calibration_rungs_se"].split(";")  # beside each rung's drift, not used by the rule
    assert [float(x.split(":")[0]) for x in ses] == [0.0, 50.0, 5000.0]
    assert everything.rungs[0].drift_se == 0.0 and everything.rungs[2].drift_se > 0
    med_ses = everything.maskset.meta["calibration_rungs_median_se"].split(";")
    assert len(med_ses) == 3 and everything.rungs[0].drift_median_se == 0.0
    assert everything.maskset.meta["calibration_close_call"] == ""  # budget 1e9: nothing is near it
    # a budget between rung 0 and the last: the ladder stops at the first rung over it and keeps the one below
    tight = calibrate(pipe.unet, pipe.scheduler, cl, ch, FAST, replace(cal, budget=drifts[2] / 2))
    assert tight.rungs[tight.chosen].drift_rel <= drifts[2] / 2 and tight.chosen < 2
    assert not tight.over_budget
    assert len(tight.rungs) == tight.chosen + 2  # stopped right after the first rung over budget
    # a budget at the last rung's own drift keeps it, and says the decision is a close call
    edge = calibrate(pipe.unet, pipe.scheduler, cl, ch, FAST, replace(cal, budget=drifts[2]))
    assert edge.chosen == 2 and "the kept beta 5000" in edge.maskset.meta["calibration_close_call"]


def test_median_statistic_is_what_the_budget_bounds_when_asked(pipe):
    """--budget-statistic median: a budget between the last rung's median-prompt and pooled drift keeps that rung
    under one statistic and not the other, and the MaskSet records which statistic and every rung's median."""
    learn, held = split_prompts(PROMPTS, 0.25)
    cl, ch = encode_prompts(pipe, learn), encode_prompts(pipe, held)
    cal = CalibrationConfig(ladder=(0.0, 5000.0), budget=1e9, rung_steps=3)
    top = calibrate(pipe.unet, pipe.scheduler, cl, ch, FAST, cal).rungs[1]
    assert top.drift_median > 0 and top.drift_median != pytest.approx(top.drift_rel)
    b = (top.drift_median + top.drift_rel) / 2
    pooled = calibrate(pipe.unet, pipe.scheduler, cl, ch, FAST, replace(cal, budget=b))
    median = calibrate(pipe.unet, pipe.scheduler, cl, ch, FAST, replace(cal, budget=b, statistic="median"))
    assert (pooled.chosen == 1) == (top.drift_rel <= b) and (median.chosen == 1) == (top.drift_median <= b)
    assert pooled.chosen != median.chosen
    meta = median.maskset.meta
    assert meta["calibration_statistic"] == "median" and pooled.maskset.meta["calibration_statistic"] == "pooled"
    medians = dict(x.split(":") for x in meta["calibration_rungs_median"].split(";"))
    assert float(medians["0"]) == 0.0 and float(medians["5000"]) == pytest.approx(top.drift_median, rel=1e-4)
    chosen = median.rungs[median.chosen]
    assert float(meta["neutral_drift_median_holdout"]) == pytest.approx(chosen.drift_median, rel=1e-5)


def test_over_budget_at_the_first_rung_is_said(pipe):
    learn, held = split_prompts(PROMPTS, 0.25)
    cal = CalibrationConfig(ladder=(5000.0, 10000.0), budget=1e-12, rung_steps=1)
    res = calibrate(pipe.unet, pipe.scheduler, encode_prompts(pipe, learn), encode_prompts(pipe, held), FAST, cal)
    assert res.over_budget and res.chosen == 0 and len(res.rungs) == 1
    assert res.maskset.meta["calibration_over_budget"] == "true"


def test_joint_ladder_carries_the_tuned_weights(pipe):
    """--beta auto --tune-weights: each rung continues from the weights of the rung below, the drift is that of
    the gated tuned copy, and the chosen rung's copy (which its MaskSet belongs to) comes back."""
    import torch

    from uniforget.fingerprint import model_fingerprint
    from uniforget.learn import DriftMeter

    learn, held = split_prompts(PROMPTS, 0.25)
    cl, ch = encode_prompts(pipe, learn), encode_prompts(pipe, held)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = replace(FAST, weight_lr=1e-2)
    res = calibrate(pipe.unet, pipe.scheduler, cl, ch, cfg, CalibrationConfig(ladder=(5.0, 50.0), budget=1e9,
                                                                               rung_steps=2))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items()), "the teacher must not move"
    assert res.chosen == 1 and res.unet is not None
    ms = res.maskset
    assert ms.model_fingerprint == model_fingerprint(res.unet) != ms.meta["teacher_fingerprint"]
    assert ms.meta["teacher_fingerprint"] == model_fingerprint(pipe.unet)
    assert ms.meta["weights_start_fingerprint"] not in (ms.meta["teacher_fingerprint"], ms.model_fingerprint)
    first = learn_masks(pipe.unet, pipe.scheduler, cl, replace(cfg, beta=5.0))  # rung 0 again, on its own
    assert ms.meta["weights_start_fingerprint"] == model_fingerprint(first.unet)  # passed on, not re-hashed
    meter = DriftMeter(pipe.unet, pipe.scheduler, ch, cfg.sampler, seed=cfg.seed + 7)
    assert meter(ms.gate_values(), res.unet)["rel"] == pytest.approx(res.rungs[1].drift_rel, rel=1e-6)
    over = calibrate(pipe.unet, pipe.scheduler, cl, ch, cfg, CalibrationConfig(ladder=(5.0, 50.0), budget=1e-12,
                                                                                rung_steps=2))
    assert over.over_budget and over.maskset.model_fingerprint == model_fingerprint(over.unet)  # the first rung's
    frozen = calibrate(pipe.unet, pipe.scheduler, cl, ch, FAST, CalibrationConfig(ladder=(5.0,), budget=1e9))
    assert frozen.unet is None and "teacher_fingerprint" not in frozen.maskset.meta


TOY = Path(__file__).parents[2] / "uniforget" / "toy"


@pytest.mark.skipif(not (TOY / "pipeline" / "model_index.json").is_file(), reason="toy pipeline not trained")
def test_calibration_reads_neutral_prompts_only(tmp_path, monkeypatch):
    """Every prompt the run encodes is a neutral training prompt; nothing memorized or held out for
    evaluation is encoded, and no planted image or evaluation file is opened. Fails if one enters the choice."""
    import builtins

    import uniforget.sampler as sampler
    from uniforget.learn import LearnRequest, run_learn

    seen: list[str] = []
    real_encode = sampler.encode_prompts

    def spy(pipe, prompts, *a, **kw):
        seen.extend(prompts)
        return real_encode(pipe, prompts, *a, **kw)

    monkeypatch.setattr(sampler, "encode_prompts", spy)
    opened: list[str] = []
    real_open = builtins.open

    def watch(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", watch)
    from PIL import Image

    real_img = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **kw: (opened.append(str(fp)), real_img(fp, *a, **kw))[1])

    cfg = LearnConfig(steps=1, batch=2, sampler=SamplerConfig(steps=1))
    req = LearnRequest(model="toy", out=tmp_path / "m.safetensors", config=cfg, checkpoint_every=0, drift_prompts=0,
                       calibration=CalibrationConfig(ladder=(1.0, 2.0), rung_steps=1), device="cpu")
    ms = run_learn(req).maskset
    train = set((TOY / "prompts_train.txt").read_text().split("\n")) - {""}
    ev = json.loads((TOY / "prompts_eval.json").read_text())
    forbidden = {e["prompt"] for e in ev["neutral"]} | {m["caption"] for m in ev["memorized"]}
    spec = json.loads((TOY / "spec.json").read_text())
    forbidden |= {m["caption"] for m in spec["memorized"]}
    assert seen and set(seen) <= train, set(seen) - train
    assert not set(seen) & forbidden
    assert not [f for f in opened if "items" in Path(f).parts or f.endswith(("prompts_eval.json", "spec.json"))]
    assert ms.meta["beta_mode"] == "auto" and float(ms.meta["neutral_drift_rel_holdout"]) >= 0
    assert np.isfinite(float(ms.meta["beta"]))


def _rung(beta: float, drift: float, se: float, median: float = 0.0, median_se: float = 0.0) -> Rung:
    return Rung(beta, drift, 0.0, {}, {}, 1, 0.0, se, median, median_se)


def test_close_call_flags_a_decision_within_one_standard_error():
    """The shipped toy's ladder (docs section 0k/0l): beta 5 at 0.193 +- 0.020 under the budget 0.2 is a close
    call; the same ladder with a tight spread is not; and the stopping rung counts as much as the kept one."""
    ladder = [_rung(1, 0.095, 0.009), _rung(2, 0.142, 0.012), _rung(5, 0.193, 0.020), _rung(10, 0.243, 0.020)]
    msg = close_call(ladder, 2, 0.2)
    assert "beta 5" in msg and "0.193 +- 0.020" in msg and "beta 10" not in msg
    tight = [replace(r, drift_se=0.002) for r in ladder]
    assert close_call(tight, 2, 0.2) == ""
    stopper = ladder[:2] + [_rung(5, 0.215, 0.02)]  # kept beta 2 is clear of the budget; beta 5 stopped within 1 s.e.
    assert "next beta 5" in close_call(stopper, 1, 0.2) and "kept" not in close_call(stopper, 1, 0.2)
    # the statistic the budget bounds decides: the median here is clear of it where the pooled drift is not
    med = [_rung(1, 0.10, 0.01, 0.08, 0.01), _rung(5, 0.195, 0.03, 0.15, 0.005), _rung(10, 0.25, 0.03, 0.3, 0.01)]
    assert close_call(med, 1, 0.2, "pooled") and not close_call(med, 1, 0.2, "median")
    # over budget at the first rung: nothing was kept within it, so there is no close call to report
    assert close_call([_rung(1, 0.21, 0.02)], 0, 0.2, over=True) == ""
