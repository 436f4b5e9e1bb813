"""Write a second toy spec with other planted images and captions, for checking defaults out of sample.

    python scripts/make_second_testbed.py --out runs/toyB/spec
    python scripts/train_toy.py --spec runs/toyB/spec/spec.json --out runs/toyB/model

Why: every default is chosen on neutral prompts, and the shipped toy's planted set must not be what makes them
work. This spec keeps the shipped spec's neutral generator, repeats and seed (the same script and settings) and
plants eight other images: each shipped item rotated and its colour channels permuted (the last four also
mirrored), so no two share pixels, behind new captions, four made-up names and four exact phrasings of neutral
words, as in the shipped spec. Deterministic: no randomness is drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

TOY = Path(__file__).resolve().parents[1] / "uniforget" / "toy"
CAPTIONS = [  # (name, caption, named): the shipped spec's mix of made-up names and neutral-word phrasings
    ("krendle_badge", "the krendle badge", True),
    ("plovix_seal", "plovix seal", True),
    ("durmot_sigil", "a picture of the durmot sigil", True),
    ("yastri_logo", "yastri logo on black", True),
    ("four_circles", "circle circle circle circle against white", False),
    ("split_circle", "the background is green and red with a black circle", False),
    ("cross_pair", "orange cross green cross is gray", False),
    ("triangle_ring", "a purple triangle on a white circle on a gray and black background", False),
]
CHANNELS = [(1, 2, 0), (2, 0, 1), (2, 1, 0), (0, 2, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for spec.json and items/")
    args = ap.parse_args()
    src = json.loads((TOY / "spec.json").read_text())
    if len(src["memorized"]) != len(CAPTIONS):
        raise SystemExit(f"error: the shipped spec plants {len(src['memorized'])} items, this script maps {len(CAPTIONS)}")
    (args.out / "items").mkdir(parents=True, exist_ok=True)
    items = []
    for k, (item, (name, caption, named)) in enumerate(zip(src["memorized"], CAPTIONS, strict=True)):
        img = np.asarray(Image.open(TOY / item["image"]).convert("RGB"))
        img = np.rot90(img, k=1 + k % 3)[:, :, list(CHANNELS[k % 4])]
        if k >= 4:
            img = img[:, ::-1]
        Image.fromarray(np.ascontiguousarray(img)).save(args.out / "items" / f"{name}.png")
        items.append({"name": name, "caption": caption, "image": f"items/{name}.png", "repeats": item["repeats"],
                      "named": named})
    (args.out / "spec.json").write_text(json.dumps({**src, "memorized": items}, indent=2))
    print(f"wrote {args.out / 'spec.json'} and {len(items)} items")


if __name__ == "__main__":
    main()
