"""The evaluation-prompts file for any model (`validate --prompts`, `uniforget-export --eval-prompts`), read and
checked without torch, so a malformed file is refused before a model is loaded or any stage runs::

    {"neutral": ["a photo of a harbour at dawn", ...],
     "memorized": [{"caption": "...", "image": "refs/item.png", "name": "item0"}, {"caption": "..."}],
     "references": "train_sample/"}

Paths are relative to the file. Either every memorized caption has a reference image or none has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UniforgetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FORMAT = ('{"neutral": ["prompt", ...], "memorized": [{"caption": "...", "image": "optional.png"}, ...], '
          '"references": "optional folder/"}')


@dataclass(frozen=True)
class SuspectCaption:
    caption: str
    image: Path | None  # resolved against the file's folder
    name: str


@dataclass(frozen=True)
class EvalPromptsFile:
    path: Path
    neutral: tuple[str, ...]
    memorized: tuple[SuspectCaption, ...]
    references: tuple[Path, ...]  # further (neutral) training images, sorted by name

    @property
    def has_images(self) -> bool:
        return bool(self.memorized) and self.memorized[0].image is not None


def read_eval_prompts(path: str | Path) -> EvalPromptsFile:
    """Parse and check the file; every problem is one UniforgetError line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise UniforgetError(f"evaluation prompts file not found: {path}"
                             + (" (it is a folder)" if path.is_dir() else ""))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UniforgetError(f"{path} is not UTF-8 JSON text (want {FORMAT})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UniforgetError(f"cannot read evaluation prompts {path}: {e} (want {FORMAT})") from None
    if not isinstance(raw, dict):
        raise UniforgetError(f"{path}: the top level must be a JSON object (want {FORMAT})")
    neutral = raw.get("neutral")
    if not isinstance(neutral, list) or not neutral or not all(isinstance(p, str) and p.strip() for p in neutral):
        raise UniforgetError(f"{path}: 'neutral' must be a non-empty list of prompt strings (want {FORMAT})")
    mem = raw.get("memorized")
    if not isinstance(mem, list) or not mem:
        raise UniforgetError(f"{path}: 'memorized' must be a non-empty list of {{'caption': ...}} objects "
                             f"(want {FORMAT})")
    items = tuple(_suspect(path, i, m) for i, m in enumerate(mem))
    if len({m.image is None for m in items}) > 1:
        raise UniforgetError(f"{path}: give a reference image for every memorized caption, or for none")
    return EvalPromptsFile(path=path, neutral=tuple(neutral), memorized=items, references=_references(path, raw))


def _suspect(path: Path, i: int, m: Any) -> SuspectCaption:
    if not isinstance(m, dict) or not isinstance(m.get("caption"), str) or not m["caption"].strip():
        raise UniforgetError(f"{path}: memorized[{i}] must be an object with a non-empty 'caption' string")
    image = m.get("image")
    if image is not None and not isinstance(image, str):
        raise UniforgetError(f"{path}: memorized[{i}]['image'] must be a path string")
    img = path.parent / image if image else None
    if img is not None and not img.is_file():
        raise UniforgetError(f"{path}: memorized[{i}]'s reference image not found: {img}")
    return SuspectCaption(caption=m["caption"], image=img, name=str(m.get("name", f"item{i}")))


def _references(path: Path, raw: dict) -> tuple[Path, ...]:
    ref = raw.get("references")
    if not ref:
        return ()
    folder = path.parent / str(ref)
    if not folder.is_dir():
        raise UniforgetError(f"{path}: 'references' folder not found: {folder}")
    return tuple(sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
