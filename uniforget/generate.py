"""Generation for measurement: prompts x seeds through the pipeline's own __call__, optionally gated or with
given (e.g. perturbed) text embeddings, and the DoRI-style trigger perturbations of those embeddings.

Determinism: image (prompt p, seed s) starts from noise drawn by its own CPU `torch.Generator(seed=s)`,
so it does not depend on batch size, batch position or device; two models given the same prompts and
seeds start from the same noise (which is what output drift compares).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np
import torch

from .errors import UniforgetError
from .fingerprint import model_fingerprint
from .gating import attach_gates

if TYPE_CHECKING:
    from .masks import MaskSet

log = logging.getLogger(__name__)

Gates: TypeAlias = "MaskSet | Mapping[str, torch.Tensor] | None"  # a MaskSet, or {key: gate values}


class BatchObserver(Protocol):
    """Something that watches the UNet during generation and wants to know where batches start and end."""

    def begin_batch(self, n: int) -> None: ...

    def end_batch(self) -> None: ...


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning per prompt as the pipeline consumes it (SDXL adds the pooled embeddings)."""

    embeds: torch.Tensor  # (N, T, D) prompt_embeds
    negative: torch.Tensor  # (N, T, D) embeddings of the empty prompt (classifier-free guidance)
    pooled: torch.Tensor | None = None  # (N, P) SDXL only
    negative_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    def select(self, idx: Sequence[int]) -> Conditioning:
        ix = torch.as_tensor(list(idx), dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[ix.to(t.device)]

        return Conditioning(pick(self.embeds), pick(self.negative), pick(self.pooled), pick(self.negative_pooled))

    def with_embeds(self, embeds: torch.Tensor) -> Conditioning:
        if embeds.shape != self.embeds.shape:
            raise ValueError(f"new embeddings {tuple(embeds.shape)} != {tuple(self.embeds.shape)}")
        return replace(self, embeds=embeds)

    def call_kwargs(self) -> dict[str, torch.Tensor]:
        kw = {"prompt_embeds": self.embeds, "negative_prompt_embeds": self.negative}
        if self.pooled is not None:
            kw["pooled_prompt_embeds"] = self.pooled
            kw["negative_pooled_prompt_embeds"] = self.negative_pooled
        return kw


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> Conditioning:
    """Text embeddings of `prompts` and the pipeline's default negative, through the pipeline's own encoder.

    negative_prompt None is the pipeline's own choice ("" for SD1/2, zeros for SDXL), the same as mask learning
    (`sampler.encode_prompts`), so evaluation generates exactly what the gates were learned against. This class
    feeds the pipeline's `__call__`; the sampler's feeds the bare UNet.
    """
    out = pipe.encode_prompt(list(prompts), device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=None)
    if len(out) == 4:  # SDXL: (embeds, negative, pooled, negative_pooled)
        return Conditioning(out[0], out[1], out[2], out[3])
    return Conditioning(out[0], out[1])


def _gate_context(pipe: Any, gates: Gates):
    if gates is None:
        return nullcontext()
    if hasattr(gates, "gate_values"):  # a MaskSet (duck-typed: masks.py is imported only where a file is read)
        gates.check_model(model_fingerprint(pipe.unet))
        gates = gates.gate_values()
    return attach_gates(pipe.unet, dict(gates))


def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 transient=True)
    return _ProgressTask(p, label, total)


class _ProgressTask:
    def __init__(self, p: Any, label: str, total: int):
        self.p, self.label, self.total = p, label, total

    def __enter__(self):
        self.p.__enter__()
        self.task = self.p.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.p.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        self.p.__exit__(*exc)


def generate(pipe: Any, prompts: Sequence[str] | None, seeds: Sequence[int], steps: int = 20,
             guidance: float = 5.0, gates: Gates = None, prompt_embeds: Conditioning | None = None,
             *, batch_size: int = 16, height: int | None = None, width: int | None = None,
             progress: bool = False, label: str = "generating", observer: BatchObserver | None = None) -> np.ndarray:
    """Images (len(prompts) * len(seeds), H, W, 3) float32 in [0, 1], prompt-major: row p * len(seeds) + s.

    Give `prompts`, or `prompt_embeds` (one row per prompt, e.g. perturbed trigger embeddings), not both.
    `gates` (a MaskSet or {key: gate values}) are attached for the call only.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise UniforgetError("generate needs either prompts or prompt_embeds (exactly one)")
    n_prompts = len(prompts) if prompts is not None else len(prompt_embeds)
    seeds = [int(s) for s in seeds]
    if not seeds or not n_prompts:
        raise UniforgetError("generate needs at least one prompt and one seed")
    jobs = [(p, s) for p in range(n_prompts) for s in seeds]
    out: list[np.ndarray] = []
    with _gate_context(pipe, gates), _progress(progress, len(jobs), label) as bar, torch.no_grad():
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i:i + batch_size]
            gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
            kw: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                                      height=height, width=width, output_type="np")
            if prompt_embeds is not None:
                kw.update(prompt_embeds.select([p for p, _ in chunk]).call_kwargs())
            else:
                kw["prompt"] = [prompts[p] for p, _ in chunk]
            if observer is not None:
                observer.begin_batch(len(chunk))
            images = pipe(**kw).images
            if observer is not None:
                observer.end_batch()
            out.append(np.asarray(images, dtype=np.float32))
            if bar is not None:
                bar.advance(len(chunk))
    images = np.concatenate(out)
    if not np.isfinite(images).all():
        log.warning("generation produced non-finite pixels")
    return images


def perturb_embeddings(cond: Conditioning, rel_norm: float, seed: int = 0) -> Conditioning:
    """Add Gaussian noise to every token vector, scaled to `rel_norm` times that token's own L2 norm."""
    if rel_norm < 0:
        raise UniforgetError(f"perturbation norm must be >= 0, got {rel_norm}")
    e = cond.embeds
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(e.shape, generator=g, dtype=torch.float32).to(e.device, e.dtype)  # (N, T, D)
    noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return cond.with_embeds(e + rel_norm * e.norm(dim=-1, keepdim=True) * noise)


def _project(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-token projection of `delta` onto the ball of radius `radius` (N, T, 1)."""
    n = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(radius / n, max=1.0)


@torch.no_grad()
def encode_latents(pipe: Any, images: np.ndarray) -> torch.Tensor:
    """VAE latents (mean of the posterior, scaled as the UNet sees them) of images (N, H, W, 3) in [0, 1]."""
    vae = pipe.vae
    x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2).to(pipe.device, vae.dtype)
    z = vae.encode(x * 2 - 1).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def optimize_embeddings(pipe: Any, cond: Conditioning, target_images: np.ndarray, rel_norm: float = 0.1,
                        iters: int = 8, timesteps_per_iter: int = 4, seed: int = 0, gates: Gates = None
                        ) -> Conditioning:
    """One optimized (not random) trigger perturbation, per prompt: projected gradient descent on the text
    embedding, within a per-token ball of `rel_norm` times the token's norm, that lowers the denoiser's
    eps-prediction loss on the planted image's latent at random timesteps -- i.e. pulls the (gated) model
    back towards reproducing the planted image. Cheap: `iters` x `timesteps_per_iter` UNet passes.
    """
    if cond.pooled is not None:
        raise UniforgetError("optimized trigger perturbation supports SD1.x/SD2.x pipelines (no SDXL pooled input)")
    if len(target_images) != len(cond):
        raise UniforgetError(f"{len(target_images)} target images for {len(cond)} prompts")
    unet, sched = pipe.unet, pipe.scheduler
    z0 = encode_latents(pipe, target_images)  # (N, 4, h, w)
    e0 = cond.embeds.detach()
    radius = rel_norm * e0.norm(dim=-1, keepdim=True)  # (N, T, 1)
    step = 2.5 * radius / max(iters, 1)
    g = torch.Generator("cpu").manual_seed(seed)
    n_train = int(sched.config.num_train_timesteps)
    pred_type = getattr(sched.config, "prediction_type", "epsilon")
    delta = torch.zeros_like(e0)
    with _gate_context(pipe, gates):
        for _ in range(iters):
            d = delta.clone().requires_grad_(True)
            loss = torch.zeros((), device=e0.device)
            for _ in range(timesteps_per_iter):
                t = torch.randint(0, n_train, (len(e0),), generator=g).to(e0.device)
                noise = torch.randn(z0.shape, generator=g).to(z0.device, z0.dtype)
                xt = sched.add_noise(z0, noise, t)
                target = sched.get_velocity(z0, noise, t) if pred_type == "v_prediction" else noise
                pred = unet(xt, t, encoder_hidden_states=e0 + d).sample
                loss = loss + torch.mean((pred.float() - target.float()) ** 2)
            (grad,) = torch.autograd.grad(loss, d)
            with torch.no_grad():
                gn = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta = _project(delta - step * gn, radius)
    log.debug("optimized perturbation: final loss %.4f", float(loss.detach()) / timesteps_per_iter)
    return cond.with_embeds(e0 + delta)
