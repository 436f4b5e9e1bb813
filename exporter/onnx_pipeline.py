"""Prompt -> image with ONNX Runtime and NumPy only, from an exported pipeline folder (optimum's layout).

Why no torch or diffusers here: the same class runs inside a Triton Python-backend environment that
has numpy<2, onnxruntime and transformers' CLIPTokenizer only. So the schedulers' `set_timesteps` /
`step` are re-implemented in NumPy from `scheduler/scheduler_config.json`, following diffusers'
DDIMScheduler, EulerDiscreteScheduler and LCMScheduler for the options Stable Diffusion checkpoints use;
anything else is refused with a clear error rather than silently sampled differently.

LCM-style UNets (an ONNX `timestep_cond` input) get guidance as diffusers' LatentConsistencyModelPipeline
gives it: no classifier-free batch, a sinusoidal embedding of `guidance_scale - 1` fed as `timestep_cond`.

Folder layout (written by `exporter.onnx_export.export_pipeline`):
    model_index.json  scheduler/scheduler_config.json  tokenizer/
    text_encoder/model.onnx  unet/model.onnx (+ model.onnx_data)  vae_decoder/model.onnx  (+ config.json each)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError
from .runners import OnnxRuntimeRunner

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- schedulers

def _betas(cfg: dict[str, Any]) -> np.ndarray:
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
    else:
        kind = cfg.get("beta_schedule", "linear")
        b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if kind == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float32)
        elif kind == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            def abar(t: float) -> float:
                return float(np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2)
            betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=np.float32)
        else:
            raise ExportError(f"scheduler beta_schedule {kind!r} is not supported by the NumPy pipeline "
                              "(linear, scaled_linear, squaredcos_cap_v2)")
    if cfg.get("rescale_betas_zero_snr"):
        abar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
        first, last = abar_sqrt[0], abar_sqrt[-1]
        abar_sqrt = (abar_sqrt - last) * first / (first - last)
        abar = abar_sqrt**2
        betas = (1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])).astype(np.float32)
    return betas


def _spaced(cfg: dict[str, Any], steps: int) -> np.ndarray:
    """Inference timesteps (descending, float) for diffusers' `timestep_spacing` options."""
    n = int(cfg.get("num_train_timesteps", 1000))
    spacing = cfg.get("timestep_spacing", "leading")
    if steps < 1 or steps > n:
        raise ExportError(f"num_inference_steps must be in 1..{n}, got {steps}")
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + int(cfg.get("steps_offset", 0))
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(np.float64) - 1
    raise ExportError(f"scheduler timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")


def _predicted_x0(cfg: dict[str, Any], prediction: str, out: np.ndarray, sample: np.ndarray,
                  a_t: np.floating, scheduler: str) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from the UNet's output for each prediction type, x0 clipped as diffusers' `clip_sample` says.

    Shared by the DDIM and LCM steps, which differ only in what they do with x0 afterwards.
    """
    b_t = 1 - a_t
    if prediction == "epsilon":
        x0, eps = (sample - b_t**0.5 * out) / a_t**0.5, out
    elif prediction == "sample":
        x0 = out
        eps = (sample - a_t**0.5 * x0) / b_t**0.5
    elif prediction == "v_prediction":
        x0 = a_t**0.5 * sample - b_t**0.5 * out
        eps = a_t**0.5 * out + b_t**0.5 * sample
    else:
        raise ExportError(f"{scheduler} prediction_type {prediction!r} is not supported")
    if cfg.get("clip_sample", False):
        r = float(cfg.get("clip_sample_range", 1.0))
        x0 = np.clip(x0, -r, r)
    return x0, eps


class NumpyDDIM:
    """diffusers' DDIMScheduler (eta=0 deterministic; eta>0 adds NumPy noise) for epsilon/v/sample prediction."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        if cfg.get("thresholding"):
            raise ExportError("DDIM with thresholding=True is not supported by the NumPy pipeline")
        self.cfg = cfg
        self.n_train = int(cfg.get("num_train_timesteps", 1000))
        self.alphas_cumprod = np.cumprod(1.0 - _betas(cfg), dtype=np.float32)
        self.final_alpha = np.float32(1.0) if cfg.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.prediction = cfg.get("prediction_type", "epsilon")
        self.timesteps = np.zeros(0)
        self.steps = 0

    def set_timesteps(self, steps: int) -> None:
        ts = _spaced(self.cfg, steps)
        if self.cfg.get("timestep_spacing", "leading") == "linspace":
            ts = ts.round()
        self.timesteps = ts.astype(np.int64)
        self.steps = steps

    def scale_model_input(self, sample: np.ndarray, t: Any) -> np.ndarray:
        return sample

    def step(self, out: np.ndarray, t: Any, sample: np.ndarray, eta: float = 0.0,
             rng: np.random.Generator | None = None) -> np.ndarray:
        t = int(t)
        prev = t - self.n_train // self.steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        x0, eps = _predicted_x0(self.cfg, self.prediction, out, sample, a_t, "DDIM")
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var**0.5
        prev_sample = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            rng = rng or np.random.default_rng()
            prev_sample = prev_sample + std * rng.standard_normal(sample.shape).astype(sample.dtype)
        return prev_sample.astype(sample.dtype)


class NumpyEuler:
    """diffusers' EulerDiscreteScheduler with its defaults (no churn, linear sigma interpolation, zero final sigma)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        for opt in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if cfg.get(opt):
                raise ExportError(f"Euler scheduler option {opt}=True is not supported by the NumPy pipeline")
        if cfg.get("interpolation_type", "linear") != "linear" or cfg.get("final_sigmas_type", "zero") != "zero":
            raise ExportError("Euler scheduler: only interpolation_type=linear and final_sigmas_type=zero are supported")
        self.cfg = cfg
        ac = np.cumprod(1.0 - _betas(cfg), dtype=np.float32)
        self.train_sigmas = (((1 - ac) / ac) ** 0.5).astype(np.float32)
        self.prediction = cfg.get("prediction_type", "epsilon")
        self.timesteps = np.zeros(0)
        self.sigmas = np.zeros(0)
        self.init_noise_sigma = 1.0
        self._i = 0

    def set_timesteps(self, steps: int) -> None:
        ts = _spaced(self.cfg, steps).astype(np.float32)
        sig = np.interp(ts, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self.sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
        self.timesteps = ts
        smax = float(self.sigmas.max())
        spacing = self.cfg.get("timestep_spacing", "leading")
        self.init_noise_sigma = smax if spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
        self._i = 0

    def _index(self, t: Any) -> int:
        return int(np.nonzero(self.timesteps == np.float32(t))[0][0])

    def scale_model_input(self, sample: np.ndarray, t: Any) -> np.ndarray:
        s = self.sigmas[self._index(t)]
        return (sample / ((s**2 + 1) ** 0.5)).astype(sample.dtype)

    def step(self, out: np.ndarray, t: Any, sample: np.ndarray, eta: float = 0.0,
             rng: np.random.Generator | None = None) -> np.ndarray:
        i = self._index(t)
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        if self.prediction == "epsilon":
            x0 = sample - s * out
        elif self.prediction == "v_prediction":
            x0 = out * (-s / (s**2 + 1) ** 0.5) + sample / (s**2 + 1)
        else:
            raise ExportError(f"Euler prediction_type {self.prediction!r} is not supported")
        return (sample + (sample - x0) / s * (s_next - s)).astype(sample.dtype)


class NumpyLCM:
    """diffusers' LCMScheduler: a consistency step to the denoised sample, re-noised to the next timestep.

    The noise between steps comes from the pipeline's NumPy generator (diffusers draws it from torch's), so
    runs agree with diffusers exactly for one step and for several when fed the same noise.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        if cfg.get("thresholding"):
            raise ExportError("LCM with thresholding=True is not supported by the NumPy pipeline")
        self.cfg = cfg
        self.n_train = int(cfg.get("num_train_timesteps", 1000))
        self.alphas_cumprod = np.cumprod(1.0 - _betas(cfg), dtype=np.float32)
        self.final_alpha = np.float32(1.0) if cfg.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.original_steps = int(cfg.get("original_inference_steps", 50))
        self.timestep_scaling = float(cfg.get("timestep_scaling", 10.0))
        self.prediction = cfg.get("prediction_type", "epsilon")
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.steps = 0

    def set_timesteps(self, steps: int) -> None:
        if not 1 <= steps <= min(self.original_steps, self.n_train):
            raise ExportError(f"LCM num_inference_steps must be in 1..{self.original_steps} "
                              f"(original_inference_steps), got {steps}")
        k = self.n_train // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]  # the distillation schedule, descending
        idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[idx].astype(np.int64)
        self.steps = steps

    def scale_model_input(self, sample: np.ndarray, t: Any) -> np.ndarray:
        return sample

    def step(self, out: np.ndarray, t: Any, sample: np.ndarray, eta: float = 0.0,
             rng: np.random.Generator | None = None) -> np.ndarray:
        t = int(t)
        i = int(np.nonzero(self.timesteps == t)[0][0])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha
        b_prev = 1 - a_prev
        scaled = t * self.timestep_scaling  # boundary-condition scalings, sigma_data = 0.5
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        x0, _ = _predicted_x0(self.cfg, self.prediction, out, sample, a_t, "LCM")
        denoised = (c_out * x0 + c_skip * sample).astype(sample.dtype)
        if i == self.steps - 1:
            return denoised
        rng = rng or np.random.default_rng()
        noise = rng.standard_normal(sample.shape, dtype=np.float32)
        return (a_prev**0.5 * denoised + b_prev**0.5 * noise).astype(sample.dtype)


def guidance_scale_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """(B, dim) float32 sinusoidal embedding of w * 1000: the `timestep_cond` diffusers' LCM pipeline builds.

    That pipeline passes w = guidance_scale - 1 (Imagen's CFG convention). float32 like torch; the two
    libraries' sin/exp differ by an ulp, which at w * 1000 ~ 1e4 is ~5e-4 in an entry.
    """
    w = np.asarray(w, dtype=np.float32).reshape(-1) * np.float32(1000.0)
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / np.float32(half - 1)))
    emb = w[:, None] * freq[None, :].astype(np.float32)
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


SCHEDULERS = {"DDIMScheduler": NumpyDDIM, "EulerDiscreteScheduler": NumpyEuler, "LCMScheduler": NumpyLCM}


def load_scheduler(folder: str | os.PathLike) -> NumpyDDIM | NumpyEuler | NumpyLCM:
    """NumPy scheduler from a diffusers scheduler folder (scheduler_config.json)."""
    f = Path(folder) / "scheduler_config.json"
    if not f.is_file():
        raise ExportError(f"no scheduler config at {f}")
    cfg = json.loads(f.read_text())
    cls = SCHEDULERS.get(cfg.get("_class_name", ""))
    if cls is None:
        raise ExportError(f"scheduler {cfg.get('_class_name')!r} is not supported by the NumPy pipeline "
                          f"(supported: {', '.join(SCHEDULERS)}); re-export with one of these")
    return cls(cfg)


# ---------------------------------------------------------------------------------------------- pipeline

@dataclass(frozen=True)
class PipelineOutput:
    """Images as float32 (B, H, W, 3) in [0, 1], and the final latents (B, C, h, w) before decoding."""

    images: np.ndarray
    latents: np.ndarray


class OnnxStableDiffusionPipeline:
    """Text-to-image Stable Diffusion on ONNX Runtime; mirrors diffusers' StableDiffusionPipeline call.

    A folder with text_encoder_2/ is SDXL, sampled like StableDiffusionXLPipeline: both encoders' penultimate
    hidden states side by side, the second's text_embeds and the size/crop `time_ids` as added conditioning,
    and zero negative embeddings when no negative prompt is given (`force_zeros_for_empty_prompt`).
    """

    def __init__(self, folder: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None) -> None:
        self.folder = Path(folder)
        for part in ("text_encoder", "unet", "vae_decoder"):
            if not (self.folder / part / "model.onnx").is_file():
                raise ExportError(f"{self.folder} is not an exported ONNX pipeline (missing {part}/model.onnx)")
        try:
            from transformers import CLIPTokenizer
        except ImportError as e:
            raise ExportError("the ONNX pipeline needs transformers' CLIPTokenizer: pip install transformers") from e
        self.tokenizer = CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer"))
        self.sdxl = (self.folder / "text_encoder_2" / "model.onnx").is_file()
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer_2")) if self.sdxl else None
        index = self.folder / "model_index.json"
        meta = json.loads(index.read_text()) if index.is_file() else {}
        self.force_zeros_for_empty_prompt = bool(meta.get("force_zeros_for_empty_prompt", True))
        self.scheduler = load_scheduler(self.folder / "scheduler")
        self.vae_config = json.loads((self.folder / "vae_decoder" / "config.json").read_text())
        self.unet_config = json.loads((self.folder / "unet" / "config.json").read_text())
        self.scaling_factor = float(self.vae_config.get("scaling_factor", 0.18215))
        self.vae_scale = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        parts = ("text_encoder", "unet", "vae_decoder") + (("text_encoder_2",) if self.sdxl else ())
        self.runners = {p: OnnxRuntimeRunner(self.folder / p / "model.onnx", providers, threads, name=p)
                        for p in parts}
        for r in self.runners.values():
            r.activate()
        unet_inputs = set(self.runners["unet"].input_types)
        base = {"sample", "timestep", "encoder_hidden_states"} | ({"text_embeds", "time_ids"} if self.sdxl else set())
        if unet_inputs not in (base, base | {"timestep_cond"}):
            raise ExportError(f"unet/model.onnx has inputs {sorted(unet_inputs)}: only SD1.x/2.x/SDXL-style text-to-image "
                              "UNets (optionally LCM-style, with timestep_cond) are supported by the ONNX pipeline")
        # LCM-style: guidance enters as an embedding of the scale, not as a classifier-free batch
        self.guidance_embedding_dim = (int(self.unet_config.get("time_cond_proj_dim") or 0)
                                       if "timestep_cond" in unet_inputs else 0)
        if "timestep_cond" in unet_inputs and not self.guidance_embedding_dim:
            raise ExportError("unet/model.onnx takes timestep_cond but unet/config.json has no time_cond_proj_dim")

    def close(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        """CLIP last hidden state, (B, 77, D) float32; prompts padded/truncated like diffusers."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        return self.runners["text_encoder"].infer({"input_ids": ids.astype(np.int64)})["last_hidden_state"]

    def encode_prompt_sdxl(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """SDXL: (B, 77, D1 + D2) penultimate hidden states of both encoders, and (B, P) pooled text_embeds."""
        states, pooled = [], None
        for name, tok in (("text_encoder", self.tokenizer), ("text_encoder_2", self.tokenizer_2)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="np").input_ids
            out = self.runners[name].infer({"input_ids": ids.astype(np.int64)})
            states.append(out["penultimate_hidden_state"])
            pooled = out.get("text_embeds", pooled)
        if pooled is None:
            raise ExportError("text_encoder_2/model.onnx has no text_embeds output (SDXL's pooled projection)")
        return np.concatenate(states, axis=-1), pooled

    def __call__(self, prompt: str | list[str], num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 seed: int | None = None, latents: np.ndarray | None = None, eta: float = 0.0) -> PipelineOutput:
        """Generate; `latents` (B, C, h, w) overrides the seeded NumPy noise (for exact comparisons)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        cfg_on = guidance_scale > 1.0 and not self.guidance_embedding_dim
        extra: dict[str, np.ndarray] = {}
        if self.guidance_embedding_dim:
            extra["timestep_cond"] = guidance_scale_embedding(np.full(b, guidance_scale - 1.0, dtype=np.float32),
                                                              self.guidance_embedding_dim)
        neg = [""] * b if negative_prompt is None else (
            [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt))
        if cfg_on and len(neg) != b:
            raise ExportError(f"{len(neg)} negative prompts for {b} prompts")
        sample_size = int(self.unet_config.get("sample_size", 64))
        height_px, width_px = height or sample_size * self.vae_scale, width or sample_size * self.vae_scale
        h, w = height_px // self.vae_scale, width_px // self.vae_scale
        if self.sdxl:
            emb, pooled = self.encode_prompt_sdxl(prompts)
            if cfg_on:
                if negative_prompt is None and self.force_zeros_for_empty_prompt:
                    neg_emb, neg_pooled = np.zeros_like(emb), np.zeros_like(pooled)
                else:
                    neg_emb, neg_pooled = self.encode_prompt_sdxl(neg)
                emb, pooled = np.concatenate([neg_emb, emb]), np.concatenate([neg_pooled, pooled])
            # (original size, crop top-left, target size) in pixels, as diffusers' default _get_add_time_ids
            time_ids = np.array([[height_px, width_px, 0, 0, height_px, width_px]], dtype=np.float32)
            extra.update(text_embeds=pooled.astype(np.float32), time_ids=np.repeat(time_ids, len(emb), axis=0))
        else:
            emb = self.encode_prompt(prompts)
            if cfg_on:
                emb = np.concatenate([self.encode_prompt(neg), emb])
        shape = (b, int(self.unet_config.get("in_channels", 4)), h, w)
        rng = np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif tuple(latents.shape) != shape:
            raise ExportError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps)
        x = (np.asarray(latents, dtype=np.float32) * sched.init_noise_sigma).astype(np.float32)
        for t in sched.timesteps:
            xin = np.concatenate([x, x]) if cfg_on else x
            xin = sched.scale_model_input(xin, t)
            eps = self.runners["unet"].infer({"sample": xin, "timestep": np.array([t], dtype=np.float32),
                                              "encoder_hidden_states": emb, **extra})["out_sample"]
            if cfg_on:
                eps_u, eps_c = np.split(eps, 2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = sched.step(eps, t, x, eta=eta, rng=rng)
        img = self.runners["vae_decoder"].infer({"latent_sample": x / self.scaling_factor})["sample"]
        img = np.clip(img / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)
        return PipelineOutput(images=img, latents=x)
