"""Fixtures for the one-shot, report and benchmark tests: a tiny random Stable Diffusion pipeline saved as a
diffusers folder (the same loader path as a user's model), a random MaskSet for it, and evaluation data whose
planted items are the pipeline's own generations (so the original model copies them exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uniforget.geometries import tiny_pipeline

CAPTIONS = ("the zorblax mascot", "quillon emblem")
NEUTRAL = ("a red circle", "a blue square", "a green star")
SHAPES = ("circle", "square", "star")
COLOURS = ("red", "blue", "green")
EVAL_STEPS = 2
EVAL_GUIDANCE = 3.0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny pipeline folder (model_index.json + components, safetensors)."""
    work = tmp_path_factory.mktemp("tiny_model")
    pipe = tiny_pipeline(image_size=32, text_len=16)
    folder = work / "pipeline"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from uniforget.models import load_pipeline

    return load_pipeline(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tiny_masks(tiny_model_dir, tiny_pipe, tmp_path_factory) -> Path:
    """Random gate logits for the tiny UNet (some closed, most open), saved as a MaskSet file."""
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.targets import discover_targets

    g = torch.Generator().manual_seed(3)
    logits = {t.key: torch.randn(t.size, generator=g) * 2 + 1 for t in discover_targets(tiny_pipe.unet)}
    ms = MaskSet(logits=logits, model_fingerprint=model_fingerprint(tiny_pipe.unet), meta={"beta": "test"})
    return ms.save(tmp_path_factory.mktemp("masks") / "masks.safetensors")


@pytest.fixture(scope="session")
def tiny_eval_data(tiny_pipe, planted_eval_data):
    return planted_eval_data(tiny_pipe, CAPTIONS, NEUTRAL, SHAPES, COLOURS, EVAL_STEPS, EVAL_GUIDANCE)


@pytest.fixture(scope="session")
def fast_size():
    """Validation sized for seconds: 1 seed, 2 sampler steps, 2 neutral prompts, one perturbation."""
    from exporter.oneshot import ValidationSize

    return ValidationSize(seeds=1, neutral_prompts=2, neutral_seeds=1, perturb_norms=(0.1,), optimized_norm=None,
                          empty_seeds=4, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE, batch_size=8, bench_runs=20,
                          bench_batch=1)


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory) -> Path:
    """A tiny SD1-geometry UNet exported to ONNX (the Triton repository tests copy it into every model slot)."""
    from exporter.onnx_export import OnnxExportOptions, export_unet
    from uniforget.geometries import TINY, build_unet

    path = tmp_path_factory.mktemp("unet") / "unet.onnx"
    export_unet(build_unet(TINY["sd1"]), path, OnnxExportOptions(fold_constants=False))
    return path


@pytest.fixture()
def pipeline_dir(tmp_path, unet_onnx) -> Path:
    """A folder in the exported pipeline's layout (the writer copies it; the e2e test runs a real one)."""
    import shutil

    d = tmp_path / "pipe"
    for part in ("text_encoder", "unet", "vae_decoder"):
        (d / part).mkdir(parents=True)
        shutil.copy(unet_onnx, d / part / "model.onnx")
    (d / "tokenizer").mkdir()
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    return d
