"""Triton Python-backend model: prompt (+ seed, steps, guidance) -> uint8 image, the whole Stable Diffusion pipeline.

Runs exporter.onnx_pipeline's ONNX Runtime pipeline (NumPy + onnxruntime + CLIPTokenizer, no torch), so it works
in the Python backend's own environment (numpy<2). The repository writer copies that module and the few it
imports into `vendor/` beside this file and the exported pipeline folder into `pipeline/`; config parameters
give the defaults (steps, guidance_scale, threads). One request = one prompt; Triton runs requests of one
instance in turn, more instances (instance_group count) serve requests in parallel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [0, 1] (B, H, W, 3) -> uint8, rounding to nearest (the in-process reference does the same)."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _scalar(request, name: str, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    v = t.as_numpy().reshape(-1)
    if v.size == 0:
        return default
    v = v[0]
    return v.decode("utf-8") if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v


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
        self.pipe = OnnxStableDiffusionPipeline(version_dir / params.get("pipeline_subdir", "pipeline"),
                                                providers=providers, threads=threads)
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
                prompt = _scalar(request, "prompt", "")
                negative = _scalar(request, "negative_prompt", None)
                seed = _scalar(request, "seed", None)
                steps = int(_scalar(request, "steps", self.steps))
                guidance = float(_scalar(request, "guidance_scale", self.guidance))
                out = self.pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                negative_prompt=negative or None, seed=None if seed is None else int(seed))
                image = to_uint8(out.images)[0]  # (H, W, 3)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("image", image)]))
            except Exception as e:  # one bad request must not take the model down: answer it with the error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses

    def finalize(self) -> None:
        self.pipe.close()
