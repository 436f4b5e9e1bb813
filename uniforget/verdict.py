"""One plain sentence on whether memorization went down, and by how much against the controls.

Why a rule and not a reading by eye: small models lose memorized images to *any* damage (METHOD.md), so a
drop in copy rate means something only beside controls that damage neutral outputs as much (random removal
and shuffled gates at matched neutral drift). The rule, stated once:

- reduced: the strict copy rate fell by at least `MIN_REDUCTION` (relative), the neutral judge (where there
  is one) stayed within two standard errors, and every control at matched drift reached less than half
  of that reduction;
- reduced, not beyond the controls: the copy rate fell, but a control fell at least half as far;
- not reduced: the copy rate fell by less than `MIN_REDUCTION`;
- nothing to reduce: the original copies in less than `MIN_ORIGINAL` of its generations;
- not measured: no reference images (a user's model): then what could be checked (Wen's AUC, the
  empty-prompt signature) is said instead, and what could not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MIN_REDUCTION = 0.5  # relative drop in strict copy rate that counts as "reduced"
MIN_ORIGINAL = 0.1  # original copy rate below which there is nothing to reduce
CONTROL_SHARE = 0.5  # a control reaching this share of the learned reduction explains it


@dataclass(frozen=True)
class Verdict:
    status: str  # "reduced" | "not beyond controls" | "not reduced" | "nothing to reduce" | "not measured"
    sentence: str
    copy_reduction: float | None  # relative, 1 - after / before
    nn_reduction: float | None
    control_reductions: dict[str, float]
    judge_within_2se: bool | None

    @property
    def reduced(self) -> bool:
        return self.status == "reduced"


def _ok(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _rel(before: float, after: float) -> float:
    return 1.0 - after / before if before > 0 else 0.0


def judge_se(acc: float, n: int) -> float:
    """Agresti-Coull standard error of a share: stays > 0 at 0% or 100% (a perfect judge is the toy's usual case,
    where the plain binomial s.e. would be 0 and any single miss would count as a loss)."""
    n = max(n, 1)
    p = (acc * n + 2) / (n + 4)
    return math.sqrt(p * (1 - p) / (n + 4))


def judge_within(original: Any, after: Any) -> bool | None:
    """After's judge accuracy is within two binomial standard errors of the original's (None without a judge)."""
    if not (_ok(original.judge_accuracy) and _ok(after.judge_accuracy)):
        return None
    return original.judge_accuracy - after.judge_accuracy <= 2 * judge_se(original.judge_accuracy,
                                                                             original.n_neutral)


# the largest selective drop measured on the v2 toy came from gates learned with tuned weights at a larger beta,
# then a brief retrain (docs/dememorization.md, 0h); it costs neutral drift beyond auto's budget, so it is advice
STRONGER_NEXT = ("learn stronger masks (a larger --beta, or a larger --budget with --beta auto), jointly with tuned "
                 "weights (--tune-weights 1e-4), then a neutral retrain (--retrain-steps 600) to win back neutral "
                 "quality; compare its judge and drift with the original's")
QUALITY_SPENT_NEXT = ("neutral quality already fell at this strength with nothing removed, so stronger masks "
                      "would spend more of it: lower --budget (or --beta) and compare, and check the original's "
                      "memorization signature")
# copies fell but neutral quality paid: win it back by retraining, or spend less of it; once a retrain has run,
# "add a retrain" is no advice (out of sample, 600 retrain steps left a 5-point judge loss: section 0q)
COST_NEXT = "a brief neutral retrain (--retrain-steps 600) or a weaker strength (a smaller --beta or --budget)"
COST_AFTER_RETRAIN_NEXT = ("a longer neutral retrain (more --retrain-steps) or a weaker strength (a smaller --beta "
                           "or --budget)")
GLOBAL_MODE_NEXT = ("no mask can remove it: the original copies from the empty prompt too (global-mode "
                    "memorization), so no units serve the copies alone; deduplicate the training data and fine-tune "
                    "or retrain the model")


def _default_next(original: Any, judge: bool | None, reduction: float) -> str:
    """What to try after a verdict short of "reduced", by the original's signature and what this strength cost."""
    if getattr(getattr(original, "signature", None), "kind", None) == "global-mode":
        return GLOBAL_MODE_NEXT  # stronger masks only spend neutral quality on such a model
    if judge is False and reduction < MIN_REDUCTION:
        return QUALITY_SPENT_NEXT  # the budget did not protect neutral quality here, and nothing was removed
    return STRONGER_NEXT


def decide(original: Any, after: Any, controls: Mapping[str, Any] | None = None, what: str | None = None,
           next_step: str | None = None, retrained: bool = False) -> Verdict:
    """The verdict for `after` (an Evaluation) against `original`, with control Evaluations at matched drift.

    `next_step` (what a "not reduced" verdict suggests) defaults by the original's memorization signature and by
    what the strength cost (`_default_next`): on a global-mode model, or where the judge fell with nothing
    removed, stronger masks only spend neutral quality, so the advice points away from them. `retrained` says
    that `after` already went through the neutral retrain, so a verdict of copies removed at a neutral cost
    advises a longer one rather than a first; it also names the model the sentence speaks of, unless `what` does.
    """
    if what is None:
        what = "the retrained slim model" if retrained else "the slim model"
    controls = dict(controls or {})
    if not _ok(original.memorized.copy_rate):
        wen = (f"Wen's AUC {original.wen_auc:.2f} -> {after.wen_auc:.2f}" if _ok(original.wen_auc)
               and _ok(after.wen_auc) else "Wen's noise norm not measured")
        return Verdict("not measured", f"Memorization not measured: no reference images for this model, so copy "
                       f"rate and the empty-prompt check could not run; {wen} on the suspect captions.",
                       None, None, {}, None)
    before, now = original.memorized.copy_rate, after.memorized.copy_rate
    red = _rel(before, now)
    nn_red = _rel(original.memorized.nn_identity, after.memorized.nn_identity)
    ctrl = {k: _rel(before, c.memorized.copy_rate) for k, c in controls.items()}
    judge = judge_within(original, after)
    judge_txt = "" if judge is None else (
        f", neutral judge {original.judge_accuracy:.1%} -> {after.judge_accuracy:.1%}"
        + ("" if judge else " (more than 2 standard errors lower)"))
    ctrl_txt = ("; controls at matched neutral drift: " + ", ".join(
        f"{k} {controls[k].memorized.copy_rate:.0%} ({-v:+.0%})" for k, v in ctrl.items())) if ctrl else \
        "; no controls were run"
    nums = f"strict copies {before:.0%} -> {now:.0%} ({-red:+.0%}), planted image nearest {original.memorized.nn_identity:.0%} -> " \
           f"{after.memorized.nn_identity:.0%}{judge_txt}"
    if before < MIN_ORIGINAL:
        return Verdict("nothing to reduce", f"Nothing to reduce: the original copies its references in only "
                       f"{before:.0%} of generations ({nums}).", red, nn_red, ctrl, judge)
    if next_step is None:
        next_step = _default_next(original, judge, red)
    if red < MIN_REDUCTION:
        return Verdict("not reduced", f"Memorization not reduced in {what}: {nums}{ctrl_txt}. Next: {next_step}.",
                       red, nn_red, ctrl, judge)
    if any(v >= CONTROL_SHARE * red for v in ctrl.values()):
        return Verdict("not beyond controls", f"Copies fell in {what}, but not beyond what equal damage does: "
                       f"{nums}{ctrl_txt}. Next: {next_step}.", red, nn_red, ctrl, judge)
    if judge is False:
        cost_next = COST_AFTER_RETRAIN_NEXT if retrained else COST_NEXT
        return Verdict("not reduced", f"Copies fell in {what} at the cost of neutral quality: {nums}{ctrl_txt}. "
                       f"Next: {cost_next}.", red, nn_red, ctrl, judge)
    caveat = "" if ctrl else " (no controls were run, so the drop is not checked against equal damage)"
    return Verdict("reduced", f"Memorization reduced in {what} by {red:.0%}: {nums}{ctrl_txt}{caveat}.",
                   red, nn_red, ctrl, judge)
