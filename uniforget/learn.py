"""Mask learning: which UNet units can the model lose while its outputs on *neutral* prompts stay the same.

    min_M  E_c [ mean((F_gated(z0, N, c) - F_orig(z0, N, c))^2) / var(F_orig) + beta * mean(sigmoid(0.4 M + 1)) ]

F is the N-step differentiable sampler (sampler.py), c runs over neutral prompts only, z0 is shared by the
gated and the frozen original model. The reconstruction term is divided by the variance of the original's
final latents on the batch (`recon="relative"`, default) so that beta weighs a *relative* drift against the
share of open gates, whatever the model's latent scale; `recon="absolute"` is the paper's literal mean squared
difference. Even relative, how much drift a unit's removal costs differs between models, which is why
`--beta auto` (calibrate.py) picks the strength per model on held-out neutral prompts. Gates are hard-concrete (gates.py), one per head / FFN neuron / norm
channel (targets.py), applied through hooks (gating.py) so the UNet's weights are never touched. Optionally
(`weight_lr > 0`, not the paper's recipe) a copy of the weights is fine-tuned jointly with the gates, with the
frozen original as the teacher: the kept units can then take over what the closed ones did on neutral prompts.

Defaults differ from the paper's FLUX recipe on purpose (METHOD.md, trial findings): Adam's *coupled*
weight decay 1e-2 drives every gate to ~0.09 because the L1 term is a mean over thousands of gates, and
lr 0.5 closes almost everything because gates start in the clamped region where only the L1 gradient
acts and Adam moves each by ~lr per step. We default to AdamW (decoupled decay), lr 0.05 with cosine
annealing. Checkpoints (safetensors + JSON metadata, no pickle) make a resumed run bit-identical to an
uninterrupted one. Under `accelerate launch` each process draws the same global batch and takes its
slice; gate gradients are averaged across processes, so the gates stay identical everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import read_state, restore_state, write_state
from .configs import (  # re-exported
    BETA_PRESETS as BETA_PRESETS,
    LEARN_PRECISIONS as LEARN_PRECISIONS,
    OPTIMIZERS as OPTIMIZERS,
    RECONS as RECONS,
    LearnConfig as LearnConfig,
    LearnError as LearnError,
    parse_beta as parse_beta,
)
from .errors import MaskSetError
from .fingerprint import model_fingerprint
from .gates import M_MAX, M_MIN, GateConfig, hard_concrete, relaxed_mask
from .gating import GateSource, attach_gates
from .masks import MaskSet
from .sampler import Conditioning, SamplerConfig, latent_shape, sample
from .targets import GateTarget, discover_targets

log = logging.getLogger(__name__)

PRECISIONS = dict(zip(LEARN_PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))  # autocast dtypes
_CKPT_FORMAT = "uniforget.learn-checkpoint/1"


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, as the progress bar and the loss curve see it."""

    step: int                      # 1-based, after the update
    loss: float
    mse: float                     # mean squared final-latent difference (before normalization)
    l1: float                      # mean relaxed mask (before multiplying by beta)
    lr: float
    closed: dict[str, float]       # share of gates exactly 0, per kind
    mean_gate: dict[str, float]    # mean gate value, per kind
    rec: float = float("nan")      # the reconstruction term as optimized (mse / var(original) when relative)


@dataclass(frozen=True)
class LearnResult:
    maskset: MaskSet
    history: tuple[StepStats, ...]
    wall_s: float
    resumed_from: int = 0          # step the run resumed at (0 = fresh)
    unet: Any = None               # the jointly tuned UNet copy (weight_lr > 0); the MaskSet belongs to it


class GateParams:
    """The learnable M per target (fp32, initialised to `GateConfig.init`, i.e. every gate exactly 1)."""

    def __init__(self, targets: Sequence[GateTarget], cfg: GateConfig, device: torch.device | str = "cpu"):
        self.targets = list(targets)
        self.cfg = cfg
        self.params: dict[str, torch.nn.Parameter] = {
            t.key: torch.nn.Parameter(torch.full((t.size,), cfg.init, dtype=torch.float32, device=device))
            for t in self.targets
        }
        self.kind_of = {t.key: t.kind for t in self.targets}

    def sources(self) -> dict[str, GateSource]:
        """Callables for `attach_gates`: each forward recomputes the gate from the current M."""
        return {k: (lambda p=p: hard_concrete(p, self.cfg)) for k, p in self.params.items()}

    def l1(self) -> torch.Tensor:
        """Mean relaxed mask over all gates (the paper's ||sigma_hat(M)||_1 / |M|)."""
        return relaxed_mask(torch.cat(list(self.params.values())), self.cfg).mean()

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.params.values():
            p.clamp_(M_MIN, M_MAX)

    @torch.no_grad()
    def summary(self) -> tuple[dict[str, float], dict[str, float]]:
        """(share of gates exactly 0, mean gate value) per kind."""
        return kind_summary({k: hard_concrete(p, self.cfg) for k, p in self.params.items()}, self.kind_of)


def kind_summary(values: dict[str, torch.Tensor], kind_of: dict[str, str] | None = None
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Per kind: share of gates exactly 0 (the paper's Table 5 view) and mean gate value."""
    kind_of = kind_of or {k: k.rsplit("/", 1)[1] for k in values}
    closed: dict[str, list[float]] = {}  # kind -> [closed, total, sum of gate values]
    for k, v in values.items():
        c = closed.setdefault(kind_of[k], [0.0, 0.0, 0.0])
        c[0] += int((v == 0).sum())
        c[1] += v.numel()
        c[2] += float(v.sum())
    return ({k: c[0] / c[1] for k, c in closed.items()}, {k: c[2] / c[1] for k, c in closed.items()})


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _draw(gen: torch.Generator, n_prompts: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch for one step: prompt indices (B,) and shared start noise z0 (B, C, h, w)."""
    idx = torch.randint(n_prompts, (shape[0],), generator=gen)
    z0 = torch.randn(shape, generator=gen)
    return idx, z0


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, step: int, gates: GateParams, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, ident: dict[str, str],
                     weights: Sequence[tuple[str, torch.nn.Parameter]] = ()) -> None:
    """Gate params (+ tuned weights) + optimizer tensors + RNG states in safetensors; scalars in the JSON header."""
    tensors = {f"gate/{k}": p.detach().cpu().contiguous() for k, p in gates.params.items()}
    tensors.update({f"weight/{n}": p.detach().cpu().contiguous() for n, p in weights})
    write_state(path, _CKPT_FORMAT, step, tensors, ident, opt, _state_names(gates, weights), sched, gen)


def _load_checkpoint(path: Path, gates: GateParams, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                     ident: dict[str, str], weights: Sequence[tuple[str, torch.nn.Parameter]] = ()) -> int:
    """Restore everything `_save_checkpoint` wrote; refuse a checkpoint of another model, prompts or config."""
    tensors, meta = read_state(path, _CKPT_FORMAT, LearnError, "learning")
    if meta.get("model_fingerprint") != ident["model_fingerprint"]:
        raise MaskSetError(f"checkpoint {path} was made for model {meta.get('model_fingerprint')} but this model is "
                           f"{ident['model_fingerprint']}; delete it or drop --resume")
    for name, what in (("prompts_sha256", "prompt list"), ("learn_config", "learning options")):
        if meta.get(name) != ident[name]:
            raise LearnError(f"checkpoint {path} was made with another {what}; resume with the same {what}, "
                             "or drop --resume to start over")
    with torch.no_grad():
        for k, p in gates.params.items():
            p.copy_(tensors[f"gate/{k}"])
        for n, p in weights:
            p.copy_(tensors[f"weight/{n}"])
    return restore_state(tensors, meta, _state_names(gates, weights), opt, sched, gen, clone=bool(weights))


def _state_names(gates: GateParams, weights: Sequence[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """The optimizer's parameters in order, as the checkpoint names them: the gates, then any tuned weights."""
    return list(gates.params) + [f"weight/{n}" for n, _ in weights]


# ---------------------------------------------------------------------------------------------- the loop


def _batch_var(ref: torch.Tensor, accelerator: Any, world: int) -> torch.Tensor:
    """Variance of the original's latents over the global batch. Each process holds a slice of it, and a
    per-slice variance would give each process another loss than the one-process run (seen: gate logits 2e-2
    apart after 4 steps); so the slices' sums are all-reduced (float64) into the global unbiased variance."""
    if world == 1:
        return ref.var()
    x = ref.detach().double()
    stats = torch.stack([x.sum(), x.pow(2).sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                 device=x.device)])
    s, q, n = accelerator.reduce(stats, reduction="sum")
    return ((q - s * s / n) / (n - 1)).to(ref.dtype)


def _make_optimizer(params: list[torch.nn.Parameter], cfg: LearnConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def learn_masks(unet: Any, scheduler: Any, cond: Conditioning, cfg: LearnConfig, *, prompts_sha: str = "",
                checkpoint_path: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
                callback: Callable[[StepStats], None] | None = None, accelerator: Any = None,
                extra_meta: dict[str, str] | None = None, init: dict[str, torch.Tensor] | None = None,
                start_unet: Any = None, start_fingerprint: str | None = None) -> LearnResult:
    """Learn gates on the neutral prompts in `cond`; return the MaskSet (gate logits + provenance).

    `callback(stats)` runs after every step (progress bars; raising from it stops the run, the last
    checkpoint stays). With `resume=True` and an existing checkpoint, the run continues from it and
    ends with exactly the MaskSet an uninterrupted run would have produced. `init` (gate logits per key)
    warm-starts the gates instead of "every gate exactly 1" (calibration's ladder continues from the rung below).
    With `cfg.weight_lr > 0` a copy of `unet` is fine-tuned jointly with its gates against the frozen `unet`
    (returned as `LearnResult.unet`; the MaskSet carries its fingerprint, and `unet` itself is left untouched).
    `start_unet` (joint mode only) is where that copy starts instead of `unet`: calibration's ladder continues
    from the weights of the rung below, as it does from its gates; `unet` stays the teacher. A caller that
    already knows `start_unet`'s fingerprint (the rung below's MaskSet holds it) passes it as `start_fingerprint`
    rather than hashing every weight again.
    """
    device = torch.device(accelerator.device) if accelerator is not None else next(unet.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator.is_main_process if accelerator is not None else True
    if cfg.batch % world:
        raise LearnError(f"batch {cfg.batch} is not divisible by the {world} processes")

    fingerprint = model_fingerprint(unet)
    unet.requires_grad_(False).eval().to(device)
    cond = cond.to(device)
    # joint mode (weight_lr > 0): the gates sit on a trainable copy, `unet` stays the frozen original (the teacher)
    if start_unet is not None and cfg.weight_lr <= 0:
        raise LearnError("start_unet is for joint runs (weight_lr > 0): frozen gates learn on the original itself")
    student = _trainable_copy(unet if start_unet is None else start_unet) if cfg.weight_lr > 0 else unet
    weights = list(student.named_parameters()) if cfg.weight_lr > 0 else []
    targets = discover_targets(student, cfg.kinds)
    if not targets:
        raise LearnError(f"this UNet has no gate targets of kind(s) {list(cfg.kinds)} (no transformer blocks?)")
    gates = GateParams(targets, cfg.gate_config, device)
    if init is not None:
        missing = sorted(set(gates.params) - set(init))
        if missing:
            raise LearnError(f"warm-start gates miss {len(missing)} target(s), e.g. {missing[0]}")
        with torch.no_grad():
            for k, p in gates.params.items():
                p.copy_(init[k].to(p))
    opt = _make_optimizer(list(gates.params.values()), cfg)
    if weights:  # no decay: nothing should pull the weights away from the original's fit but the loss itself
        opt.add_param_group({"params": [p for _, p in weights], "lr": cfg.weight_lr, "weight_decay": 0.0})
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start_fp = None if start_unet is None else (start_fingerprint or model_fingerprint(start_unet))
    ident = {"model_fingerprint": fingerprint, "prompts_sha256": prompts_sha, "learn_config": cfg.to_json()
             + ("" if init is None else " init:" + _digest(init)) + ("" if start_fp is None else " start:" + start_fp)}

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start = 0
    if resume and ckpt is not None and ckpt.is_file():
        start = _load_checkpoint(ckpt, gates, opt, sched, gen, ident, weights)
        log.info("resumed from %s at step %d of %d", ckpt, start, cfg.steps)
    elif resume:
        log.warning("--resume: no checkpoint at %s, starting from step 0", ckpt)

    shape = latent_shape(unet, cfg.batch, cfg.height, cfg.width)
    log.info("learning %d gates (%s) on %d neutral prompts: %d steps, batch %d over %d process(es), N=%d, beta %g",
             sum(t.size for t in targets), ",".join(cfg.kinds), len(cond), cfg.steps, cfg.batch, world,
             cfg.sampler.steps, cfg.beta)
    local = slice(rank * (cfg.batch // world), (rank + 1) * (cfg.batch // world))
    history: list[StepStats] = []
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        idx, z0 = _draw(gen, len(cond), shape)
        c = cond.select(idx[local])
        z0 = z0[local].to(device)
        with torch.no_grad(), _autocast(device, cfg.precision):
            ref = sample(unet, scheduler, z0, c, cfg.sampler).float()
        opt.zero_grad(set_to_none=True)
        # backward inside the hooks' lifetime: activation checkpointing re-runs the gated UNet there
        with attach_gates(student, gates.sources(), targets):
            with _autocast(device, cfg.precision):
                out = sample(student, scheduler, z0, c, cfg.sampler).float()
            mse = (out - ref).pow(2).mean()
            rec = mse / _batch_var(ref, accelerator, world).clamp_min(1e-12) if cfg.recon == "relative" else mse
            l1 = gates.l1()
            loss = rec + cfg.beta * l1
            loss.backward()
        if world > 1:
            for p in [*gates.params.values(), *(w for _, w in weights)]:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        gates.clamp_()
        closed, mean_gate = gates.summary()
        stats = StepStats(step + 1, loss.item(), mse.item(), l1.item(), float(lr), closed, mean_gate, rec.item())
        history.append(stats)
        if ckpt is not None and checkpoint_every > 0 and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
            if is_main:
                _save_checkpoint(ckpt, step + 1, gates, opt, sched, gen, ident, weights)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        if callback is not None:
            callback(stats)
    wall = time.perf_counter() - t0

    last = history[-1] if history else None
    meta = {
        "beta": repr(cfg.beta), "steps": str(cfg.steps), "sampler_steps": str(cfg.sampler.steps),
        "prompts_sha256": prompts_sha, "lr": repr(cfg.lr), "lr_min": repr(cfg.lr_min), "optimizer": cfg.optimizer,
        "weight_decay": repr(cfg.weight_decay), "batch": str(cfg.batch), "seed": str(cfg.seed),
        "guidance_scale": repr(cfg.sampler.guidance_scale), "scheduler": type(scheduler).__name__,
        "targets": ",".join(cfg.kinds), "precision": cfg.precision, "n_prompts": str(len(cond)),
        "learn_config": cfg.to_json(), "recon": cfg.recon,
        **({"final_mse": repr(last.mse), "final_l1": repr(last.l1)} if last else {}),
        **(extra_meta or {}),
    }
    tuned = None
    if weights:  # the gates were learned for the tuned copy: the MaskSet belongs to it, not to the original
        tuned = student.requires_grad_(False).eval()
        meta.update({"teacher_fingerprint": fingerprint, "weight_lr": repr(cfg.weight_lr)})
        if start_fp is not None:
            meta["weights_start_fingerprint"] = start_fp
        fingerprint = model_fingerprint(tuned)
    ms = MaskSet(logits={k: p.detach().cpu().clone() for k, p in gates.params.items()},
                 model_fingerprint=fingerprint, gate_config=cfg.gate_config, meta=meta)
    return LearnResult(ms, tuple(history), wall, start, tuned)


def _trainable_copy(unet: Any) -> Any:
    """A copy of the UNet whose weights the joint run may change (eval mode: no dropout, so a resume is exact)."""
    import copy

    return copy.deepcopy(unet).eval().requires_grad_(True)


# ---------------------------------------------------------------------------------------------- measuring


class DriftMeter:
    """Output drift of gated models vs the original on fixed prompts and z0 (the original sampled once).

    Calling it with gates returns `mse` (mean squared final-latent difference, the learning loss's first
    term), `rel` (RMS difference / RMS of the original latents, pooled over the prompts), its bootstrap
    standard error `rel_se`, and `rel_median`, the median over prompts of each prompt's own relative drift
    (robust to the few prompts whose trajectory flips to another object), with its own bootstrap standard error
    `rel_median_se`. Gates None or empty = drift 0.
    `seeds_per_prompt` K > 1 samples every prompt from K start noises and pools them per prompt before the
    statistics (the bootstrap still resamples prompts): one start noise per prompt moves a rung's drift by about
    two of its standard errors (docs/dememorization.md, 0n), which K averages down at K times the sampling.
    K = 1 draws exactly the start noise it always did; K > 1 keeps that draw as the first of the K.
    Matching controls to a drift evaluates many gate sets, so the reference latents are cached.
    """

    @torch.no_grad()
    def __init__(self, unet: Any, scheduler: Any, cond: Conditioning, sampler_cfg: SamplerConfig | None = None, *,
                 seed: int = 1234, batch: int = 8, height: int | None = None, width: int | None = None,
                 seeds_per_prompt: int = 1):
        if seeds_per_prompt < 1:
            raise ValueError(f"seeds_per_prompt must be >= 1 (got {seeds_per_prompt})")
        self.unet, self.scheduler, self.cfg = unet, scheduler, sampler_cfg or SamplerConfig()
        self.n_prompts = len(cond)
        device = next(unet.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        n_items = len(cond) * seeds_per_prompt  # item j: prompt j % n_prompts, start noise j (row-major draw)
        z_all = torch.randn(latent_shape(unet, n_items, height, width), generator=gen)
        self.batches = []
        for lo in range(0, n_items, batch):
            idx = list(range(lo, min(lo + batch, n_items)))
            c, z0 = cond.select([j % len(cond) for j in idx]).to(device), z_all[idx].to(device)
            self.batches.append((c, z0, sample(unet, scheduler, z0, c, self.cfg)))

    @torch.no_grad()
    def __call__(self, gates: dict[str, GateSource] | None, unet: Any = None) -> dict[str, float]:
        """Drift of `unet` (default: the original itself) with `gates` attached to it."""
        target = self.unet if unet is None else unet
        if not gates:
            return self.of(unet)
        with attach_gates(target, gates):
            return self.of(target)

    @torch.no_grad()
    def of(self, unet: Any, sampler_cfg: SamplerConfig | None = None) -> dict[str, float]:
        """Drift of `unet` (any module taking the original's inputs; None = the original itself, drift 0) on
        the cached prompts and z0: the gated original here, a retrained slim UNet in retrain.NeutralDrift.
        `sampler_cfg` samples `unet` another way than the cached reference (the original's own drift under a
        sampler change: the scale a budget can be read against)."""
        items, ref_items, n = [], [], 0  # per (prompt, start noise): squared difference and reference, summed
        for c, z0, ref in self.batches:
            dims = tuple(range(1, ref.dim()))
            if unet is not None:
                out = sample(unet, self.scheduler, z0, c, sampler_cfg or self.cfg)
                items += (out.float() - ref.float()).pow(2).sum(dims).tolist()
            else:
                items += [0.0] * ref.shape[0]
            ref_items += ref.float().pow(2).sum(dims).tolist()
            n += ref.numel()
        sq, ref_sq = [0.0] * self.n_prompts, [0.0] * self.n_prompts  # pooled per prompt over its start noises
        for j, (a, b) in enumerate(zip(items, ref_items, strict=True)):
            sq[j % self.n_prompts] += a
            ref_sq[j % self.n_prompts] += b
        se = _bootstrap_rel_se(sq, ref_sq)
        return {"mse": sum(sq) / n, "rel": math.sqrt(sum(sq) / max(sum(ref_sq), 1e-30)),
                "rel_se": se["pooled"], "rel_median": median_rel(sq, ref_sq), "rel_median_se": se["median"]}


def _per_prompt_rel(sq: list[float], ref_sq: list[float]) -> np.ndarray:
    """sqrt(sq_i / ref_sq_i): each prompt's own relative drift."""
    a, b = np.asarray(sq, dtype=np.float64), np.asarray(ref_sq, dtype=np.float64)
    return np.sqrt(a / np.maximum(b, 1e-30))


def median_rel(sq: list[float], ref_sq: list[float]) -> float:
    """Median over prompts of sqrt(sq_i / ref_sq_i): the typical prompt's relative drift (DriftMeter)."""
    return float(np.median(_per_prompt_rel(sq, ref_sq))) if sq else 0.0


def bootstrap_rel_se(sq: list[float], ref_sq: list[float], draws: int = 1000, seed: int = 0,
                     statistic: str = "pooled") -> float:
    """Standard error over prompts (seeded bootstrap) of the pooled relative drift sqrt(sum sq / sum ref_sq), or
    with `statistic="median"` of the median prompt's relative drift (`median_rel`).

    Why: the drift is measured on a few dozen held-out prompts, one start noise each, and prompts differ a lot,
    so a rung 0.01 under the budget may be a draw of the prompt set; `--beta auto` reports this beside it and
    says when its decision is that close (calibrate.close_call)."""
    if statistic not in ("pooled", "median"):
        raise ValueError(f"statistic must be 'pooled' or 'median', not {statistic!r}")
    return _bootstrap_rel_se(sq, ref_sq, draws, seed)[statistic]


def _bootstrap_rel_se(sq: list[float], ref_sq: list[float], draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """Both statistics' bootstrap s.e. from one set of resampled prompt indices."""
    a, b = np.asarray(sq, dtype=np.float64), np.asarray(ref_sq, dtype=np.float64)
    if len(a) < 2:
        return {"pooled": 0.0, "median": 0.0}
    idx = np.random.default_rng(seed).integers(0, len(a), size=(draws, len(a)))
    pooled = np.sqrt(a[idx].sum(1) / np.maximum(b[idx].sum(1), 1e-30))
    median = np.median(_per_prompt_rel(sq, ref_sq)[idx], axis=1)
    return {"pooled": float(pooled.std(ddof=1)), "median": float(median.std(ddof=1))}


def latent_drift(unet: Any, scheduler: Any, cond: Conditioning, gates: dict[str, GateSource] | None,
                 sampler_cfg: SamplerConfig | None = None, **kw: Any) -> dict[str, float]:
    """One-off `DriftMeter(unet, scheduler, cond, sampler_cfg, **kw)(gates)`."""
    return DriftMeter(unet, scheduler, cond, sampler_cfg, **kw)(gates)


# ---------------------------------------------------------------------------------------------- end to end


@dataclass(frozen=True)
class LearnRequest:
    """What `uniforget learn` asks for: a model, neutral prompts, options, and where to write the MaskSet."""

    model: str = "toy"
    out: Path = Path("masks.safetensors")
    config: LearnConfig = field(default_factory=LearnConfig)
    prompts_file: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    device: str | None = None      # None = accelerate's choice (GPU if present)
    guidance_scale: float | None = None  # None = the model's own default (toy: uniforget_toy.json), else config's
    history: Path | None = None    # per-step stats as JSON lines (appended on --resume)
    drift_prompts: int = 16        # neutral drift of the final gates on this many training prompts (0 = skip)
    controls: bool = False         # also write random-removal and shuffled-gates controls at matched drift
    calibration: Any = None        # calibrate.CalibrationConfig for --beta auto: it splits the prompts and runs the
                                   # ladder (duck-typed: calibrate imports learn, never the reverse)
    write_unet: bool = True        # weight_lr > 0: write the tuned copy beside `out` (the one-shot keeps it in memory)


def checkpoint_path_for(out: Path) -> Path:
    """Where the resumable state of a run writing `out` lives (beside it)."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".ckpt.safetensors")


def run_learn(req: LearnRequest, callback: Callable[[StepStats], None] | None = None) -> LearnResult:
    """Load the pipeline, encode the neutral prompts, learn, write the MaskSet atomically (main process)."""
    from .models import load_pipeline
    from .prompts import load_prompts
    from .sampler import encode_prompts

    prompts = load_prompts(req.prompts_file, model=req.model)  # fail fast, before loading any weights
    held: list[str] = []
    if req.calibration is not None:
        prompts, held = req.calibration.split(prompts)
    accelerator = _accelerator(req.device)
    pipe = load_pipeline(req.model)
    device = accelerator.device
    pipe.to(device)
    log.info("encoding %d neutral prompts with the frozen text encoder", len(prompts) + len(held))

    def encode(ps: list[str]) -> Conditioning:
        return _concat([encode_prompts(pipe, ps[i:i + 64], device, req.config.height, req.config.width)
                        for i in range(0, len(ps), 64)])

    cond = encode(prompts)
    cfg = _with_model_guidance(req)
    record = _history_writer(req.history, req.resume and accelerator.is_main_process, callback) \
        if req.history is not None and accelerator.is_main_process else callback
    if req.calibration is not None:
        t0 = time.perf_counter()
        cal = req.calibration.run(
            pipe.unet, pipe.scheduler, cond, encode(held), cfg, prompts_sha=prompts_sha256(prompts),
            holdout_sha=prompts_sha256(held), accelerator=accelerator,
            callback=None if record is None else (lambda _i, s: record(s)))
        result = LearnResult(replace(cal.maskset, meta={**cal.maskset.meta, "model": str(req.model)}), (),
                             time.perf_counter() - t0, unet=cal.unet)
        cfg = replace(cfg, beta=cal.beta)
    else:
        result = learn_masks(pipe.unet, pipe.scheduler, cond, cfg, prompts_sha=prompts_sha256(prompts),
                             checkpoint_path=checkpoint_path_for(req.out), checkpoint_every=req.checkpoint_every,
                             resume=req.resume, callback=record, accelerator=accelerator,
                             extra_meta={"model": str(req.model)})
    meta = {**result.maskset.meta, "wall_s": f"{result.wall_s:.1f}"}
    controls: dict[str, MaskSet] = {}
    n = min(req.drift_prompts, len(cond))
    if n > 0 or req.controls:
        if n == 0:
            raise LearnError("--controls needs --drift-prompts > 0 (controls are matched on neutral drift)")
        # how far the gated model's outputs moved on (a sample of) the neutral prompts it learned from
        meter = DriftMeter(pipe.unet, pipe.scheduler, cond.select(list(range(n))), cfg.sampler, seed=cfg.seed + 1,
                           height=cfg.height, width=cfg.width)
        d = meter(result.maskset.gate_values(), result.unet)  # a tuned copy is gated, not the original
        meta.update({"neutral_drift_mse": f"{d['mse']:.6g}", "neutral_drift_rel": f"{d['rel']:.6g}",
                     "neutral_drift_prompts": str(n)})
        log.info("neutral drift on %d training prompts (N=%d): mse %.4g, relative %.4g", n, cfg.sampler.steps,
                 d["mse"], d["rel"])
        if req.controls:
            from .controls import matched_controls

            # controls gate the original (their units are not learned), at the drift the learned model reaches
            base = replace(result.maskset, model_fingerprint=meta.get("teacher_fingerprint",
                                                                      result.maskset.model_fingerprint))
            controls = matched_controls(base, lambda g: meter(g)["mse"], d["mse"], seed=cfg.seed)
    ms = replace(result.maskset, meta=meta)
    if accelerator.is_main_process:
        if result.unet is not None and req.write_unet:
            unet_dir = tuned_unet_path_for(req.out)
            save_unet_atomically(result.unet, unet_dir)
            log.info("wrote the jointly tuned UNet to %s (prune it with: uniforget prune --unet %s --masks %s)",
                     unet_dir, unet_dir, req.out)
        ms.save(req.out)
        log.info("wrote %s (%d gate targets)", req.out, len(ms.logits))
        for name, cms in controls.items():
            path = control_path_for(req.out, name)
            cms.save(path)
            log.info("wrote control %s: %s (neutral drift mse %s, learned %s)", name, path,
                     cms.meta["control_drift_mse"], meta["neutral_drift_mse"])
    return replace(result, maskset=ms)


def tuned_unet_path_for(out: Path) -> Path:
    """`masks.safetensors` -> `masks.unet/`: the diffusers UNet folder a joint run (weight_lr > 0) writes."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".unet")


def save_unet_atomically(unet: Any, path: Path) -> None:
    """save_pretrained into `<path>.partial`, then swap it in: no half-written folder under the final name."""
    import shutil

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def control_path_for(out: Path, name: str) -> Path:
    """`masks.safetensors` -> `masks.control-random.safetensors` (a MaskSet `uniforget validate` can read)."""
    return out.with_name(out.name.removesuffix(".safetensors") + f".control-{name}.safetensors")


def _history_writer(path: Path, append: bool, then: Callable[[StepStats], None] | None
                    ) -> Callable[[StepStats], None]:
    """A step callback that appends each step's stats as one JSON line (the loss curve), then calls `then`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not append:
        path.write_text("")

    def write(stats: StepStats) -> None:
        with path.open("a") as f:
            f.write(json.dumps(asdict(stats)) + "\n")
        if then is not None:
            then(stats)

    return write


def _with_model_guidance(req: LearnRequest) -> LearnConfig:
    """Learn with the guidance the model is sampled with: an explicit value, else the model folder's own."""
    from .evaluate import model_guidance

    guidance = model_guidance(req.model, req.guidance_scale)
    if guidance is None:
        return req.config
    return replace(req.config, sampler=replace(req.config.sampler, guidance_scale=guidance))


def _accelerator(device: str | None) -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=(device == "cpu"))


def _concat(parts: list[Conditioning]) -> Conditioning:
    cat = lambda ds: {k: torch.cat([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
    uncond = None if parts[0].uncond is None else torch.cat([p.uncond for p in parts])
    return Conditioning(torch.cat([p.cond for p in parts]), uncond,
                        cat([p.added for p in parts]), cat([p.added_uncond for p in parts]))
