"""The differentiable sampler F(z0, N, c) of UniForget's objective: N scheduler steps, gradients through all.

Mask learning compares the gated model's *final* latent with the original's from the same starting noise
z0, so the loss sees what the model actually generates rather than one denoising step. This module runs
the pipeline's own scheduler (DDIM, Euler, DPM-Solver, ... anything with `set_timesteps` / `step`) for N
steps with classifier-free guidance exactly as diffusers pipelines do at inference:

    latents = z0 * init_noise_sigma
    for t in timesteps:                                  # N steps
        eps_u, eps_c = unet(scale(cat[latents, latents]), t, cat[uncond, cond]).chunk(2)
        eps = eps_u + g * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents)

Activation memory grows with N; `checkpointing="step"` recomputes each UNet call in the backward pass
(torch.utils.checkpoint per sampler step) and `"unet"` uses diffusers' block-level checkpointing.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .configs import (
    CHECKPOINTING as CHECKPOINTING,  # re-exported
    SamplerConfig as SamplerConfig,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    """Precomputed text conditioning for a batch of prompts (frozen text encoder, computed once).

    `cond` / `uncond`: (B, T, D) encoder hidden states; `added` / `added_uncond`: SDXL's
    `added_cond_kwargs` (text_embeds, time_ids) per branch, empty for SD1.x/2.x.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    added_uncond: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def select(self, idx: torch.Tensor | list[int]) -> Conditioning:
        """The rows `idx` (a batch of prompts), on the same device."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.cond.device)
        pick = {k: v.index_select(0, idx.to(v.device)) for k, v in self.added.items()}
        pick_u = {k: v.index_select(0, idx.to(v.device)) for k, v in self.added_uncond.items()}
        uncond = None if self.uncond is None else self.uncond.index_select(0, idx)
        return Conditioning(self.cond.index_select(0, idx), uncond, pick, pick_u)

    def to(self, device: torch.device | str) -> Conditioning:
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        uncond = None if self.uncond is None else self.uncond.to(device)
        return Conditioning(self.cond.to(device), uncond, mv(self.added), mv(self.added_uncond))


def fresh_scheduler(template: Any) -> Any:
    """A new scheduler with the template's config: schedulers keep per-run state (step index, history)."""
    return template.__class__.from_config(template.config)


def latent_shape(unet: Any, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """(B, C, h, w) of the UNet's latents; h, w default to the UNet's `sample_size`."""
    s = unet.config.sample_size
    s = (s, s) if isinstance(s, int) else tuple(s)
    return (batch, int(unet.config.in_channels), int(height or s[0]), int(width or s[1]))


def _step_kwargs(scheduler: Any, eta: float, generator: torch.Generator | None) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kw: dict[str, Any] = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params and generator is not None:
        kw["generator"] = generator
    return kw


def _model_input(latents: torch.Tensor, cond: Conditioning, guided: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     dict[str, torch.Tensor] | None]:
    if guided:
        ehs = torch.cat([cond.uncond, cond.cond])  # (2B, T, D): unconditional first, as diffusers does
        added = {k: torch.cat([cond.added_uncond[k], v]) for k, v in cond.added.items()}
        x = torch.cat([latents, latents])
    else:
        ehs, added, x = cond.cond, dict(cond.added), latents
    return x, ehs, (added or None)


def sample(unet: Any, scheduler: Any, z0: torch.Tensor, cond: Conditioning,
           cfg: SamplerConfig = SamplerConfig(), generator: torch.Generator | None = None) -> torch.Tensor:
    """Run N scheduler steps from noise `z0` (B, C, h, w) and return the final latents (B, C, h, w).

    Differentiable end to end: call under `torch.no_grad()` for the frozen original's latents. With
    checkpointing, call `backward()` while the gate hooks are still attached: the backward pass re-runs
    the UNet, and without the hooks it would recompute the ungated model.
    `scheduler` is a template; a fresh copy runs, so the caller's scheduler is never mutated.
    """
    if z0.shape[0] != len(cond):
        raise ValueError(f"z0 batch {z0.shape[0]} != conditioning batch {len(cond)}")
    guided = cfg.uses_guidance
    if guided and cond.uncond is None:
        raise ValueError("guidance_scale > 1 needs unconditional embeddings (Conditioning.uncond)")
    sched = fresh_scheduler(scheduler)
    sched.set_timesteps(cfg.steps, device=z0.device)
    step_kw = _step_kwargs(sched, cfg.eta, generator)
    use_unet_ckpt = cfg.checkpointing == "unet" and torch.is_grad_enabled()
    prev_unet_ckpt = bool(getattr(unet, "is_gradient_checkpointing", False))
    if use_unet_ckpt:
        unet.enable_gradient_checkpointing()
    try:
        latents = z0 * sched.init_noise_sigma
        for t in sched.timesteps:
            x, ehs, added = _model_input(latents, cond, guided)
            x = sched.scale_model_input(x, t)

            def eps_fn(x: torch.Tensor, ehs: torch.Tensor, t: torch.Tensor = t,
                       added: dict[str, torch.Tensor] | None = added) -> torch.Tensor:
                return unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0]

            if cfg.checkpointing == "step" and torch.is_grad_enabled():
                eps = checkpoint(eps_fn, x, ehs, use_reentrant=False)
            else:
                eps = eps_fn(x, ehs)
            if guided:
                eps_u, eps_c = eps.chunk(2)  # (B, C, h, w) each
                eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
            latents = sched.step(eps, t, latents, **step_kw, return_dict=False)[0]
    finally:
        if use_unet_ckpt and not prev_unet_ckpt:
            unet.disable_gradient_checkpointing()
    return latents


def encode_prompts(pipe: Any, prompts: list[str], device: torch.device | str = "cpu",
                   height: int | None = None, width: int | None = None) -> Conditioning:
    """Encode prompts and the pipeline's default negative with its own frozen text encoder(s).

    Uses the pipeline's `encode_prompt`, so clip-skip, SD2's penultimate layer and SDXL's two encoders
    behave as at inference. SDXL additionally gets its pooled embeddings and time ids.
    """
    with torch.no_grad():  # negative_prompt None: the pipeline's own choice ("" for SD1/2, zeros for SDXL)
        out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=None)
    if len(out) == 2:  # SD1.x / SD2.x
        cond, uncond = out
        return Conditioning(cond.float(), uncond.float())
    cond, uncond, pooled, pooled_u = out[:4]  # SDXL
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h = (height or pipe.unet.config.sample_size) * vae_scale
    w = (width or pipe.unet.config.sample_size) * vae_scale
    enc2 = getattr(pipe, "text_encoder_2", None)
    proj_dim = int(enc2.config.projection_dim) if enc2 is not None else int(pooled.shape[-1])
    time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=torch.float32,
                                      text_encoder_projection_dim=proj_dim).to(device)
    time_ids = time_ids.repeat(len(prompts), 1)
    return Conditioning(cond.float(), uncond.float(),
                        {"text_embeds": pooled.float(), "time_ids": time_ids},
                        {"text_embeds": pooled_u.float(), "time_ids": time_ids})
