"""Triton Python-backend model: prompt (+ seed, steps, guidance) -> uint8 image, the whole Stable Diffusion pipeline.

Runs exporter.onnx_pipeline's ONNX Runtime pipeline (NumPy + onnxruntime + CLIPTokenizer, no torch), so it works
in the Python backend's own environment (numpy<2). The repository writer copies that module and the few it
imports into `vendor/` beside this file and the exported pipeline folder into `pipeline/`; config parameters
give the defaults (steps, guidance_scale, threads). One request = one prompt; Triton runs requests of one
instance in turn, more instances (instance_group count) serve requests in parallel.

A request's inputs are checked by `request_params` before anything runs: a non-finite or out-of-range value
(steps 0, seed -1, guidance NaN) is the client's mistake and is answered as INVALID_ARG (HTTP 400); only a
failure while generating is an INTERNAL error (HTTP 500).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [0, 1] (B, H, W, 3) -> uint8, rounding to nearest (the in-process reference does the same)."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


INPUTS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale")  # as declared in config.pbtxt
GUIDANCE_MAX = 100.0  # Stable Diffusion is used at 1-15; far beyond, the image is saturated noise
SEED_MAX = 2**63 - 1  # the input is INT64; NumPy's generator takes any seed >= 0


class BadRequest(ValueError):
    """A client's input the model refuses; answered as INVALID_ARG (HTTP 400), not as a server error."""


def request_params(values: Mapping[str, Any], default_steps: int, default_guidance: float,
                   max_steps: int = 1000) -> dict[str, Any]:
    """The pipeline's keyword arguments for one request's inputs (None or absent: the model's default).

    Pure (no Triton, no model), so it is unit-tested on its own. Raises BadRequest naming every bad input:
    text that is not UTF-8, steps outside [1, max_steps] (the scheduler's training timesteps), a seed < 0, a
    guidance scale that is not finite or outside [0, GUIDANCE_MAX].
    """
    problems: list[str] = []

    def text(name: str) -> str | None:
        v = values.get(name)
        if isinstance(v, bytes):
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{name} is not UTF-8 text")
                return None
        return None if v is None else str(v)

    def integer(v: Any) -> int | None:
        return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None

    prompt, negative = text("prompt"), text("negative_prompt")
    raw_steps = values.get("steps")
    steps = integer(default_steps if raw_steps is None else raw_steps)
    if steps is None or not 1 <= steps <= max_steps:
        problems.append(f"steps must be an integer in [1, {max_steps}], got {raw_steps!r}")
    raw_seed = values.get("seed")
    seed = None if raw_seed is None else integer(raw_seed)
    if raw_seed is not None and (seed is None or not 0 <= seed <= SEED_MAX):
        problems.append(f"seed must be an integer in [0, 2**63), got {raw_seed!r}")
    raw_g = values.get("guidance_scale")
    try:
        guidance = float(default_guidance if raw_g is None else raw_g)
    except (TypeError, ValueError):
        guidance = math.nan
    if not (math.isfinite(guidance) and 0.0 <= guidance <= GUIDANCE_MAX):
        problems.append(f"guidance_scale must be a finite number in [0, {GUIDANCE_MAX:g}], got {raw_g!r}")
    if problems:
        raise BadRequest("; ".join(problems))
    return {"prompt": prompt or "", "negative_prompt": negative or None, "num_inference_steps": steps,
            "guidance_scale": guidance, "seed": seed}


def triton_error(message: str, client: bool):
    """INVALID_ARG (HTTP 400) for the client's mistake, INTERNAL (HTTP 500) for ours. Python backends older
    than error codes (before 23.x) take the message only, and answer 500 either way."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if client else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _scalar(request, name: str) -> Any:
    """The first element of an optional input as a Python value (bytes stay bytes); None when not sent."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    v = t.as_numpy().reshape(-1)
    if v.size == 0:
        return None
    v = v[0]
    return v.item() if isinstance(v, np.generic) else v


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        sys.path.insert(0, str(version_dir / "vendor"))
        from exporter.onnx_pipeline import OnnxStableDiffusionPipeline

        threads = int(params.get("threads", "0")) or None
        providers = [p for p in params.get("providers", "CPUExecutionProvider").split(",") if p]
        self.steps = int(params.get("steps", "20"))
        self.guidance = float(params.get("guidance_scale", "7.5"))
        folder = version_dir / params.get("pipeline_subdir", "pipeline")
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.max_steps = int(sched.get("num_train_timesteps", 1000))
        self.pipe = OnnxStableDiffusionPipeline(folder, providers=providers, threads=threads)
        plan = params.get("unet_plan", "")
        if plan:  # the UNet through TensorRT; text encoder and VAE stay on ONNX Runtime
            from exporter.tensorrt_build import TensorRTRunner

            runner = TensorRTRunner(version_dir / plan, name="unet")
            runner.activate()
            self.pipe.runners["unet"].deactivate()
            self.pipe.runners["unet"] = runner

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                kwargs = request_params({name: _scalar(request, name) for name in INPUTS}, self.steps,
                                        self.guidance, self.max_steps)
            except BadRequest as e:
                responses.append(pb_utils.InferenceResponse(error=triton_error(f"bad request: {e}", client=True)))
                continue
            try:
                out = self.pipe(kwargs.pop("prompt"), **kwargs)
                image = to_uint8(out.images)[0]  # (H, W, 3)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("image", image)]))
            except Exception as e:  # one failed request must not take the model down: answer it with the error
                responses.append(pb_utils.InferenceResponse(error=triton_error(f"{type(e).__name__}: {e}",
                                                                                client=False)))
        return responses

    def finalize(self) -> None:
        self.pipe.close()
