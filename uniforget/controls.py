"""Controls for a de-memorization claim: gates that are *not* learned, tuned to the same neutral drift.

Memorization in small models is fragile (METHOD.md: removing 30% of FFN neurons at random also wiped
the strict copy rate), so learned masks only mean something against controls that damage neutral
outputs just as much:

- `random_removal`: close the same number of units per module as the learned gates do, chosen at random
  (`scale` multiplies the counts so the drift can be matched);
- `shuffled_gates`: the learned gate values permuted within each module (same value distribution per
  module, wrong units), optionally interpolated towards 1 by `strength`;
- `match_drift`: bisection on the control's knob until its neutral drift equals a target drift.

Every function returns `{key: 1-D gate tensor}` usable with `gating.attach_gates`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .gates import M_MIN, GateConfig
from .masks import MaskSet

log = logging.getLogger(__name__)

Gates = dict[str, torch.Tensor]


def _gen(seed: int, key: str) -> torch.Generator:
    # one stream per module, so adding or dropping a module does not reshuffle the others
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def closed_counts(values: Mapping[str, torch.Tensor], threshold: float = 0.0) -> dict[str, int]:
    """Units per module whose gate value is <= threshold (0.0 = exactly closed)."""
    return {k: int((v <= threshold).sum()) for k, v in values.items()}


def removed_mass(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Sum of (1 - gate) per module: the 'soft' number of units removed (the effect lives in soft values)."""
    return {k: float((1 - v.float()).sum()) for k, v in values.items()}


def random_removal(values: Mapping[str, torch.Tensor], seed: int = 0, scale: float = 1.0,
                   counts: Mapping[str, float] | None = None) -> Gates:
    """Close round(scale * count) random units per module, every other gate 1.

    `counts` defaults to `removed_mass(values)` (soft gates count by how much they remove); pass
    `closed_counts(values)` to match only exactly closed units.
    """
    counts = removed_mass(values) if counts is None else counts
    out: Gates = {}
    for k, v in values.items():
        n = v.numel()
        m = min(n, max(0, round(scale * counts[k])))
        g = torch.ones(n, dtype=torch.float32)
        if m:
            g[torch.randperm(n, generator=_gen(seed, k))[:m]] = 0.0
        out[k] = g
    return out


def random_kind_ablation(unet: torch.nn.Module, kind: str, fraction: float, seed: int = 0,
                         only: str | None = None) -> Gates:
    """Close round(fraction * size) random units in every target of `kind` (optionally only paths containing
    `only`), all other gates 1: where a model keeps its memorized images, read off without any mask."""
    from .targets import discover_targets

    gen = torch.Generator().manual_seed(seed)
    out: Gates = {}
    for t in discover_targets(unet):
        g = torch.ones(t.size)
        if t.kind == kind and (only is None or only in t.path):
            m = round(fraction * t.size)
            g[torch.randperm(t.size, generator=gen)[:m]] = 0.0
        out[t.key] = g
    return out


def shuffled_gates(values: Mapping[str, torch.Tensor], seed: int = 0, strength: float = 1.0) -> Gates:
    """The learned gate values permuted within each module; `strength` s gives 1 - s * (1 - shuffled)."""
    out: Gates = {}
    for k, v in values.items():
        v = v.detach().float().cpu()
        perm = v[torch.randperm(v.numel(), generator=_gen(seed, k))]
        out[k] = (1 - strength * (1 - perm)).clamp(0.0, 1.0)
    return out


@dataclass(frozen=True)
class MatchedControl:
    """A control tuned to a target drift: its knob value, the gates, and the drift they reach."""

    knob: float
    gates: Gates
    drift: float
    target: float


def match_drift(make: Callable[[float], Gates], drift: Callable[[Gates], float], target: float,
                lo: float = 0.0, hi: float = 1.0, iters: int = 8, grow: int = 6) -> MatchedControl:
    """Bisect `knob` in [lo, hi] so that drift(make(knob)) ~= target (drift assumed to grow with the knob).

    If even `hi` stays below the target, `hi` doubles up to `grow` times (random removal can need more
    units than the learned gates close). Returns the closest point evaluated.
    """
    best: MatchedControl | None = None

    def probe(x: float) -> float:
        nonlocal best
        g = make(x)
        d = float(drift(g))
        if best is None or abs(d - target) < abs(best.drift - target):
            best = MatchedControl(x, g, d, target)
        log.debug("control knob %.4g -> drift %.4g (target %.4g)", x, d, target)
        return d

    d_hi, grown = probe(hi), 0
    while d_hi < target and grown < grow:
        lo, hi, grown = hi, hi * 2, grown + 1
        d_hi = probe(hi)
    if d_hi < target:
        log.warning("control reaches drift %.4g at most (knob %.4g), below the target %.4g", d_hi, hi, target)
        assert best is not None
        return best
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if probe(mid) < target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best


def gates_to_logits(values: Mapping[str, torch.Tensor], cfg: GateConfig | None = None) -> dict[str, torch.Tensor]:
    """Gate parameters M whose hard-concrete gate is `values` (so a control can be stored as a MaskSet).

    Inverts eq. 10-11: 0 -> M_MIN (closed with margin), 1 -> cfg.init (exactly open), else the exact inverse.
    """
    cfg = cfg or GateConfig()
    out = {}
    for k, g in values.items():
        g = g.detach().float().cpu()
        s = ((g + (-cfg.low)) / (cfg.high - cfg.low)).clamp(1e-6, 1 - 1e-6)
        r = torch.exp(cfg.alpha * torch.log(s / (1 - s)) - cfg.lam)
        m = (1.5 * r - 0.5) / (1 + r)  # solves log((m + 0.5) / (1.5 - m)) = alpha * logit(s) - lam
        out[k] = torch.where(g <= 0, torch.full_like(g, M_MIN), torch.where(g >= 1, torch.full_like(g, cfg.init), m))
    return out


def as_maskset(control: MatchedControl, learned: MaskSet, name: str) -> MaskSet:
    """A control's gates as a MaskSet of the same model, with provenance (readable by every stage)."""
    meta = {**learned.meta, "control": name, "control_knob": f"{control.knob:.6g}",
            "control_drift_mse": f"{control.drift:.6g}", "control_target_drift_mse": f"{control.target:.6g}"}
    return MaskSet(gates_to_logits(control.gates, learned.gate_config), learned.model_fingerprint,
                   learned.gate_config, meta)


def matched_controls(learned: MaskSet, drift: Callable[[Gates], float], target: float, seed: int = 0,
                     iters: int = 8) -> dict[str, MaskSet]:
    """Random removal and shuffled gates, each tuned to the learned masks' neutral drift `target`.

    Random removal scales the learned masks' removed mass per module (knob 1 = as many units as the
    learned gates remove); shuffled gates interpolate from 1 (knob 0) to the full permutation (knob 1).
    """
    values = learned.gate_values()
    rnd = match_drift(lambda s: random_removal(values, seed=seed, scale=s), drift, target, iters=iters)
    shf = match_drift(lambda s: shuffled_gates(values, seed=seed, strength=s), drift, target, iters=iters, grow=0)
    for name, c in (("random", rnd), ("shuffled", shf)):
        log.info("control %s: knob %.4g, neutral drift %.4g (target %.4g)", name, c.knob, c.drift, target)
    return {"random": as_maskset(rnd, learned, "random"), "shuffled": as_maskset(shf, learned, "shuffled")}
