"""The memorization-kind check: a model whose empty prompt copies is flagged, Wen's direction is read right."""

from __future__ import annotations

import json

import numpy as np
import pytest

from uniforget.evaluate import EvalConfig, EvalData, evaluate
from uniforget.generate import generate
from uniforget.geometries import tiny_pipeline
from uniforget.signature import (
    EmptyPromptCheck,
    empty_prompt_check,
    read_signature,
    wen_direction,
)

STEPS, GUIDANCE = 3, 3.0
CAPTIONS = ("the zorblax mascot", "quillon emblem")
NEUTRAL = ("a red circle", "a blue square", "a green star")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(image_size=32, text_len=16)


def _blocky(n: int, size: int, seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).uniform(0, 1, (n, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(small, size // 4, axis=1), size // 4, axis=2)


def _data(items: np.ndarray, neutral: np.ndarray | None = None) -> EvalData:
    neutral = _blocky(40, items.shape[1]) if neutral is None else neutral
    return EvalData(NEUTRAL, CAPTIONS, (0, 1), ("zorblax", "quillon"), items,
                    np.concatenate([neutral, items]), np.concatenate([np.full(len(neutral), -1), np.arange(len(items))]))


CFG = EvalConfig(seeds=2, steps=STEPS, guidance=GUIDANCE, batch_size=8, perturb_norms=(), optimized_norm=None,
                 empty_seeds=6)


def test_model_whose_empty_prompt_copies_is_flagged_global_mode(pipe):
    # planted "memorized" images = the model's own empty-prompt generations: its unconditional mode IS the copy
    items = generate(pipe, [""], [0, 1], steps=STEPS, guidance=GUIDANCE)
    ev = evaluate(pipe, _data(items), CFG)
    assert ev.empty_prompt is not None and ev.empty_prompt.n == 6
    assert ev.empty_prompt.nearest_planted >= 2 / 6 and ev.empty_prompt.copies >= 2 / 6  # seeds 0 and 1 copy exactly
    assert ev.signature.kind == "global-mode"
    assert "empty prompt" in ev.signature.reading


def test_caption_copies_with_a_clean_empty_prompt_are_prompt_triggered(pipe):
    items = generate(pipe, list(CAPTIONS), [0], steps=STEPS, guidance=GUIDANCE)  # each caption's seed-0 output
    # the empty prompt reproduces *neutral* training images (its own outputs), never a planted one
    neutral = np.concatenate([_blocky(20, 32), generate(pipe, [""], range(6), steps=STEPS, guidance=GUIDANCE)])
    ev = evaluate(pipe, _data(items, neutral), CFG)
    assert ev.memorized.nn_identity >= 0.5
    assert ev.empty_prompt is not None and ev.empty_prompt.clean, ev.empty_prompt
    assert ev.signature.kind == "prompt-triggered"


def test_empty_seeds_zero_skips_the_check(pipe):
    items = generate(pipe, list(CAPTIONS), [0], steps=STEPS, guidance=GUIDANCE)
    ev = evaluate(pipe, _data(items), EvalConfig(**{**CFG.__dict__, "empty_seeds": 0}))
    assert ev.empty_prompt is None
    assert ev.to_json()["empty_prompt"] is None and "signature" in ev.to_json()


def test_without_references_only_wen_is_measured(pipe):
    empty = np.zeros((0, 32, 32, 3), np.float32)
    data = EvalData(NEUTRAL, CAPTIONS, (0, 1), ("a", "b"), empty, empty, np.zeros(0, np.int64))
    ev = evaluate(pipe, data, CFG)
    assert ev.signature.kind == "wen-only" and ev.empty_prompt is None
    assert ev.wen_auc is not None
    assert ev.to_json()["memorized"]["copy_rate"] is None  # NaN -> null, never a made-up number


def test_eval_file_for_any_model(tmp_path, pipe):
    from PIL import Image

    items = generate(pipe, list(CAPTIONS), [0], steps=STEPS, guidance=GUIDANCE)
    for i, im in enumerate(items):
        Image.fromarray((im * 255).round().astype(np.uint8)).save(tmp_path / f"item{i}.png")
    (tmp_path / "refs").mkdir()
    for i, im in enumerate(_blocky(5, 32)):
        Image.fromarray((im * 255).round().astype(np.uint8)).save(tmp_path / "refs" / f"n{i}.png")
    f = tmp_path / "eval.json"
    f.write_text(json.dumps({"neutral": list(NEUTRAL), "references": "refs",
                             "memorized": [{"caption": c, "image": f"item{i}.png"} for i, c in enumerate(CAPTIONS)]}))
    data = EvalData.from_file(f, 32)
    assert data.has_references and data.train_images.shape == (7, 32, 32, 3)
    assert list(data.train_item) == [-1] * 5 + [0, 1]
    f.write_text(json.dumps({"neutral": [], "memorized": []}))
    from uniforget.errors import UniforgetError

    with pytest.raises(UniforgetError, match="'neutral' must be a non-empty list"):
        EvalData.from_file(f, 32)


@pytest.mark.parametrize("auc,want", [(0.97, "memorized higher"), (0.03, "reversed"), (0.0, "reversed"),
                                      (0.5, "no separation"), (0.55, "no separation"), (None, "not measured")])
def test_wen_direction(auc, want):
    assert wen_direction(auc) == want


def test_reversed_wen_is_never_read_as_flagging_memorization():
    clean = EmptyPromptCheck(48, 0.0, 0.0, {})
    s = read_signature(1.0, 1.0, clean, 0.0)  # the v1 toy's numbers: separated, but the wrong way round
    assert s.kind == "prompt-triggered" and s.wen_direction == "reversed"
    assert "does not single them out" in s.reading
    good = read_signature(1.0, 1.0, clean, 0.98)
    assert "the kind real models show" in good.reading and good.wen_direction == "memorized higher"
    assert read_signature(None, None, None, 0.95).kind == "wen-only"
    assert "does not flag" in read_signature(None, None, None, 0.2).reading


def test_empty_prompt_thresholds_are_the_testbed_floors():
    assert EmptyPromptCheck(48, 0.05, 0.02, {}).clean
    assert not EmptyPromptCheck(48, 0.0625, 0.0, {}).clean  # 3 of 48 nearest planted: over 5%
    assert not EmptyPromptCheck(48, 0.0, 0.0417, {}).clean  # 2 of 48 copies: over 2%
    s = read_signature(1.0, 1.0, EmptyPromptCheck(48, 0.5, 0.44, {}), 0.0)  # the v1 toy's measured numbers
    assert s.kind == "global-mode" and "44%" in s.reading
    assert read_signature(0.0, 0.05, EmptyPromptCheck(48, 0.0, 0.0, {}), 0.5).kind == "none"
    assert read_signature(0.2, 0.6, EmptyPromptCheck(48, 0.0, 0.0, {}), 0.95).kind == "prompt-triggered"
    assert read_signature(0.15, 0.3, EmptyPromptCheck(48, 0.0, 0.0, {}), 0.95).kind == "partial"


def test_empty_prompt_check_counts_per_item():
    items = _blocky(2, 32, seed=5)
    train = np.concatenate([_blocky(10, 32, seed=1), items])
    index = np.concatenate([np.full(10, -1), [0, 1]])
    gens = np.stack([items[0], items[0], items[1], train[3]])
    c = empty_prompt_check(gens, train, index, ("a", "b"))
    assert c.n == 4 and c.nearest_planted == 0.75 and c.copies == 0.75
    assert c.per_item_nearest == {"a": 0.5, "b": 0.25}
