"""The toy's judge: reads shape and colour from generated pixels with fixed geometric rules (no training).

Why rules and not a learned classifier: a judge that is itself trained can fail silently on exactly the
images we care about (blurry, half-formed generations); these rules are inspectable and were checked on
fresh renders of the neutral generator (tests/uniforget/test_judge.py).

Per image: the background colour is the median of the 1-pixel border; foreground = pixels farther than half
of the largest distance from it; colour = nearest palette entry to the median of the object's core; shape
from the foreground's bounding-box fill ratio and top-bottom symmetry (a triangle is the only asymmetric
shape; square fills its box, circle ~pi/4, cross ~0.58).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import RGB, SPEC_PATH

NONE = "none"  # no object found


class Judge:
    """Reads (shape, colour) from images (N, H, W, 3) float in [0, 1]."""

    def __init__(self, shapes: list[str], colours: list[str]):
        unknown = [c for c in colours if c not in RGB]
        if unknown:
            raise ValueError(f"judge: no RGB value for colours {unknown}")
        self.shapes = shapes
        self.colours = colours
        self._palette = np.array([RGB[c] for c in colours], dtype=np.float32)  # (C, 3)

    def _one(self, img: np.ndarray) -> tuple[str, str]:
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (4W, 3)
        bg = np.median(border, axis=0)
        dist = np.linalg.norm(img - bg, axis=-1)  # (H, W)
        peak = float(dist.max())
        if peak < 0.2:
            return NONE, NONE
        mask = dist > 0.5 * peak
        core = img[dist > 0.75 * peak]
        colour = self.colours[int(np.argmin(np.linalg.norm(self._palette - np.median(core, axis=0), axis=1)))]
        ys, xs = np.nonzero(mask)
        box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        fill = float(box.mean())
        flipped = box[::-1]
        sym = float((box & flipped).sum() / max(1, (box | flipped).sum()))
        if sym < 0.75:
            shape = "triangle"
        elif fill >= 0.9:
            shape = "square"
        elif fill >= 0.68:
            shape = "circle"
        else:
            shape = "cross"
        return (shape if shape in self.shapes else NONE), colour

    def predict(self, images: np.ndarray) -> tuple[list[str], list[str]]:
        out = [self._one(np.asarray(im, dtype=np.float32)) for im in images]
        return [s for s, _ in out], [c for _, c in out]


def load_judge(path: str | Path | None = None) -> Judge:
    """The judge for a dataset spec's labels: `path` is a spec JSON, or a folder holding spec.json/judge.json;
    default: the shipped toy spec."""
    p = Path(path) if path else SPEC_PATH
    if p.is_dir():
        p = p / "judge.json" if (p / "judge.json").is_file() else p / "spec.json"
    raw = json.loads(p.read_text())
    labels = raw.get("neutral", raw)
    return Judge(list(labels["shapes"]), list(labels["colours"]))
