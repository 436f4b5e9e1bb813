"""PruningPlan: which units of a UNet go and which stay (with their gate values), made from a MaskSet.

`make_plan(unet, maskset, ratio)`:
- `ratio="auto"` removes exactly the closed gates (hard-concrete value 0).
- `ratio=r` in [0, 1) removes units in order of their gate parameter M (most closed first, across kinds;
  ties by target order then index) until at least r of the UNet's parameters are gone, and reports the
  fraction achieved. Removed units may have had open gates: `plan.effective_gates()` says what the slim
  model computes (kept -> gate value, removed -> 0).
- Rule: a module never loses its last unit. Each attention keeps >= 1 head, each feed-forward >= 1 neuron,
  each norm >= 1 channel: the unit with the largest M stays (with its gate value, possibly 0, folded in),
  so slim == gated still holds and no module ends up with a zero-width tensor.
- Aligned widths (`align`, default 8): each module's kept count is rounded up so the tensor width it leaves
  (kept heads x head_dim, kept neurons, kept channels) is a multiple of `align`, capped at the dense width.
  Why: GEMM kernels (MLAS, cuBLAS) run their fast paths on widths divisible by 8; a width of 317 can be slower
  than 320. The units added back are the removed ones with the largest M, and they keep gate value 0 (folded
  into the weights), so the slim model computes exactly what the unaligned one does. `align=1` turns it off.

Saved as `plan.json` (format `uniforget.plan/1`); loading validates every field and raises one PlanError line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .configs import (  # re-exported
    DEFAULT_ALIGN as DEFAULT_ALIGN,
    Ratio as Ratio,
    ReferenceShape as ReferenceShape,
    parse_ratio as parse_ratio,
)
from .errors import ModelLoadError, PlanError
from .fingerprint import model_fingerprint
from .flops import count_flops, meta_copy, param_count
from .masks import MaskSet
from .prune import Layout, build_layout, prune_unet
from .targets import KINDS, discover_targets

log = logging.getLogger(__name__)

FORMAT = "uniforget.plan/1"


@dataclass(frozen=True)
class TargetPlan:
    """One gated module: sorted kept unit indices and their gate values (folded into the slim weights)."""

    key: str
    kind: str
    size: int
    kept: tuple[int, ...]
    gates: tuple[float, ...]

    @property
    def path(self) -> str:
        return self.key.rsplit("/", 1)[0]

    @property
    def n_removed(self) -> int:
        return self.size - len(self.kept)


@dataclass(frozen=True)
class PruningPlan:
    """What `prune_unet` removes, with the counts a deployment engineer wants before and after."""

    targets: tuple[TargetPlan, ...]
    model_fingerprint: str
    ratio_requested: Ratio  # "auto" or a fraction of UNet parameters
    ratio_achieved: float  # fraction of UNet parameters actually removed
    params_before: int
    params_after: int
    flops_before: int | None  # forward FLOPs at reference_shape (torch flop counter), None if not countable
    flops_after: int | None
    reference_shape: ReferenceShape
    closed_shares: dict[str, float]  # per kind (+ "all"): share of gates removed by this plan
    mask_closed_shares: dict[str, float]  # per kind (+ "all"): share of gates at value 0 in the MaskSet
    maskset_meta: dict[str, str] = field(default_factory=dict)
    library_version: str = __version__
    align: int = 1  # kept widths rounded up to a multiple of this (1 = exact); older plans have none

    # -- views ------------------------------------------------------------------------------------------

    def by_key(self) -> dict[str, TargetPlan]:
        return {t.key: t for t in self.targets}

    def effective_gates(self) -> dict[str, torch.Tensor]:
        """Per key a (size,) float32 tensor: kept -> gate value, removed -> 0 (what the slim UNet computes)."""
        out = {}
        for t in self.targets:
            g = torch.zeros(t.size, dtype=torch.float32)
            g[torch.tensor(t.kept, dtype=torch.long)] = torch.tensor(t.gates, dtype=torch.float32)
            out[t.key] = g
        return out

    @property
    def flop_ratio(self) -> float | None:
        if not self.flops_before or self.flops_after is None:
            return None
        return self.flops_after / self.flops_before

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        """(quantity, before, after, change) rows for a before/after table."""
        rows = [("parameters", f"{self.params_before:,}", f"{self.params_after:,}",
                 f"-{self.ratio_achieved:.2%}")]
        if self.flops_before is not None and self.flops_after is not None:
            rows.append((f"FLOPs ({self.reference_shape.describe()})", f"{self.flops_before / 1e9:,.3f} G",
                         f"{self.flops_after / 1e9:,.3f} G", f"x{self.flop_ratio:.3f}"))
        for kind in (*KINDS, "all"):
            if kind not in self.closed_shares:
                continue
            ts = self.targets if kind == "all" else [t for t in self.targets if t.kind == kind]
            total = sum(t.size for t in ts)
            removed = sum(t.n_removed for t in ts)
            label = "all gated units" if kind == "all" else f"{kind} units"
            rows.append((label, f"{total:,}", f"{total - removed:,}", f"-{self.closed_shares[kind]:.2%}"))
        return rows

    # -- persistence ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = self._to_dict()
        if self.align != 1:  # written only when used, so plans (and slim UNets) cut before it keep their digest
            d["align"] = self.align
        return d

    def _to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "library_version": self.library_version,
            "model_fingerprint": self.model_fingerprint,
            "ratio_requested": self.ratio_requested,
            "ratio_achieved": self.ratio_achieved,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "reference_shape": self.reference_shape.to_dict(),
            "closed_shares": dict(self.closed_shares),
            "mask_closed_shares": dict(self.mask_closed_shares),
            "maskset_meta": dict(self.maskset_meta),
            "targets": [{"key": t.key, "kind": t.kind, "size": t.size, "kept": list(t.kept),
                         "gates": list(t.gates)} for t in self.targets],
        }

    def digest(self) -> str:
        """sha256 of the canonical JSON: ties a slim UNet's tensors to the exact plan they were cut with."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write plan.json atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path} is not valid JSON ({e}); the plan is corrupt, re-run `uniforget plan`") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> PruningPlan:
        """Validate and build; every problem is one PlanError line naming the field."""
        try:
            return _from_dict(data)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{source}: malformed plan ({type(e).__name__}: {e})") from None


def _from_dict(d: Any) -> PruningPlan:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PlanError(f"not a uniforget plan (want format {FORMAT!r})")
    targets = []
    for i, t in enumerate(d["targets"]):
        key, kind, size = str(t["key"]), str(t["kind"]), int(t["size"])
        kept = tuple(int(k) for k in t["kept"])
        gates = tuple(float(g) for g in t["gates"])
        if kind not in KINDS or not key.endswith(f"/{kind}"):
            raise PlanError(f"target {i} ({key}): bad kind {kind!r}")
        if not kept or len(kept) > size or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size:
            raise PlanError(f"target {key}: kept indices must be sorted, unique, non-empty and within [0, {size})")
        if len(gates) != len(kept) or not all(0.0 <= g <= 1.0 for g in gates):
            raise PlanError(f"target {key}: need one gate value in [0, 1] per kept unit")
        targets.append(TargetPlan(key, kind, size, kept, gates))
    if len({t.key for t in targets}) != len(targets):
        raise PlanError("duplicate target keys")
    ratio = d["ratio_requested"]
    if ratio != "auto":
        ratio = float(ratio)
    opt_int = lambda v: None if v is None else int(v)  # noqa: E731
    return PruningPlan(
        targets=tuple(targets),
        model_fingerprint=str(d["model_fingerprint"]),
        ratio_requested=ratio,
        ratio_achieved=float(d["ratio_achieved"]),
        params_before=int(d["params_before"]),
        params_after=int(d["params_after"]),
        flops_before=opt_int(d.get("flops_before")),
        flops_after=opt_int(d.get("flops_after")),
        reference_shape=ReferenceShape(**{k: int(v) for k, v in d["reference_shape"].items()}),
        closed_shares={str(k): float(v) for k, v in d["closed_shares"].items()},
        mask_closed_shares={str(k): float(v) for k, v in d.get("mask_closed_shares", {}).items()},
        maskset_meta={str(k): str(v) for k, v in d.get("maskset_meta", {}).items()},
        library_version=str(d.get("library_version", "")),
        align=_check_align(d.get("align", 1)),
    )


# ---------------------------------------------------------------------------------------------------------
# Making a plan


def _check_align(align: Any) -> int:
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise PlanError(f"align must be a positive integer (1 = no rounding), got {align!r}")
    return align


def unit_widths(layout: Layout, order: list[str]) -> dict[str, int]:
    """Tensor entries one unit of each target owns along its pruned axis: head_dim for heads, 1 otherwise."""
    widths = dict.fromkeys(order, 1)
    for a in layout.attns:
        if a.key is not None and a.key in widths:
            widths[a.key] = a.head_dim
    return widths


def aligned_count(n_kept: int, size: int, width: int, align: int) -> int:
    """Smallest count >= n_kept whose width (count x width) is a multiple of `align`, at most `size`."""
    step = align // math.gcd(align, width)
    return min(size, -(-n_kept // step) * step)


def _check_maskset(unet: nn.Module, maskset: MaskSet) -> list[str]:
    """MaskSet keys in the UNet's target order; sizes must match and logits be finite."""
    sizes = {t.key: t.size for t in discover_targets(unet)}
    order = [k for k in sizes if k in maskset.logits]
    unknown = [k for k in maskset.logits if k not in sizes]
    if unknown:
        raise PlanError(f"MaskSet has {len(unknown)} key(s) this UNet lacks, e.g. {unknown[0]}")
    if not order:
        raise PlanError("MaskSet gates nothing in this UNet")
    for k in order:
        v = maskset.logits[k]
        if v.numel() != sizes[k]:
            raise PlanError(f"MaskSet {k} has {v.numel()} gates but the UNet module has {sizes[k]} units")
        if not torch.isfinite(v).all():
            raise PlanError(f"MaskSet {k} holds NaN/Inf gate parameters; the MaskSet is corrupt")
    return order


def _protected(logits: torch.Tensor) -> int:
    """The unit a module always keeps: largest gate parameter, lowest index on ties."""
    return int(torch.argmax(logits))


def _params_after(total: int, layout: Layout, kept: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    """Exact slim parameter count from kept counts alone (cheap; used to search the ratio)."""
    full = dict(sizes)
    out = total
    for s in layout.linears:
        out += s.count(kept) - s.count(full)
    for n in layout.norms:
        out += n.count(kept[n.key], kept[n.key] < n.size) - n.count(n.size, False)
    return out


def _shares(plan_targets: list[TargetPlan], removed_of: Any) -> dict[str, float]:
    out = {}
    for kind in (*KINDS, "all"):
        ts = plan_targets if kind == "all" else [t for t in plan_targets if t.kind == kind]
        total = sum(t.size for t in ts)
        if total:
            out[kind] = sum(removed_of(t) for t in ts) / total
    return out


def make_plan(unet: nn.Module, maskset: MaskSet, ratio: Ratio,
              reference_shape: ReferenceShape | None = None, *, with_flops: bool = True,
              align: int = DEFAULT_ALIGN) -> PruningPlan:
    """Turn gate parameters into a PruningPlan (see the module docstring for the rules).

    `with_flops=False` skips the FLOP count (about a second of meta-device tracing per model) and leaves
    flops_before/after as None. `align` rounds kept widths up (1 = off).
    """
    r = parse_ratio(ratio)
    align = _check_align(align)
    fp = model_fingerprint(unet)
    maskset.check_model(fp)
    order = _check_maskset(unet, maskset)
    logits = {k: maskset.logits[k].detach().float().cpu() for k in order}
    values = {k: v.float().cpu() for k, v in maskset.gate_values().items() if k in logits}
    sizes = {k: int(v.numel()) for k, v in logits.items()}
    ref = reference_shape or ReferenceShape.for_unet(unet)
    total = param_count(unet)
    layout = build_layout(unet, frozenset(order))
    widths = unit_widths(layout, order)

    if r == "auto":
        kept: dict[str, list[int]] = {}
        for k in order:
            idx = torch.nonzero(values[k] > 0).flatten().tolist()
            kept[k] = idx or [_protected(logits[k])]
    else:
        kept = _kept_for_ratio(order, logits, sizes, layout, total, r, widths, align)
    padded = {k: _pad_to_aligned(kept[k], logits[k], widths[k], align) for k in order}

    chosen = {k: set(v) for k, v in kept.items()}
    targets = [TargetPlan(k, k.rsplit("/", 1)[1], sizes[k], tuple(padded[k]),
                          tuple(float(values[k][i]) if i in chosen[k] else 0.0 for i in padded[k]))
               for k in order]
    n_pad = sum(len(padded[k]) - len(kept[k]) for k in order)
    if n_pad:
        log.info("align %d: %d removed unit(s) stay as zero-gated weights to round kept widths", align, n_pad)
    kept = padded
    open_removed = sum(int((values[k] > 0).sum()) - sum(1 for i in chosen[k] if values[k][i] > 0) for k in order)
    if open_removed:
        log.info("ratio %s removes %d units whose gates were open; the slim model equals the gated model with "
                 "those gates at 0 (plan.effective_gates())", r, open_removed)
    plan = PruningPlan(
        targets=tuple(targets), model_fingerprint=fp, ratio_requested=r, ratio_achieved=0.0,
        params_before=total, params_after=total, flops_before=None, flops_after=None, reference_shape=ref,
        closed_shares=_shares(targets, lambda t: t.n_removed),
        mask_closed_shares=_shares(targets, lambda t: int((values[t.key] == 0).sum())),
        maskset_meta={str(a): str(b) for a, b in maskset.meta.items()}, align=align,
    )
    dense_meta = meta_copy(unet) if with_flops else None
    slim_meta = prune_unet(meta_copy(unet), plan, inplace=True, check_fingerprint=False)
    after = param_count(slim_meta)
    analytic = _params_after(total, layout, {k: len(v) for k, v in kept.items()}, sizes)
    if after != analytic:
        log.warning("parameter count of the slim model (%d) differs from the layout count (%d)", after, analytic)
    if with_flops:
        plan = replace(plan, flops_before=count_flops(dense_meta, ref), flops_after=count_flops(slim_meta, ref))
    plan = replace(plan, params_after=after, ratio_achieved=1.0 - after / total)
    log.info("plan: removed %.2f%% of parameters (%d -> %d), %.2f%% of gates", 100 * plan.ratio_achieved, total,
             after, 100 * plan.closed_shares.get("all", 0.0))
    return plan


def _pad_to_aligned(kept: list[int], logits: torch.Tensor, width: int, align: int) -> list[int]:
    """`kept` plus the removed units with the largest M (lowest index on ties) up to the aligned count."""
    want = aligned_count(len(kept), int(logits.numel()), width, align)
    if want == len(kept):
        return kept
    have, m = set(kept), logits.tolist()
    removed = sorted((i for i in range(len(m)) if i not in have), key=lambda i: (-m[i], i))
    return sorted(kept + removed[: want - len(kept)])


def _kept_for_ratio(order: list[str], logits: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
                    layout: Layout, total: int, ratio: float, widths: Mapping[str, int] | None = None,
                    align: int = 1) -> dict[str, list[int]]:
    """Smallest prefix of units, most closed first, whose removal takes away >= ratio of the parameters
    once each module's kept count is rounded up to its aligned width (the padding is added by the caller)."""
    key_ids, idxs, ms = [], [], []
    for ki, k in enumerate(order):
        protect = _protected(logits[k])
        for i, m in enumerate(logits[k].tolist()):
            if i != protect:
                key_ids.append(ki)
                idxs.append(i)
                ms.append(m)
    key_ids_a, idxs_a, ms_a = np.array(key_ids, dtype=np.int64), np.array(idxs, dtype=np.int64), np.array(ms)
    perm = np.lexsort((idxs_a, key_ids_a, ms_a))  # by M, then target order, then index
    key_ids_a, idxs_a = key_ids_a[perm], idxs_a[perm]
    size_arr = np.array([sizes[k] for k in order])
    w = widths or {}
    step_arr = np.array([align // math.gcd(align, w.get(k, 1)) for k in order])
    target = ratio * total

    def removed(n: int) -> int:  # monotone in n: rounding up keeps the counts' order
        counts = size_arr - np.bincount(key_ids_a[:n], minlength=len(order))
        counts = np.minimum(size_arr, -(-counts // step_arr) * step_arr)
        return total - _params_after(total, layout, dict(zip(order, counts.tolist(), strict=True)), sizes)

    hi = len(key_ids_a)
    best = removed(hi)
    if best < target:
        raise PlanError(f"ratio {ratio} cannot be reached: removing every gated unit but one per module removes "
                        f"only {best / total:.2%} of the UNet's parameters"
                        + (f" with widths aligned to {align} (try a smaller --align)" if align > 1 else ""))
    lo = 0
    while lo < hi:  # smallest n with removed(n) >= target (removed is monotone in n)
        mid = (lo + hi) // 2
        if removed(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    gone: dict[str, set[int]] = {k: set() for k in order}
    for ki, i in zip(key_ids_a[:lo].tolist(), idxs_a[:lo].tolist(), strict=True):
        gone[order[ki]].add(i)
    return {k: [i for i in range(sizes[k]) if i not in gone[k]] for k in order}


# ---------------------------------------------------------------------------------------------------------
# File-level entry points used by the CLI


@dataclass(frozen=True)
class PlanRequest:
    """Everything `uniforget plan` needs: where the UNet and masks are, the ratio, the reference shape."""

    masks: Path
    ratio: Ratio
    model: str | None = "toy"
    unet_dir: Path | None = None
    reference_shape: ReferenceShape | None = None
    out: Path | None = None
    align: int = DEFAULT_ALIGN


def load_source_unet(model: str | None, unet_dir: str | os.PathLike | None = None) -> nn.Module:
    """The dense UNet: from a diffusers UNet folder (`--unet`) or from a pipeline (`--model toy|PATH`)."""
    if unet_dir is not None:
        from diffusers import UNet2DConditionModel

        p = Path(unet_dir)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a diffusers UNet folder (no config.json)")
        try:
            return UNet2DConditionModel.from_pretrained(str(p), use_safetensors=True, local_files_only=True).eval()
        except Exception as e:  # diffusers raises many types; the user needs one line
            raise ModelLoadError(f"could not load UNet folder {p}: {type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    from .models import load_pipeline

    return load_pipeline(model or "toy").unet.eval()


def plan_from_request(req: PlanRequest, unet: nn.Module | None = None) -> PruningPlan:
    """Load UNet and MaskSet, make the plan, save it to `req.out` when given."""
    unet = unet if unet is not None else load_source_unet(req.model, req.unet_dir)
    masks = MaskSet.load(req.masks)
    plan = make_plan(unet, masks, req.ratio, req.reference_shape or ReferenceShape.for_unet(unet), align=req.align)
    if req.out is not None:
        plan.save(req.out)
    return plan


def plan_dict_summary(plan: PruningPlan) -> dict[str, Any]:
    """Small JSON-able summary (no per-unit lists) for reports and benchmarks."""
    d = plan.to_dict()
    d.pop("targets")
    d["flop_ratio"] = plan.flop_ratio
    d["units"] = {kind: {"total": sum(t.size for t in plan.targets if t.kind == kind),
                         "removed": sum(t.n_removed for t in plan.targets if t.kind == kind)}
                  for kind in KINDS if any(t.kind == kind for t in plan.targets)}
    return d


__all__ = ["PruningPlan", "TargetPlan", "PlanRequest", "ReferenceShape", "make_plan", "parse_ratio", "DEFAULT_ALIGN",
           "aligned_count",
           "plan_from_request", "load_source_unet", "plan_dict_summary"]
