"""`--beta auto`: the strongest mask whose neutral fidelity stays within a budget, chosen per model.

Why: beta trades a reconstruction term against the share of open gates, and how much neutral drift one
removed unit costs differs from model to model, so a fixed preset is mild on one model and destructive on
another (docs/dememorization.md). The rule, measurable on any model without outside weights or references:

1. Split the *neutral* prompts deterministically: `holdout` of them are never learned from.
2. Learn up a ladder of strengths. The first rung is a full learning run; each later rung continues from
   the gates of the rung below for `rung_steps` more steps at its own beta (a continuation path: closed
   gates stay closed, so drift mostly grows along the ladder and the search can stop early; the pooled drift
   can dip when a prompt whose image flipped at one rung flips back at the next, docs section 0m).
3. After each rung, measure the relative latent drift of the gated model on the held-out neutral prompts:
   RMS(F_gated - F_orig) / RMS(F_orig) of the final latents of the N-step sampler, fixed start noise
   (`drift_seeds` of them per prompt, pooled per prompt), pooled over the prompts (`statistic="pooled"`, the
   default). Its bootstrap standard error over those prompts is
   logged and recorded beside it (the decision does not use it; step 5's warning does), and so is the median
   over prompts of each prompt's own relative drift, which the rule budgets instead with `statistic="median"`
   (robust to the few prompts whose trajectory flips to another object; docs/dememorization.md section 0l).
4. Keep the strongest rung whose drift is <= `budget`; stop at the first rung over it. If even the first
   rung is over budget, keep it and say so (the user should lower the ladder or raise the budget).
5. Say when the decision is a close call: the kept rung, or the rung that stopped the ladder, lies within one
   bootstrap standard error of the budget (`close_call`). The rule still decides; the warning tells the user
   that another held-out split, another thread count or a rerun may keep the neighbouring rung (section 0l
   measured exactly that on the toy).

With `weight_lr > 0` (`--tune-weights`) each rung also continues from the tuned weights of the rung below, the
drift is that of the gated tuned copy, and the chosen rung's copy comes back as `CalibrationResult.unet`.

Nothing but the neutral prompt list enters this choice: no memorized caption, planted image or evaluation
prompt is read here (tests/uniforget/test_calibrate.py fails if one is).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .configs import LearnConfig
from .errors import UniforgetError

if TYPE_CHECKING:  # the ladder loop imports learn (and torch) when it runs: parsing --ladder/--budget needs neither
    from .learn import StepStats
    from .masks import MaskSet
    from .sampler import Conditioning

log = logging.getLogger(__name__)

DEFAULT_LADDER = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
STATISTICS = ("pooled", "median")  # what the budget bounds (module docstring, step 3)


class CalibrationError(UniforgetError):
    """`--beta auto` cannot run with the given ladder, budget or prompts."""


@dataclass(frozen=True)
class CalibrationConfig:
    """The rule's constants (module docstring); every one is recorded in the chosen MaskSet's metadata."""

    ladder: tuple[float, ...] = DEFAULT_LADDER
    budget: float = 0.20  # max relative RMS latent drift on held-out neutral prompts
    holdout: float = 0.25  # share of the neutral prompts kept out of learning, for the budget
    rung_steps: int | None = None  # steps of each later rung; None = half the learning steps
    split_seed: int = 0
    statistic: str = "pooled"  # STATISTICS: pooled relative drift, or the median prompt's relative drift
    drift_seeds: int = 1  # start noises per held-out prompt, pooled per prompt (learn.DriftMeter)

    def __post_init__(self) -> None:
        problems = []
        if not self.ladder or any(not math.isfinite(b) or b < 0 for b in self.ladder):
            problems.append(f"ladder must be finite betas >= 0 (got {list(self.ladder)})")
        elif list(self.ladder) != sorted(self.ladder):
            problems.append(f"ladder must increase (got {list(self.ladder)})")
        if not (self.budget > 0 and math.isfinite(self.budget)):
            problems.append(f"budget must be > 0 (got {self.budget})")
        if not 0 < self.holdout < 1:
            problems.append(f"holdout must be in (0, 1) (got {self.holdout})")
        if self.statistic not in STATISTICS:
            problems.append(f"budget statistic must be one of {', '.join(STATISTICS)} (got {self.statistic!r})")
        if self.drift_seeds < 1:
            problems.append(f"drift seeds must be >= 1 (got {self.drift_seeds})")
        if self.rung_steps is not None and self.rung_steps < 1:
            problems.append(f"rung steps must be >= 1 (got {self.rung_steps})")
        if problems:
            raise CalibrationError("; ".join(problems))

    def split(self, prompts: Sequence[str]) -> tuple[list[str], list[str]]:
        """(learn, held out) neutral prompts, as `learn.run_learn` asks for them."""
        return split_prompts(prompts, self.holdout, self.split_seed)

    def run(self, unet: object, scheduler: object, cond_learn: Conditioning, cond_holdout: Conditioning,
            cfg: LearnConfig, **kw: object) -> CalibrationResult:
        return calibrate(unet, scheduler, cond_learn, cond_holdout, cfg, self, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Rung:
    beta: float
    drift_rel: float  # on the held-out neutral prompts
    drift_mse: float
    closed: dict[str, float]  # share of gates exactly 0 per kind
    mean_gate: dict[str, float]
    steps: int
    wall_s: float
    drift_se: float = 0.0  # bootstrap standard error of drift_rel over the held-out prompts
    drift_median: float = 0.0  # median over the held-out prompts of each prompt's relative drift
    drift_median_se: float = 0.0  # its bootstrap standard error

    def drift(self, statistic: str = "pooled") -> float:
        """The drift the budget bounds under `statistic` (CalibrationConfig.statistic)."""
        return self.drift_median if statistic == "median" else self.drift_rel

    def se(self, statistic: str = "pooled") -> float:
        """The bootstrap standard error of `drift(statistic)` over the held-out prompts."""
        return self.drift_median_se if statistic == "median" else self.drift_se

    def within(self, budget: float, statistic: str = "pooled") -> bool:
        return self.drift(statistic) <= budget


@dataclass(frozen=True)
class CalibrationResult:
    maskset: MaskSet  # the chosen rung's gates, with the whole ladder in its metadata
    rungs: tuple[Rung, ...]
    chosen: int  # index into rungs
    config: CalibrationConfig
    over_budget: bool  # even the first rung exceeded the budget
    unet: object = None  # weight_lr > 0: the chosen rung's jointly tuned copy (its MaskSet gates it)

    @property
    def beta(self) -> float:
        return self.rungs[self.chosen].beta


def parse_ladder(text: str) -> tuple[float, ...]:
    """'1,2,5,10' -> (1.0, 2.0, 5.0, 10.0); a bad list is one CalibrationError."""
    try:
        ladder = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise CalibrationError(f"ladder must be comma-separated numbers like 1,2,5,10 (got {text!r})") from None
    CalibrationConfig(ladder=ladder)  # validates
    return ladder


def split_prompts(prompts: Sequence[str], holdout: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(learn, held out): a seeded permutation, at least one prompt on each side."""
    if len(prompts) < 2:
        raise CalibrationError(f"--beta auto needs at least 2 neutral prompts to hold some out (got {len(prompts)})")
    order = np.random.default_rng(seed).permutation(len(prompts))
    k = min(len(prompts) - 1, max(1, round(holdout * len(prompts))))
    held = sorted(int(i) for i in order[:k])
    learn = sorted(int(i) for i in order[k:])
    return [prompts[i] for i in learn], [prompts[i] for i in held]


def calibrate(unet: object, scheduler: object, cond_learn: Conditioning, cond_holdout: Conditioning,
              cfg: LearnConfig, cal: CalibrationConfig = CalibrationConfig(), *, prompts_sha: str = "",
              holdout_sha: str = "", accelerator: object = None,
              callback: Callable[[int, StepStats], None] | None = None) -> CalibrationResult:
    """Learn up the ladder (module docstring) and return the strongest rung within the budget.

    `cfg` is the learning config of the first rung (its beta is replaced by each rung's); `callback(rung, stats)`
    runs after every step."""
    from .learn import DriftMeter, kind_summary, learn_masks

    rung_steps = cal.rung_steps or max(1, cfg.steps // 2)
    meter = DriftMeter(unet, scheduler, cond_holdout, cfg.sampler, seed=cfg.seed + 7, height=cfg.height,
                       width=cfg.width, seeds_per_prompt=cal.drift_seeds)
    rungs: list[Rung] = []
    masks: list[MaskSet] = []
    init = start = start_fp = None  # the rung below's gates and (joint mode) tuned weights, where the next starts
    for i, beta in enumerate(cal.ladder):
        rcfg = replace(cfg, beta=float(beta), steps=cfg.steps if i == 0 else rung_steps)
        t0 = time.perf_counter()
        res = learn_masks(unet, scheduler, cond_learn, rcfg, prompts_sha=prompts_sha, accelerator=accelerator,
                          init=init, start_unet=start, start_fingerprint=start_fp,
                          callback=None if callback is None else (lambda s, i=i: callback(i, s)))
        values = res.maskset.gate_values()
        d = meter(values, res.unet)  # a tuned copy is gated, not the original
        closed, mean_gate = kind_summary(values)
        rung = Rung(float(beta), d["rel"], d["mse"], closed, mean_gate, rcfg.steps, time.perf_counter() - t0,
                    d["rel_se"], d["rel_median"], d["rel_median_se"])
        rungs.append(rung)
        masks.append(res.maskset)
        log.info("calibration rung beta %g: held-out neutral drift %.4f (s.e. %.4f over %d prompts; median prompt "
                 "%.4f; budget %.4f on the %s drift), closed %s", beta, d["rel"], d["rel_se"], len(cond_holdout),
                 d["rel_median"], cal.budget, cal.statistic, ", ".join(f"{k} {v:.1%}" for k, v in closed.items()))
        if not rung.within(cal.budget, cal.statistic):
            break
        init, start = res.maskset.logits, res.unet
        start_fp = None if start is None else res.maskset.model_fingerprint  # a joint MaskSet names its tuned copy
    within = [i for i, r in enumerate(rungs) if r.within(cal.budget, cal.statistic)]
    over = not within
    chosen = within[-1] if within else 0
    # joint mode: the chosen rung is the last one within budget, whose copy `start` holds, or (over) the first
    chosen_unet = res.unet if over else start
    if over:
        log.warning("even the weakest rung (beta %g) drifts %.4f on held-out neutral prompts, over the budget %.4f: "
                    "keeping it; lower the ladder or raise --budget", rungs[0].beta, rungs[0].drift(cal.statistic),
                    cal.budget)
    close = close_call(rungs, chosen, cal.budget, cal.statistic, over)
    if close:
        log.warning("close call: %s", close)
    ms = masks[chosen]
    meta = {**ms.meta, "beta": repr(rungs[chosen].beta), "beta_mode": "auto",
            "calibration_budget_rel_drift": repr(cal.budget), "calibration_holdout": repr(cal.holdout),
            "calibration_holdout_sha256": holdout_sha, "calibration_ladder": ",".join(f"{b:g}" for b in cal.ladder),
            "calibration_rung_steps": str(rung_steps), "calibration_over_budget": str(over).lower(),
            "calibration_rungs": ";".join(f"{r.beta:g}:{r.drift_rel:.5g}" for r in rungs),
            "calibration_rungs_se": ";".join(f"{r.beta:g}:{r.drift_se:.3g}" for r in rungs),
            "calibration_rungs_median": ";".join(f"{r.beta:g}:{r.drift_median:.5g}" for r in rungs),
            "calibration_rungs_median_se": ";".join(f"{r.beta:g}:{r.drift_median_se:.3g}" for r in rungs),
            "calibration_close_call": close,
            "calibration_statistic": cal.statistic,
            "calibration_drift_seeds": str(cal.drift_seeds),
            "steps": str(sum(r.steps for r in rungs[:chosen + 1])),
            "neutral_drift_rel_holdout": f"{rungs[chosen].drift_rel:.6g}",
            "neutral_drift_median_holdout": f"{rungs[chosen].drift_median:.6g}"}
    return CalibrationResult(replace(ms, meta=meta), tuple(rungs), chosen, cal, over, chosen_unet)


def close_call(rungs: Sequence[Rung], chosen: int, budget: float, statistic: str = "pooled",
               over: bool = False) -> str:
    """One sentence when the rule's decision lies within one standard error of the budget, else "".

    Two rungs decide: the kept one (within budget unless `over`) and the one after it, which stopped the ladder.
    Either within one bootstrap s.e. of `budget` means the held-out prompts cannot tell the two apart, so the
    rung kept is a draw of the prompt split (and of float rounding) as much as a property of the model."""
    parts = []
    kept = rungs[chosen]
    if not over and kept.se(statistic) > 0 and kept.drift(statistic) + kept.se(statistic) > budget:
        parts.append(f"the kept beta {kept.beta:g} drifts {kept.drift(statistic):.3f} +- {kept.se(statistic):.3f}")
    nxt = rungs[chosen + 1] if not over and chosen + 1 < len(rungs) else None
    if nxt is not None and nxt.se(statistic) > 0 and nxt.drift(statistic) - nxt.se(statistic) <= budget:
        parts.append(f"the next beta {nxt.beta:g} drifts {nxt.drift(statistic):.3f} +- {nxt.se(statistic):.3f}")
    if not parts:
        return ""
    return (f"{' and '.join(parts)} ({statistic} held-out drift +- 1 s.e.) against the budget {budget:g}: another "
            "held-out split or a rerun may keep the neighbouring rung")
