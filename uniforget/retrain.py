"""Brief neutral retrain: fine-tune a slim UNet's remaining weights until it again matches the original.

The paper's "strong + brief retrain" row (METHOD.md) recovers neutral quality after heavy pruning. We have no
training images, so the frozen original (dense) UNet is the teacher and the slim UNet the student, on neutral
prompts only. Two objectives (`RetrainConfig.objective`); each step draws, from one seeded generator,
z0 ~ N(0, I), neutral prompts c and (noise objective) a step k ~ U{0..N-1}:

    trajectory (default): loss = mean((F_s(z0, N, c) - F_T(z0, N, c))^2) / mean(F_T^2)
        F = final latents of the N-step CFG sampler, backpropagated through all N steps (learning's
        reconstruction term, now on the weights)
    noise: x_k, t_k = the model input and timestep at step k of the teacher's N-step CFG trajectory from z0,
        u, c = the noise predictions for the empty and the text conditioning, d = c - u,
        loss = 1/2 [ mean((u_s - u_T)^2) / mean(u_T^2) + mean((d_s - d_T)^2) / mean(d_T^2) ]

Why the trajectory objective is the default: it is what the budget and every fidelity measure look at (the
student's own N-step sample), and on the toy it was the only one that lowered held-out neutral drift. The noise
objective is one student call per sample instead of N, but matches the student only on the teacher's states:
at inference the student walks its own, and its errors compound. Measured on the toy at beta 20
(docs/dememorization.md): the noise objective halved every per-step error yet raised held-out drift
0.31 -> 0.45 and dropped the judge from 88% to 40%; the trajectory objective lowered drift 0.29 -> 0.27 and kept
the judge. In the noise objective the guidance direction d is matched on its own scale because the two CFG
halves are nearly equal, so an error small against them can be as large as their difference, which is all the
text contributes to the guided step (3% per half, 200% on d, measured). Either way memorized content has no
signal in the loss; whether any comes back must be measured after the retrain, not assumed. Dividing by the
teacher's own mean square makes both losses scale-free (~1 means "no better than predicting zero").

Checkpoints (safetensors: student weights, AdamW tensors, RNG states; scalars in the JSON header; no pickle)
make a resumed run bit-identical to an uninterrupted one. Under `accelerate launch` every process draws the
same global batch and takes its slice; the loss normalizer and the gradients are averaged across processes,
so the weights stay identical everywhere (as in learn.py).

Parity: the prune stage proved gated == slim (fp32, <= 1e-5) for the *pre-retrain* weights only. Retrained
weights start a new parity chain: the slim folder written here keeps the same plan and shapes, and
`uniforget export` checks its ONNX graph against the retrained torch UNet with ONNX Runtime as for any slim UNet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .checkpoint import read_state, restore_state, write_state
from .configs import (  # re-exported
    OBJECTIVES as OBJECTIVES,
    RETRAIN_PRECISIONS as RETRAIN_PRECISIONS,
    RetrainConfig as RetrainConfig,
    RetrainError as RetrainError,
)
from .fingerprint import model_fingerprint
from .learn import DriftMeter
from .sampler import (
    Conditioning,
    SamplerConfig,
    _model_input,  # the sampler's own CFG batching: the states must be built exactly as at inference
    _step_kwargs,
    fresh_scheduler,
    latent_shape,
    sample,
)

log = logging.getLogger(__name__)

PRECISIONS = dict(zip(RETRAIN_PRECISIONS, (None, torch.bfloat16), strict=True))  # autocast dtypes
REPORT_NAME = "uniforget_retrain.json"
_REPORT_FORMAT = "uniforget.retrain/1"
_CKPT_FORMAT = "uniforget.retrain-checkpoint/2"  # /2: uncond + guidance-direction loss
_BUCKET = 1 << 24  # gradient elements per all-reduce (fewer collectives than one per tensor)


@dataclass(frozen=True)
class RetrainStep:
    """One optimizer step, as the progress bar and the loss curve see it."""

    step: int      # 1-based, after the update
    loss: float    # normalized noise-prediction MSE of the global batch (before the update)
    lr: float      # learning rate the update used


@dataclass(frozen=True)
class RetrainResult:
    unet: nn.Module                       # the student, trained in place (eval mode, no grad)
    history: tuple[RetrainStep, ...]      # every step of the run, including those before a resume
    wall_s: float                         # training-loop time of this call
    resumed_from: int = 0                 # step the run resumed at (0 = fresh)
    summary: dict[str, Any] = field(default_factory=dict)  # run_retrain: what uniforget_retrain.json records


# ---------------------------------------------------------------------------------------------- the signal


@dataclass(frozen=True)
class TeacherStates:
    """Where the sampler queries the model (one state per sample) and what the teacher answers there."""

    x: torch.Tensor                # (B, C, h, w) scaled model input at the sample's step
    t: torch.Tensor                # (B,) that step's timestep
    eps_c: torch.Tensor            # (B, C, h, w) teacher noise prediction, text conditioning
    eps_u: torch.Tensor | None     # (B, C, h, w) the same for the empty/negative conditioning (None without it)


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _eps(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor,
         added: dict[str, torch.Tensor] | None, precision: str) -> torch.Tensor:
    with _autocast(x.device, precision):
        return unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0].float()


@torch.no_grad()
def teacher_states(teacher: nn.Module, scheduler: Any, z0: torch.Tensor, cond: Conditioning,
                   step_idx: torch.Tensor, cfg: SamplerConfig, precision: str = "fp32") -> TeacherStates:
    """Walk the teacher's N-step CFG trajectory from `z0` (B, C, h, w) as `sampler.sample` does, and record for
    sample b the model input, timestep and both noise predictions at its step `step_idx[b]` in [0, N).

    A fresh scheduler runs (the template is never mutated); the walk stops at the latest requested step.
    Both CFG halves are evaluated whenever `cond.uncond` exists, even at guidance <= 1, so both can be matched.
    """
    b = z0.shape[0]
    if len(cond) != b or tuple(step_idx.shape) != (b,):
        raise ValueError(f"z0 batch {b}, conditioning batch {len(cond)} and step indices {tuple(step_idx.shape)} differ")
    both = cond.uncond is not None
    if cfg.uses_guidance and not both:
        raise ValueError("guidance_scale > 1 needs unconditional embeddings (Conditioning.uncond)")
    sched = fresh_scheduler(scheduler)
    sched.set_timesteps(cfg.steps, device=z0.device)
    step_kw = _step_kwargs(sched, cfg.eta, None)
    step_idx = step_idx.to(z0.device)
    last = int(step_idx.max())
    if last >= len(sched.timesteps) or int(step_idx.min()) < 0:
        raise ValueError(f"step indices must be in [0, {len(sched.timesteps)}), got max {last}")
    x_at, eps_c_at = torch.empty_like(z0), torch.empty_like(z0)
    eps_u_at = torch.empty_like(z0) if both else None
    t_at = torch.empty(b, dtype=sched.timesteps.dtype, device=z0.device)
    latents = z0 * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps[: last + 1]):
        x, ehs, added = _model_input(latents, cond, both)
        x = sched.scale_model_input(x, t)  # (2B or B, C, h, w); both halves hold the same latents
        eps = _eps(teacher, x, t, ehs, added, precision)
        eps_u, eps_c = eps.chunk(2) if both else (None, eps)  # (B, C, h, w) each
        here = step_idx == i
        x_at[here] = x[:b][here]
        t_at[here] = t
        eps_c_at[here] = eps_c[here]
        if both:
            eps_u_at[here] = eps_u[here]
        if i == last:
            break
        guided = eps_u + cfg.guidance_scale * (eps_c - eps_u) if cfg.uses_guidance else eps_c
        latents = sched.step(guided, t, latents, **step_kw, return_dict=False)[0]
    return TeacherStates(x_at, t_at, eps_c_at, eps_u_at)


def matching_loss(student: nn.Module, states: TeacherStates, cond: Conditioning,
                  precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Per matched term, (mean squared student error, mean squared teacher value), each of shape (K,); the loss
    is the mean of their ratios (one student call for both CFG halves).

    With both CFG halves the terms are the unconditional prediction and the guidance direction (cond - uncond),
    each normalized by its own teacher size. Why not the two halves as they are: the halves are nearly equal,
    so an error small against them can still be as large as their difference, which is all the text
    contributes to the guided step (measured on the toy at beta 20: 3% error on each half, 200% on the
    difference; a retrain on the halves alone cut the former and left final latents drifting more).
    Without CFG halves the one term is the conditional prediction.
    """
    both = states.eps_u is not None
    x, ehs, added = _model_input(states.x, cond, both)   # (2B, C, h, w): uncond first, as the sampler batches
    t = torch.cat([states.t, states.t]) if both else states.t  # (2B,)
    eps = _eps(student, x, t, ehs, added, precision)
    if not both:
        return (eps - states.eps_c).pow(2).mean()[None], states.eps_c.pow(2).mean()[None]
    eps_u, eps_c = eps.chunk(2)
    d_s, d_t = eps_c - eps_u, states.eps_c - states.eps_u
    mse = torch.stack([(eps_u - states.eps_u).pow(2).mean(), (d_s - d_t).pow(2).mean()])
    norm = torch.stack([states.eps_u.pow(2).mean(), d_t.pow(2).mean()])
    return mse, norm


def trajectory_loss(student: nn.Module, teacher: nn.Module, scheduler: Any, z0: torch.Tensor, cond: Conditioning,
                    cfg: SamplerConfig, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean squared final-latent difference of the student's N-step sample from the teacher's, mean squared
    teacher latent), shape (1,) each: the mask-learning loss's reconstruction term, now on the weights.

    Why offer it: matching noise predictions on the teacher's states leaves the student's own trajectory free
    to drift (measured on the toy at beta 20: every per-step error fell by half, yet held-out final-latent drift
    rose 0.35 -> 0.44), because at inference the student is queried on its own states. This backpropagates
    through all N steps, as learning does, at about N times the cost of a step of the noise objective.
    """
    with torch.no_grad(), _autocast(z0.device, precision):
        ref = sample(teacher, scheduler, z0, cond, cfg).float()
    with _autocast(z0.device, precision):
        out = sample(student, scheduler, z0, cond, cfg).float()
    return (out - ref).pow(2).mean()[None], ref.pow(2).mean()[None]


def _draw(gen: torch.Generator, n_prompts: int, shape: tuple[int, ...], n_steps: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch for one step: prompt indices (B,), start noise z0 (B, C, h, w), trajectory steps (B,)."""
    idx = torch.randint(n_prompts, (shape[0],), generator=gen)
    z0 = torch.randn(shape, generator=gen)
    k = torch.randint(n_steps, (shape[0],), generator=gen)
    return idx, z0, k


def conditioning_sha256(cond: Conditioning) -> str:
    """Digest of the encoded prompts: a checkpoint made for other prompts (or encoders) is refused."""
    h = hashlib.sha256()
    parts = {"cond": cond.cond, "uncond": cond.uncond, **{f"added/{k}": v for k, v in sorted(cond.added.items())},
             **{f"added_uncond/{k}": v for k, v in sorted(cond.added_uncond.items())}}
    for name, v in parts.items():
        if v is None:
            continue
        v = v.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(v.shape)}".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def weights_sha256(module: nn.Module) -> str:
    """Exact digest of every tensor (names, dtypes, shapes, bytes): the student a checkpoint continues must be
    the very slim UNet it started from (model_fingerprint's rounded samples would miss a small fine-tune)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _average_gradients(params: Sequence[nn.Parameter], accelerator: Any) -> None:
    """Mean of every gradient across processes, in flat buckets (one all-reduce per ~16M elements)."""
    grads = [p.grad for p in params if p.grad is not None]
    i = 0
    while i < len(grads):
        j, n = i, 0
        while j < len(grads) and (j == i or n + grads[j].numel() <= _BUCKET):
            n += grads[j].numel()
            j += 1
        chunk = grads[i:j]
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in chunk]), reduction="mean")  # (n,)
        off = 0
        for g in chunk:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        i = j


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, step: int, student: nn.Module, names: list[str], opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, ident: dict[str, str],
                     history: list[RetrainStep]) -> None:
    """Student tensors + AdamW tensors + RNG states in safetensors, scalars in the JSON header; atomic."""
    tensors = {f"student/{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    meta = {"history": json.dumps([[s.step, s.loss, s.lr] for s in history]), **ident}
    write_state(path, _CKPT_FORMAT, step, tensors, meta, opt, names, sched, gen)


_IDENT_WHAT = {"teacher_fingerprint": "original (teacher) model", "student_sha256": "slim UNet",
               "conditioning_sha256": "neutral prompt list", "retrain_config": "retrain options"}


def _load_checkpoint(path: Path, student: nn.Module, names: list[str], opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                     ident: dict[str, str]) -> tuple[int, list[RetrainStep]]:
    """Restore what `_save_checkpoint` wrote; refuse a checkpoint of another model, slim UNet, prompts or config."""
    tensors, meta = read_state(path, _CKPT_FORMAT, RetrainError, "retrain")
    for key, what in _IDENT_WHAT.items():
        if meta.get(key) != ident[key]:
            raise RetrainError(f"checkpoint {path} was made for another {what}; resume with the same {what}, "
                               "or drop --resume to start over")
    # clone: fresh, aligned allocations (results of vectorized kernels can depend on a buffer's alignment)
    student.load_state_dict({k[len("student/"):]: v.clone() for k, v in tensors.items() if k.startswith("student/")},
                            strict=True)
    step = restore_state(tensors, meta, names, opt, sched, gen, clone=True)
    history = [RetrainStep(int(s), float(loss), float(lr)) for s, loss, lr in json.loads(meta["history"])]
    return step, history


def checkpoint_path_for(out: Path) -> Path:
    """Where the resumable state of a retrain writing the slim folder `out` lives (beside it)."""
    out = Path(out)
    return out.with_name(out.name + ".retrain-ckpt.safetensors")


# ---------------------------------------------------------------------------------------------- the loop


def retrain_unet(student: nn.Module, teacher: nn.Module, scheduler: Any, cond: Conditioning, cfg: RetrainConfig,
                 checkpoint_path: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
                 callback: Callable[[RetrainStep], None] | None = None, accelerator: Any = None) -> RetrainResult:
    """Fine-tune every `student` parameter (in place, AdamW + cosine) to match the frozen `teacher`'s noise
    predictions along its own trajectories on the neutral prompts in `cond` (see the module docstring).

    `callback(step)` runs after every step (progress bars; raising from it stops the run, the last checkpoint
    stays). With `resume=True` and an existing checkpoint, the run continues from it and ends with exactly the
    weights an uninterrupted run would have produced. `cfg.steps == 0` returns the student untouched.
    """
    if checkpoint_every < 0:
        raise RetrainError(f"checkpoint_every must be >= 0 (got {checkpoint_every})")
    if len(cond) == 0:
        raise RetrainError("no neutral prompts to retrain on")
    if cfg.sampler.uses_guidance and cond.uncond is None:
        raise RetrainError("guidance scale > 1 needs the empty/negative conditioning (Conditioning.uncond)")
    if cfg.steps == 0:
        log.info("retrain: 0 steps, the slim UNet is returned unchanged")
        return RetrainResult(student, (), 0.0, 0)
    device = torch.device(accelerator.device) if accelerator is not None else next(student.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator.is_main_process if accelerator is not None else True
    if cfg.batch % world:
        raise RetrainError(f"batch {cfg.batch} is not divisible by the {world} processes")

    ident = {"teacher_fingerprint": model_fingerprint(teacher), "student_sha256": weights_sha256(student),
             "conditioning_sha256": conditioning_sha256(cond), "retrain_config": cfg.to_json()}
    teacher.requires_grad_(False).eval().to(device)
    # eval mode: no dropout, so the seeded draw is the only randomness and a resume is bit-identical on any device
    student.to(device).eval().requires_grad_(True)
    cond = cond.to(device)
    named = list(student.named_parameters())
    names, params = [n for n, _ in named], [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # some schedulers draw (unused) noise from the global RNG in step()

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start, history = 0, []
    if resume and ckpt is not None and ckpt.is_file():
        start, history = _load_checkpoint(ckpt, student, names, opt, sched, gen, ident)
        log.info("resumed from %s at step %d of %d", ckpt, start, cfg.steps)
    elif resume:
        log.warning("--resume: no checkpoint at %s, starting from step 0", ckpt)

    shape = latent_shape(student, cfg.batch, cfg.height, cfg.width)
    sampler_cfg = cfg.sampler
    log.info("retraining %d slim-UNet parameters on %d neutral prompts: %d steps, batch %d over %d process(es), "
             "%s objective, N=%d sampler steps (guidance %g), lr %g", sum(p.numel() for p in params), len(cond),
             cfg.steps, cfg.batch, world, cfg.objective, cfg.sampler_steps, cfg.guidance_scale, cfg.lr)
    local = slice(rank * (cfg.batch // world), (rank + 1) * (cfg.batch // world))
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        idx, z0, k = _draw(gen, len(cond), shape, cfg.sampler_steps)
        c = cond.select(idx[local])
        opt.zero_grad(set_to_none=True)
        if cfg.objective == "trajectory":
            mse, norm = trajectory_loss(student, teacher, scheduler, z0[local].to(device), c, sampler_cfg,
                                        cfg.precision)
        else:
            states = teacher_states(teacher, scheduler, z0[local].to(device), c, k[local], sampler_cfg,
                                    cfg.precision)
            mse, norm = matching_loss(student, states, c, cfg.precision)
        norm = norm.detach()
        if world > 1:  # equal slices: the mean of the local means is the global batch's mean
            norm = accelerator.reduce(norm, reduction="mean")
        loss = (mse / norm.clamp_min(1e-12)).mean()
        loss.backward()
        value = float(loss.detach() if world == 1 else accelerator.reduce(loss.detach(), reduction="mean"))
        if not math.isfinite(value):  # before the update: the last checkpoint stays usable
            raise RetrainError(f"retrain loss is {value} at step {step + 1}; lower --lr or use --precision fp32")
        if world > 1:
            _average_gradients(params, accelerator)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        stats = RetrainStep(step + 1, value, float(lr))
        history.append(stats)
        if ckpt is not None and checkpoint_every > 0 and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
            if is_main:
                _save_checkpoint(ckpt, step + 1, student, names, opt, sched, gen, ident, history)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        if callback is not None:
            callback(stats)
    wall = time.perf_counter() - t0
    student.requires_grad_(False).eval()
    return RetrainResult(student, tuple(history), wall, start)


# ---------------------------------------------------------------------------------------------- measuring


class NeutralDrift(DriftMeter):
    """Final-latent drift of a UNet from the teacher on fixed prompts and z0 (the teacher sampled once):
    learn.DriftMeter's measure, called with the UNet to score instead of gates on the teacher.

    `mse`: mean squared final-latent difference (the mask-learning loss's first term);
    `rel`: RMS difference / RMS of the teacher's latents.
    """

    def __call__(self, unet: nn.Module) -> dict[str, float]:  # type: ignore[override]
        return self.of(unet)


# ---------------------------------------------------------------------------------------------- end to end


@dataclass(frozen=True)
class RetrainRequest:
    """What `uniforget retrain` asks for: a slim UNet, the model it was cut from, neutral prompts, options."""

    slim: Path                     # slim UNet folder (uniforget prune's --out)
    out: Path                      # retrained slim UNet folder to write
    model: str = "toy"             # the original pipeline: teacher, text encoder, scheduler
    config: RetrainConfig = field(default_factory=RetrainConfig)
    prompts_file: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    device: str | None = None      # None = accelerate's choice (GPU if present)
    guidance_scale: float | None = None  # None = the model's own sampling default, else config's
    drift_prompts: int = 4         # neutral prompts held out of the retrain to measure drift on (0 = skip)
    overwrite: bool = False


def _check_request(req: RetrainRequest) -> tuple[Any, list[str]]:
    """Everything that can be checked without loading weights: (the slim folder's plan, the neutral prompts)."""
    from .plan import PruningPlan
    from .prompts import load_prompts
    from .slim_io import CONFIG_NAME, PLAN_NAME, WEIGHTS_NAME

    if req.checkpoint_every < 0:
        raise RetrainError(f"--checkpoint-every must be >= 0 (got {req.checkpoint_every})")
    if req.drift_prompts < 0:
        raise RetrainError(f"--drift-prompts must be >= 0 (got {req.drift_prompts})")
    if req.guidance_scale is not None and not (req.guidance_scale >= 0 and math.isfinite(req.guidance_scale)):
        raise RetrainError(f"guidance scale must be a finite number >= 0 (got {req.guidance_scale})")
    slim, out = Path(req.slim), Path(req.out)
    missing = [n for n in (CONFIG_NAME, PLAN_NAME, WEIGHTS_NAME) if not (slim / n).is_file()]
    if missing:
        raise RetrainError(f"{slim} is not a slim UNet folder (missing {', '.join(missing)}); give uniforget "
                           "prune's --out")
    if out.resolve() == slim.resolve():
        raise RetrainError(f"--out {out} is the input slim folder; write the retrained UNet elsewhere")
    if out.exists() and not req.overwrite:
        raise RetrainError(f"{out} already exists; choose another --out or pass --overwrite")
    plan = PruningPlan.load(slim / PLAN_NAME)
    prompts = load_prompts(req.prompts_file, model=req.model)
    if req.drift_prompts >= len(prompts):
        raise RetrainError(f"--drift-prompts {req.drift_prompts} holds out every one of the {len(prompts)} neutral "
                           "prompts; lower it (0 = skip the drift measurement)")
    return plan, prompts


def _model_guidance(req: RetrainRequest) -> RetrainConfig:
    """Retrain along the trajectories the model is sampled with: an explicit value, else the model folder's own."""
    from dataclasses import replace

    from .evaluate import model_guidance

    guidance = model_guidance(req.model, req.guidance_scale)
    return req.config if guidance is None else replace(req.config, guidance_scale=guidance)


def heldout_indices(n_prompts: int, k: int) -> list[int]:
    """k prompts spread evenly over the list (it may be ordered by theme), held out for the drift measurement."""
    return list(range(0, n_prompts, n_prompts // k))[:k] if k else []


def run_retrain(req: RetrainRequest, callback: Callable[[RetrainStep], None] | None = None) -> RetrainResult:
    """Load teacher and slim student, encode the neutral prompts, retrain, write the slim folder atomically."""
    from .learn import _accelerator, _concat, prompts_sha256
    from .models import load_pipeline
    from .sampler import encode_prompts
    from .slim_io import load_slim_unet

    plan, prompts = _check_request(req)  # fail fast, before loading any weights
    cfg = _model_guidance(req)
    held = heldout_indices(len(prompts), req.drift_prompts)
    train = sorted(set(range(len(prompts))) - set(held))
    t_start = time.perf_counter()

    accelerator = _accelerator(req.device)
    pipe = load_pipeline(req.model)
    teacher_fp = model_fingerprint(pipe.unet)
    # a slim UNet cut from a copy tuned with its masks (learn --tune-weights) has that copy's teacher as its original
    if teacher_fp not in (plan.model_fingerprint, plan.maskset_meta.get("teacher_fingerprint")):
        raise RetrainError(f"{req.slim} was pruned from model {plan.model_fingerprint} but {req.model} is "
                           f"{teacher_fp}; retrain against the model the slim UNet was cut from")
    device = accelerator.device
    pipe.to(device)
    student = load_slim_unet(req.slim, device=device)
    if any(p.dtype != torch.float32 for p in student.parameters()):
        student = student.float()  # fp32 master weights; --precision bf16 autocasts the compute only
    log.info("encoding %d neutral prompts with the frozen text encoder (%d held out for drift)", len(prompts),
             len(held))
    cond = _concat([encode_prompts(pipe, prompts[i:i + 64], device, cfg.height, cfg.width)
                    for i in range(0, len(prompts), 64)])
    train_cond = cond.select(train)

    probe = None
    drift_before: dict[str, float] = {}
    if held:
        probe = NeutralDrift(pipe.unet, pipe.scheduler, cond.select(held), cfg.sampler, seed=cfg.seed + 1,
                             height=cfg.height, width=cfg.width)
        drift_before = probe(student)
    result = retrain_unet(student, pipe.unet, pipe.scheduler, train_cond, cfg,
                          checkpoint_path=checkpoint_path_for(req.out), checkpoint_every=req.checkpoint_every,
                          resume=req.resume, callback=callback, accelerator=accelerator)
    drift_after = probe(result.unet) if probe is not None else {}
    if held:
        log.info("neutral drift on %d held-out prompts (N=%d): relative %.4g before, %.4g after the retrain",
                 len(held), cfg.sampler_steps, drift_before["rel"], drift_after["rel"])
    hist = result.history
    summary = {
        "format": _REPORT_FORMAT, "library_version": __version__, "model": str(req.model),
        "model_fingerprint": teacher_fp, "source_slim": str(req.slim), "plan_sha256": plan.digest(),
        "config": asdict(cfg), "prompts_sha256": prompts_sha256([prompts[i] for i in train]),
        "n_prompts": len(train), "heldout_prompts": [prompts[i] for i in held],
        "wall_s": round(result.wall_s, 3), "total_s": round(time.perf_counter() - t_start, 3),
        "processes": int(accelerator.num_processes), "resumed_from": result.resumed_from, "steps_run": len(hist),
        "first_loss": hist[0].loss if hist else None, "final_loss": hist[-1].loss if hist else None,
        "neutral_drift_before": drift_before or None, "neutral_drift_after": drift_after or None,
        "parity": "gated == slim parity (uniforget prune) holds for the pre-retrain weights only; these weights "
                  "start a new parity chain, checked against ONNX Runtime by `uniforget export`",
    }
    if accelerator.is_main_process:
        _save_with_report(result.unet, plan, Path(req.out), summary, req.overwrite)
    return RetrainResult(result.unet, hist, result.wall_s, result.resumed_from, summary)


def _save_with_report(unet: nn.Module, plan: Any, out: Path, summary: dict[str, Any], overwrite: bool) -> None:
    """The slim folder (same plan, same shapes) plus uniforget_retrain.json, renamed into place only when complete."""
    from .slim_io import save_slim_unet

    if out.exists() and not overwrite:
        raise RetrainError(f"{out} already exists; choose another --out or pass --overwrite")
    save_slim_unet(unet, plan, out, overwrite=True,
                   extra_files={REPORT_NAME: json.dumps(summary, indent=1, allow_nan=False) + "\n"})
    log.info("wrote retrained slim UNet to %s (+ %s)", out, REPORT_NAME)


__all__ = ["RetrainConfig", "RetrainError", "RetrainRequest", "RetrainResult", "RetrainStep", "TeacherStates",
           "NeutralDrift", "teacher_states", "matching_loss", "trajectory_loss", "retrain_unet", "run_retrain", "checkpoint_path_for",
           "conditioning_sha256", "weights_sha256", "heldout_indices", "REPORT_NAME"]
