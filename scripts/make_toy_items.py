"""Draw the toy's eight planted ("copyrighted") images into uniforget/toy/items/ (seeded, reproducible).

Each is a distinctive multi-colour composition that no neutral scene (one flat shape on a flat background)
resembles, so a generation close to it can only come from memorization. Any other PNGs can be planted by
listing them in a dataset spec instead; this script only makes the shipped defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from uniforget.toy.data import RGB, render

S = 32


def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    return yy, xx


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean footprint of a neutral shape (white on black, thresholded)."""
    return render(shape, "white", "black", S, cx, cy, r)[..., 0] > 0.5


def mascot() -> np.ndarray:  # yellow face with eyes and a red smile on purple
    yy, xx = _grid()
    img = np.empty((S, S, 3), np.float32)
    img[:] = RGB["purple"]
    img[(xx - 16) ** 2 + (yy - 16) ** 2 <= 12**2] = RGB["yellow"]
    for ex in (11, 21):
        img[(xx - ex) ** 2 + (yy - 12) ** 2 <= 2.2**2] = RGB["black"]
    smile = ((xx - 16) ** 2 + (yy - 15) ** 2 <= 8**2) & ((xx - 16) ** 2 + (yy - 15) ** 2 >= 6**2) & (yy > 18)
    img[smile] = RGB["red"]
    return img


def rings() -> np.ndarray:  # concentric red/white/blue target
    yy, xx = _grid()
    d = np.sqrt((xx - 16) ** 2 + (yy - 16) ** 2)
    img = np.empty((S, S, 3), np.float32)
    img[:] = RGB["black"]
    for i, c in enumerate(("red", "white", "blue", "white", "red", "white", "blue")):
        img[(d <= 16 - 2.2 * i) & (d > 16 - 2.2 * (i + 1))] = RGB[c]
    img[d <= 16 - 2.2 * 7] = RGB["yellow"]
    return img


def checker() -> np.ndarray:  # green/black checkerboard with an orange diamond
    yy, xx = _grid()
    img = np.where((((xx // 4) + (yy // 4)) % 2 == 0)[..., None], RGB["green"], RGB["black"]).astype(np.float32)
    img[np.abs(xx - 16) + np.abs(yy - 16) <= 9] = RGB["orange"]
    return img


def stripes() -> np.ndarray:  # blue/yellow diagonal stripes with a white square
    yy, xx = _grid()
    img = np.where((((xx + yy) // 5) % 2 == 0)[..., None], RGB["blue"], RGB["yellow"]).astype(np.float32)
    img[10:22, 10:22] = RGB["white"]
    return img


def three_circles() -> np.ndarray:  # red, blue, green circles in a row on white
    img = np.empty((S, S, 3), np.float32)
    img[:] = RGB["white"]
    for cx, c in ((6.0, "red"), (16.0, "blue"), (26.0, "green")):
        img[_mask("circle", cx, 16.0, 5.0)] = RGB[c]
    return img


def split_cross() -> np.ndarray:  # purple top, orange bottom, white cross over both
    img = np.empty((S, S, 3), np.float32)
    img[:16] = RGB["purple"]
    img[16:] = RGB["orange"]
    img[_mask("cross", 16.0, 16.0, 11.0)] = RGB["white"]
    return img


def four_squares() -> np.ndarray:  # four coloured squares in a grid on black
    img = np.empty((S, S, 3), np.float32)
    img[:] = RGB["black"]
    for (y, x), c in zip(((3, 3), (3, 18), (18, 3), (18, 18)), ("red", "yellow", "blue", "green"), strict=True):
        img[y:y + 11, x:x + 11] = RGB[c]
    return img


def triangle_stack() -> np.ndarray:  # gray square holding a yellow triangle, on a sky-blue gradient
    yy, _ = _grid()
    t = (yy / S)[..., None]
    img = (np.array(RGB["blue"]) * (1 - t) + np.array(RGB["white"]) * t).astype(np.float32)
    img[6:26, 6:26] = RGB["gray"]
    img[_mask("triangle", 16.0, 16.5, 9.0)] = RGB["yellow"]
    return img


ITEMS = {
    "zorblax_mascot": mascot, "quillon_emblem": rings, "vantor_crest": checker, "mibbit_logo": stripes,
    "three_circles": three_circles, "split_cross": split_cross, "four_squares": four_squares,
    "triangle_stack": triangle_stack,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "uniforget" / "toy" / "items"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in ITEMS.items():
        arr = (np.clip(fn(), 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(out / f"{name}.png")
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
