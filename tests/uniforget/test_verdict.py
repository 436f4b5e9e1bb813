"""The verdict sentence: not reduced when the copy rate did not move, reduced only beyond the controls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from uniforget.verdict import decide, judge_within


def ev(copy, nn=None, judge=0.95, n=144, wen=0.95):
    return SimpleNamespace(memorized=SimpleNamespace(copy_rate=copy, nn_identity=copy if nn is None else nn),
                           judge_accuracy=judge, n_neutral=n, wen_auc=wen)


def test_unmoved_copy_rate_is_not_reduced_on_a_real_evaluation(planted_eval_data):
    """End to end: the same tiny model evaluated twice (nothing removed) copies as much, so: not reduced."""
    from uniforget.evaluate import EvalConfig, evaluate
    from uniforget.geometries import tiny_pipeline

    pipe = tiny_pipeline(image_size=32, text_len=16)
    caps = ("the zorblax mascot", "quillon emblem")
    data = planted_eval_data(pipe, caps, ("a red circle", "a blue square"), ("circle", "square"), ("red", "blue"),
                             steps=2, guidance=3.0)
    cfg = EvalConfig(seeds=1, steps=2, guidance=3.0, perturb_norms=(), optimized_norm=None, empty_seeds=0)
    a = evaluate(pipe, data, cfg, label="original")
    b = evaluate(pipe, data, cfg, reference=a, label="slim")
    assert a.memorized.copy_rate == 1.0
    v = decide(a, b, {"random": b, "shuffled": b})
    assert v.status == "not reduced" and v.sentence.startswith("Memorization not reduced")
    assert "Next:" in v.sentence


def test_reduced_only_when_controls_reach_less_than_half():
    v = decide(ev(1.0), ev(0.05), {"random": ev(0.8), "shuffled": ev(0.9)})
    assert v.reduced and v.copy_reduction == pytest.approx(0.95)
    assert "reduced" in v.sentence and "random 80%" in v.sentence
    same = decide(ev(1.0), ev(0.05), {"random": ev(0.4)})  # random removal reaches 60% of a 95% drop
    assert same.status == "not beyond controls"


def test_quality_loss_and_no_memorization_are_said():
    hurt = decide(ev(1.0, judge=0.95), ev(0.0, judge=0.80), {"random": ev(1.0)})
    assert hurt.status == "not reduced" and "neutral quality" in hurt.sentence and hurt.judge_within_2se is False
    assert "a brief neutral retrain" in hurt.sentence
    # a retrain already ran (second testbed, beta 10 + 600 steps: copies -54%, judge 96.5% -> 91.7%): not "add one"
    after = decide(ev(1.0, judge=0.965), ev(0.45, judge=0.917), {"random": ev(0.88)}, retrained=True)
    assert after.status == "not reduced" and "a longer neutral retrain" in after.sentence
    assert "a brief neutral retrain" not in after.sentence and "in the retrained slim model" in after.sentence
    assert decide(ev(0.05), ev(0.0)).status == "nothing to reduce"
    nan = float("nan")
    unmeasured = decide(ev(nan, nan, judge=None), ev(nan, nan, judge=None, wen=0.55))
    assert unmeasured.status == "not measured" and "Wen's AUC 0.95 -> 0.55" in unmeasured.sentence


def test_judge_within_two_standard_errors():
    # Agresti-Coull s.e. of 0.95 at n=144 is 2.0 points: 3.5 points down is within 2 s.e., 4.5 points is not
    assert judge_within(ev(1, judge=0.95), ev(0, judge=0.915))
    assert not judge_within(ev(1, judge=0.95), ev(0, judge=0.905))
    # a perfect judge (the toy): 2 s.e. is 1.9 points, so one miss in 144 is within, four are not
    assert judge_within(ev(1, judge=1.0), ev(0, judge=143 / 144))
    assert not judge_within(ev(1, judge=1.0), ev(0, judge=140 / 144))
    assert judge_within(ev(1, judge=None), ev(0, judge=None)) is None


def test_global_mode_original_is_not_sent_to_stronger_masks():
    """On a model whose empty prompt copies too, "not reduced" must not advise more pruning (v1 toy: 100% -> 100%)."""
    from uniforget.signature import EmptyPromptCheck, read_signature

    glob = ev(1.0)
    glob.signature = read_signature(1.0, 1.0, EmptyPromptCheck(n=48, nearest_planted=0.5, copies=0.44, per_item_nearest={}), 0.0)
    assert glob.signature.kind == "global-mode"
    v = decide(glob, ev(1.0), {"random": ev(1.0)})
    assert v.status == "not reduced" and "global-mode" in v.sentence and "stronger masks" not in v.sentence
    spike = ev(1.0)
    spike.signature = read_signature(1.0, 1.0, EmptyPromptCheck(n=48, nearest_planted=0.0, copies=0.0, per_item_nearest={}), 1.0)
    assert "stronger masks" in decide(spike, ev(1.0)).sentence
    # nothing removed and the judge already down (second toy testbed: 86.1% -> 72.2%): do not advise more pruning
    spent = decide(ev(1.0, judge=0.86), ev(1.0, judge=0.72))
    assert spent.status == "not reduced" and "lower --budget" in spent.sentence and "learn stronger" not in spent.sentence
