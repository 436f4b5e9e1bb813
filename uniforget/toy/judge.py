"""The toy's judge: reads shape and colour from generated pixels with fixed geometric rules (no training).

Why rules and not a learned classifier: a judge that is itself trained can fail silently on exactly the
images we care about (blurry, half-formed generations); these rules are inspectable and were checked on
fresh renders of the neutral generator (tests/uniforget/test_judge.py).

Per image: the background colour is the median of the 1-pixel border; foreground = pixels farther than half
of the largest distance from it; colour = nearest palette entry to the median of the object's core; shape =
the template (each shape rendered by the data generator, cropped to its box) whose mask overlaps the
object's box-normalized mask best (IoU). Generations are blobby: nearest template, not exact geometry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import RGB, SPEC_PATH, render

NONE = "none"  # no object found
_GRID = 16  # masks are compared on a 16x16 grid after cropping to their bounding box


def _normalized(mask: np.ndarray) -> np.ndarray:
    """Crop a boolean mask to its bounding box and resample it to (_GRID, _GRID) as fractions in [0, 1]."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    img = Image.fromarray((box * 255).astype(np.uint8)).resize((_GRID, _GRID), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _template(shape: str) -> np.ndarray:
    return _normalized(render(shape, "white", "black", 64, 32.0, 32.0, 24.0)[..., 0] > 0.5)


class Judge:
    """Reads (shape, colour) from images (N, H, W, 3) float in [0, 1]."""

    def __init__(self, shapes: list[str], colours: list[str]):
        unknown = [c for c in colours if c not in RGB]
        if unknown:
            raise ValueError(f"judge: no RGB value for colours {unknown}")
        self.shapes = shapes
        self.colours = colours
        self._palette = np.array([RGB[c] for c in colours], dtype=np.float32)  # (C, 3)
        self._templates = np.stack([_template(sh) for sh in shapes])  # (S, _GRID, _GRID)

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
        m = _normalized(mask)[None]  # (1, G, G)
        t = self._templates
        iou = np.minimum(m, t).sum(axis=(1, 2)) / np.maximum(m, t).sum(axis=(1, 2))  # soft IoU per template
        return self.shapes[int(np.argmax(iou))], colour

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
