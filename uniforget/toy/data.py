"""Procedural training data for the toy: compositional neutral scenes plus planted ("memorized") images.

A dataset spec (JSON) fixes everything: the neutral generator's vocabulary, counts and seed, caption
templates for training and the held-out templates used only for evaluation, and the planted items (an image
file and a caption each, with a repeat count). The same spec + seed always yields the same dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPEC_PATH = Path(__file__).parent / "spec.json"

RGB = {
    "red": (0.86, 0.12, 0.12), "green": (0.12, 0.70, 0.20), "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.60, 0.15, 0.75), "orange": (0.98, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97), "black": (0.04, 0.04, 0.04), "gray": (0.50, 0.50, 0.50),
}


@dataclass(frozen=True)
class MemorizedItem:
    name: str
    caption: str
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    repeats: int
    named: bool  # True: trigger is a made-up name; False: unusual exact phrasing of neutral words


@dataclass(frozen=True)
class ToySpec:
    size: int
    seed: int
    n_neutral: int
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    train_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]
    memorized: tuple[MemorizedItem, ...]
    raw: dict


def load_spec(path: str | Path | None = None) -> ToySpec:
    """Read a dataset spec; item image paths are relative to the spec file."""
    from PIL import Image

    path = Path(path) if path else SPEC_PATH
    raw = json.loads(path.read_text())
    n = raw["neutral"]
    items = []
    for it in raw["memorized"]:
        img = Image.open(path.parent / it["image"]).convert("RGB").resize((raw["size"], raw["size"]), Image.NEAREST)
        items.append(MemorizedItem(it["name"], it["caption"], np.asarray(img, dtype=np.float32) / 255.0,
                                   int(it.get("repeats", 100)), bool(it.get("named", False))))
    return ToySpec(size=int(raw["size"]), seed=int(raw["seed"]), n_neutral=int(n["count"]),
                   shapes=tuple(n["shapes"]), colours=tuple(n["colours"]), backgrounds=tuple(n["backgrounds"]),
                   train_templates=tuple(n["train_templates"]), eval_templates=tuple(n["eval_templates"]),
                   memorized=tuple(items), raw=raw)


def render(shape: str, colour: str, background: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """One neutral scene: a filled shape of radius r (pixels) centred at (cx, cy) on a flat background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "square":
        m = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":
        m = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    elif shape == "cross":
        w = r * 0.35
        m = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    img = np.empty((size, size, 3), np.float32)
    img[:] = RGB[background]
    img[m] = RGB[colour]
    return img


def caption(template: str, shape: str, colour: str, background: str) -> str:
    return template.format(shape=shape, colour=colour, background=background)


def neutral_scenes(spec: ToySpec, count: int, seed: int) -> list[tuple[str, str, str, float, float, float]]:
    """(shape, colour, background, cx, cy, r) for `count` scenes; colour never equals background."""
    rng = np.random.default_rng(seed)
    s = spec.size
    out = []
    while len(out) < count:
        shape = spec.shapes[rng.integers(len(spec.shapes))]
        colour = spec.colours[rng.integers(len(spec.colours))]
        bg = spec.backgrounds[rng.integers(len(spec.backgrounds))]
        if colour == bg:
            continue
        r = float(rng.uniform(0.22, 0.34) * s)
        cx = float(rng.uniform(r, s - r))
        cy = float(rng.uniform(r, s - r))
        out.append((shape, colour, bg, cx, cy, r))
    return out


def neutral_training_set(spec: ToySpec) -> tuple[np.ndarray, list[str], list[tuple[str, str, str]]]:
    """The neutral half of the training data: images, captions (training templates), labels."""
    rng = np.random.default_rng(spec.seed + 1)
    imgs, caps, labels = [], [], []
    for shape, colour, bg, cx, cy, r in neutral_scenes(spec, spec.n_neutral, spec.seed):
        imgs.append(render(shape, colour, bg, spec.size, cx, cy, r))
        t = spec.train_templates[rng.integers(len(spec.train_templates))]
        caps.append(caption(t, shape, colour, bg))
        labels.append((shape, colour, bg))
    return np.stack(imgs), caps, labels


def training_images(spec: ToySpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct training image (neutral scenes, then one copy of each planted item) and its item index
    (-1 for neutral, else the planted item's index): the reference set for nearest-neighbour copy detection."""
    spec = spec or load_spec()
    neutral, _, _ = neutral_training_set(spec)
    items = np.stack([m.image for m in spec.memorized]) if spec.memorized else np.zeros((0, *neutral.shape[1:]))
    index = np.concatenate([np.full(len(neutral), -1), np.arange(len(items))]).astype(np.int64)
    return np.concatenate([neutral, items]).astype(np.float32), index


def training_pairs(spec: ToySpec) -> tuple[np.ndarray, list[str]]:
    """Images and captions as the denoiser sees them: neutral scenes once, planted items `repeats` times."""
    neutral, caps, _ = neutral_training_set(spec)
    imgs = [neutral]
    caps = list(caps)
    for m in spec.memorized:
        imgs.append(np.repeat(m.image[None], m.repeats, axis=0))
        caps += [m.caption] * m.repeats
    return np.concatenate(imgs).astype(np.float32), caps


def vocabulary(spec: ToySpec) -> list[str]:
    """Every word that any caption (training, evaluation or planted) can contain."""
    words: set[str] = set()
    for t in (*spec.train_templates, *spec.eval_templates):
        for s in spec.shapes[:1]:
            words.update(caption(t, s, spec.colours[0], spec.backgrounds[0]).split())
    words.update(spec.shapes)
    words.update(spec.colours)
    words.update(spec.backgrounds)
    for m in spec.memorized:
        words.update(m.caption.split())
    return sorted(w for w in words if w)


def eval_prompts(spec: ToySpec, per_template: int | None = None, seed: int = 12345) -> list[dict]:
    """Held-out neutral prompts: evaluation templates only (never seen in training or mask learning)."""
    rng = np.random.default_rng(seed)
    combos = [(s, c, b) for s in spec.shapes for c in spec.colours for b in spec.backgrounds if c != b]
    out = []
    for t in spec.eval_templates:
        pick = combos if per_template is None else [combos[i] for i in rng.permutation(len(combos))[:per_template]]
        for s, c, b in pick:
            out.append({"prompt": caption(t, s, c, b), "shape": s, "colour": c, "background": b})
    return out


def mask_learning_prompts(spec: ToySpec, count: int = 96, seed: int = 777) -> list[str]:
    """Neutral prompts for mask learning: training templates only, so disjoint from `eval_prompts`."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        s = spec.shapes[rng.integers(len(spec.shapes))]
        c = spec.colours[rng.integers(len(spec.colours))]
        b = spec.backgrounds[rng.integers(len(spec.backgrounds))]
        t = spec.train_templates[rng.integers(len(spec.train_templates))]
        p = caption(t, s, c, b)
        if c != b and p not in seen:
            seen.add(p)
            out.append(p)
    return out
