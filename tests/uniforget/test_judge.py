"""The toy judge reads shape and colour from pixels: right on fresh renders, robust to blur and noise,
and it says so when there is no object (so a blank generation is never scored correct)."""

from __future__ import annotations

import numpy as np

from uniforget.toy.data import load_spec, neutral_scenes, render
from uniforget.toy.judge import NONE, load_judge


def _scenes(n: int, seed: int):
    spec = load_spec()
    sc = neutral_scenes(spec, n, seed)
    return sc, np.stack([render(s, c, b, spec.size, cx, cy, r) for s, c, b, cx, cy, r in sc])


def test_reads_fresh_renders():
    sc, imgs = _scenes(300, 2024)
    shapes, colours = load_judge().predict(imgs)
    assert np.mean([p == t[0] for p, t in zip(shapes, sc, strict=True)]) >= 0.99
    assert np.mean([p == t[1] for p, t in zip(colours, sc, strict=True)]) >= 0.99


def test_robust_to_blur_and_noise():
    sc, imgs = _scenes(200, 7)
    rng = np.random.default_rng(0)
    p = np.pad(imgs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")  # 3x3 binomial blur, edges replicated
    rows = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    blurred = 0.25 * rows[:, :, :-2] + 0.5 * rows[:, :, 1:-1] + 0.25 * rows[:, :, 2:]
    noisy = np.clip(blurred + rng.normal(0, 0.05, imgs.shape), 0, 1).astype(np.float32)
    shapes, colours = load_judge().predict(noisy)
    assert np.mean([p == t[0] and q == t[1] for p, q, t in zip(shapes, colours, sc, strict=True)]) >= 0.95


def test_blank_image_is_no_object():
    shapes, colours = load_judge().predict(np.full((2, 32, 32, 3), 0.5, dtype=np.float32))
    assert shapes == [NONE, NONE] and colours == [NONE, NONE]


def test_wrong_shape_is_caught():
    spec = load_spec()
    square = render("square", "red", "white", spec.size, 16, 16, 9)
    circle = render("circle", "red", "white", spec.size, 16, 16, 9)
    shapes, _ = load_judge().predict(np.stack([square, circle]))
    assert shapes == ["square", "circle"]
