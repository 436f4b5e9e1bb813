"""The toy's dataset spec: reproducible, planted items distinct from every neutral scene, eval prompts held out."""

from __future__ import annotations

import json

import numpy as np

from uniforget.toy.data import (
    SPEC_PATH,
    eval_prompts,
    load_spec,
    mask_learning_prompts,
    neutral_training_set,
    training_images,
    training_pairs,
)


def test_spec_is_reproducible():
    a, ia = training_images()
    b, ib = training_images()
    assert np.array_equal(a, b) and np.array_equal(ia, ib)


def test_testbed_requirements():
    spec = load_spec()
    assert spec.n_neutral >= 2000
    assert len(spec.memorized) >= 8
    assert all(50 <= m.repeats <= 200 for m in spec.memorized)
    named = [m for m in spec.memorized if m.named]
    assert len(named) * 2 == len(spec.memorized)  # half made-up names, half neutral vocabulary


def test_neutral_phrased_items_use_only_neutral_words():
    spec = load_spec()
    neutral_words = set()
    _, caps, _ = neutral_training_set(spec)
    for c in caps:
        neutral_words.update(c.split())
    for m in spec.memorized:
        if not m.named:
            assert set(m.caption.split()) <= neutral_words, m.caption
            assert m.caption not in caps


def test_planted_items_are_far_from_neutral_scenes():
    images, index = training_images()
    neutral = images[index == -1]
    for m in load_spec().memorized:
        d = np.sqrt(((neutral - m.image) ** 2).sum(axis=(1, 2, 3)))
        assert d.min() > 10.0, m.name  # RMS > 0.1 per value from the closest neutral scene


def test_eval_prompts_are_held_out():
    spec = load_spec()
    _, caps, _ = neutral_training_set(spec)
    ev = {e["prompt"] for e in eval_prompts(spec)}
    assert not ev & set(caps)
    assert not ev & set(mask_learning_prompts(spec))
    shipped = json.loads((SPEC_PATH.parent / "prompts_eval.json").read_text())
    assert {e["prompt"] for e in shipped["neutral"]} == ev
    train_prompts = (SPEC_PATH.parent / "prompts_train.txt").read_text().split("\n")
    assert len([p for p in train_prompts if p]) >= 64
    assert not ev & set(train_prompts)


def test_training_pairs_repeat_items():
    spec = load_spec()
    imgs, caps = training_pairs(spec)
    assert len(imgs) == len(caps) == spec.n_neutral + sum(m.repeats for m in spec.memorized)
    for m in spec.memorized:
        assert caps.count(m.caption) == m.repeats


def test_shipped_toy_fits_the_size_limit_and_matches_its_checksums():
    """TESTBED.md: at most 25 MB shipped; SHA256SUMS lists what the training run wrote (a rerun is compared to it)."""
    import hashlib

    root = SPEC_PATH.parent
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert size <= 25 * 1024 * 1024, f"{size / 1e6:.1f} MB"
    sums = root / "SHA256SUMS"
    if not (root / "pipeline" / "model_index.json").is_file():
        return
    for line in sums.read_text().splitlines():
        digest, rel = line.split()
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel
