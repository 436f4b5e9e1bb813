"""Wen et al. (ICLR 2024) text-conditional noise norm: a memorization score that needs only the UNet.

Per generation: d = mean over sampler steps of || eps(x_t, c) - eps(x_t, empty) ||_2 along the sampling
trajectory (norm over the whole latent, C x h x w); per prompt: mean of d over seeds. Memorized prompts
score far higher. We read both predictions from the pipeline's own classifier-free-guidance pass (it calls
the UNet on [empty; prompt] in one batch), through a forward hook, so it works for any diffusers pipeline
that uses guidance and costs nothing beyond generation. Needs guidance > 1 (otherwise no empty-prompt pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import UniforgetError
from .generate import Conditioning, Gates, generate


class NoiseNormRecorder:
    """Hooks the UNet; per generated image, the mean over steps of the text-conditional noise norm.

    Use as a context manager and pass it to `generate(..., observer=rec)`; read `rec.norms` afterwards
    ((N,) in generation order).
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._steps: list[torch.Tensor] = []
        self._batch = 0
        self._done: list[np.ndarray] = []
        self._handle: Any = None

    def __enter__(self) -> NoiseNormRecorder:
        self._handle = self.unet.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, _m: Any, _inp: Any, out: Any) -> None:
        if not self._batch:
            return  # a UNet call outside a generation batch (e.g. a warm-up) is not ours
        eps = out[0] if isinstance(out, tuple) else out.sample
        if eps.shape[0] != 2 * self._batch:
            raise UniforgetError(f"UNet batch {eps.shape[0]} is not [empty; prompt] x {self._batch}: the noise norm "
                                 "needs classifier-free guidance (guidance > 1)")
        uncond, cond = eps.detach().float().chunk(2)  # diffusers order: negative first, then the prompt
        self._steps.append((cond - uncond).flatten(1).norm(dim=1).cpu())  # (B,)

    def begin_batch(self, n: int) -> None:
        self._batch = n
        self._steps = []

    def end_batch(self) -> None:
        if not self._steps:
            raise UniforgetError("no UNet call was recorded during generation")
        self._done.append(torch.stack(self._steps).mean(dim=0).numpy())  # (steps, B) -> (B,)
        self._batch = 0
        self._steps = []

    @property
    def norms(self) -> np.ndarray:
        return np.concatenate(self._done) if self._done else np.zeros(0)


def per_prompt(norms: np.ndarray, n_seeds: int) -> np.ndarray:
    """(P * S,) prompt-major per-image scores -> (P,) mean over seeds."""
    return np.asarray(norms, np.float64).reshape(-1, n_seeds).mean(axis=1)


def noise_norms(pipe: Any, prompts: Sequence[str] | None, seeds: Sequence[int], steps: int = 20,
                guidance: float = 5.0, gates: Gates = None, prompt_embeds: Conditioning | None = None,
                **gen_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(per-prompt Wen scores (P,), the generated images) for prompts x seeds."""
    if guidance <= 1.0:
        raise UniforgetError(f"Wen's noise norm needs classifier-free guidance (guidance > 1), got {guidance}")
    with NoiseNormRecorder(pipe.unet) as rec:
        images = generate(pipe, prompts, seeds, steps, guidance, gates, prompt_embeds, observer=rec, **gen_kwargs)
    return per_prompt(rec.norms, len(list(seeds))), images
