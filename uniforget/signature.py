"""What kind of memorization a model shows: a prompt-triggered spike, a global mode, or none measured.

Why this matters: UniForget removes units that *neutral prompts do not need*. That can only remove
memorization that lives behind its captions (a spike in the conditional distribution, as in Stable
Diffusion, where Wen et al.'s text-conditional noise norm scores memorized prompts far higher). A model
whose *empty prompt* already reproduces its memorized images holds them as a global mode of the
unconditional model: every neutral prompt needs those units too, and no neutral-prompt method can take
them out (docs/dememorization.md measured exactly that on the v1 toy).

Two checks, both work on any pipeline:
- empty-prompt generations against the reference images, when references exist: the share whose nearest
  training image is a planted one, and the share that are strict copies (Gu et al.'s ratio test);
- Wen's AUC and its direction (memorized captions scoring higher is Wen's direction).
`read_signature` turns them, with the copy rate on the memorized captions, into one plain line.
Thresholds are the testbed's version-2 floors (TESTBED.md), stated here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .memorization import COPY_RATIO, detect_copies

EMPTY_NEAREST_MAX = 0.05  # empty prompt: share of generations nearest a planted image that is still "clean"
EMPTY_COPY_MAX = 0.02  # ... and share of strict copies
WEN_AUC_MIN = 0.9  # Wen's noise norm flags the memorized captions (in Wen's direction)
WEN_NO_SEPARATION = 0.1  # |AUC - 0.5| below this: the norm does not tell memorized from neutral
MEMORIZES = 0.5  # copy rate or NN identity at or above this: the model reproduces its references
PARTLY = 0.1  # copy rate at or above this (or NN identity >= 2 x this): partial, faded copies


@dataclass(frozen=True)
class EmptyPromptCheck:
    """Empty-prompt generations (one per seed) against the training/reference images."""

    n: int
    nearest_planted: float  # share whose nearest training image is a planted one
    copies: float  # share that pass the ratio test against a planted item
    per_item_nearest: dict[str, float]  # share nearest each planted item

    @property
    def clean(self) -> bool:
        return self.nearest_planted <= EMPTY_NEAREST_MAX and self.copies <= EMPTY_COPY_MAX


@dataclass(frozen=True)
class Signature:
    """The one-line reading, its short kind, and Wen's direction."""

    kind: str  # "prompt-triggered" | "global-mode" | "partial" | "none" | "wen-only" | "unmeasured"
    wen_direction: str  # "memorized higher" | "reversed" | "no separation" | "not measured"
    reading: str


def empty_prompt_check(images: np.ndarray, train_images: np.ndarray, train_item: np.ndarray,
                       item_names: tuple[str, ...], threshold: float = COPY_RATIO) -> EmptyPromptCheck:
    """Measure empty-prompt generations (N, H, W, 3) against the reference set (planted items have index >= 0)."""
    res = detect_copies(images, train_images, train_item, -1, threshold)
    nearest = res.nn1_group >= 0
    per_item = {name: float(np.mean(res.nn1_group == k)) for k, name in enumerate(item_names)}
    return EmptyPromptCheck(n=len(images), nearest_planted=float(np.mean(nearest)),
                            copies=res.any_item_copy_rate, per_item_nearest=per_item)


def wen_direction(auc: float | None) -> str:
    if auc is None:
        return "not measured"
    if abs(auc - 0.5) < WEN_NO_SEPARATION:
        return "no separation"
    return "memorized higher" if auc > 0.5 else "reversed"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def read_signature(copy_rate: float | None, nn_identity: float | None, empty: EmptyPromptCheck | None,
                   wen_auc: float | None) -> Signature:
    """One plain line saying what kind of memorization the numbers show, and what it means for UniForget.

    `copy_rate` / `nn_identity` are None where the model has no reference images for its suspect captions;
    `empty` None where the empty prompt was not checked; `wen_auc` None where guidance was off.
    """
    direction = wen_direction(wen_auc)
    wen_txt = "not measured" if wen_auc is None else f"AUC {wen_auc:.2f}, {direction}"
    if copy_rate is None:
        if wen_auc is None:
            return Signature("unmeasured", direction, "no reference images and no Wen score: memorization not checked")
        if wen_auc >= WEN_AUC_MIN:
            return Signature("wen-only", direction, f"Wen's noise norm flags the suspect captions ({wen_txt}); "
                             "no reference images to confirm copies")
        return Signature("wen-only", direction, f"Wen's noise norm does not flag the suspect captions ({wen_txt}); "
                         "no reference images to confirm copies")
    if empty is not None and not empty.clean:
        return Signature("global-mode", direction,
                         f"global-mode memorization: the empty prompt is nearest a planted image in "
                         f"{_pct(empty.nearest_planted)} and copies one in {_pct(empty.copies)} of {empty.n} "
                         "generations, which no neutral-prompt method can remove")
    empty_txt = "not checked" if empty is None else f"clean ({_pct(empty.nearest_planted)} nearest planted)"
    nn = nn_identity or 0.0
    if copy_rate >= MEMORIZES or nn >= MEMORIZES:
        if wen_auc is not None and wen_auc >= WEN_AUC_MIN:
            return Signature("prompt-triggered", direction,
                             f"prompt-triggered memorization, the kind real models show: copies {_pct(copy_rate)} "
                             f"(NN {_pct(nn)}), empty prompt {empty_txt}, Wen {wen_txt}")
        return Signature("prompt-triggered", direction,
                         f"prompt-triggered copies {_pct(copy_rate)} (NN {_pct(nn)}), empty prompt {empty_txt}, but "
                         f"Wen's noise norm does not single them out ({wen_txt})")
    if copy_rate >= PARTLY or nn >= 2 * PARTLY:
        return Signature("partial", direction, f"partial memorization: copies {_pct(copy_rate)}, faded copies "
                         f"(NN = planted) {_pct(nn)}, empty prompt {empty_txt}, Wen {wen_txt}")
    return Signature("none", direction, f"no memorization of the references measured: copies {_pct(copy_rate)}, "
                     f"NN {_pct(nn)}, Wen {wen_txt}")



THRESHOLDS = {"empty_nearest_max": EMPTY_NEAREST_MAX, "empty_copy_max": EMPTY_COPY_MAX, "wen_auc_min": WEN_AUC_MIN,
              "wen_no_separation": WEN_NO_SEPARATION, "memorizes": MEMORIZES, "partly": PARTLY}
