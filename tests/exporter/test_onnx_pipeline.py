"""Whole-pipeline ONNX export: optimum's folder layout, NumPy schedulers, image parity with the torch pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.errors import ExportError
from exporter.onnx_export import OnnxExportOptions, export_pipeline
from exporter.onnx_pipeline import OnnxStableDiffusionPipeline, load_scheduler
from uniforget.geometries import tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
OPTIMUM_PY = REPO / ".venv-optimum" / "bin" / "python"
# max abs pixel difference (images in [0, 1]) between torch and ONNX Runtime, same latents, 4 DDIM steps
PIXEL_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    pipe = tiny_pipeline(seed=1)  # 16x16 images, DDIM
    assert len(pipe.tokenizer) > 500, "tokenizer files were ignored"
    res = export_pipeline(pipe, root / "onnx" / "pipeline", options=OnnxExportOptions(symbolic_shapes=False))
    return pipe, res


def test_layout_is_optimums(exported):
    _, res = exported
    f = res.folder
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                "text_encoder/model.onnx", "text_encoder/config.json", "unet/model.onnx", "unet/config.json",
                "vae_decoder/model.onnx", "vae_decoder/config.json"):
        assert (f / rel).is_file(), rel
    assert not [p for p in f.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"
    assert all(bool(r) for r in res.parity.values()), {k: r.summary() for k, r in res.parity.items()}
    assert res.components["unet"].path == f / "unet" / "model.onnx"


def _torch_images(pipe, prompts, latents, steps, guidance):
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
               output_type="np")
    return out.images


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_images_match_torch_pipeline(exported, guidance):
    pipe, res = exported
    prompts = ["the red circle", "a blue square on green"]
    lat = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    ref = _torch_images(pipe, prompts, lat, 4, guidance)
    ort_pipe = OnnxStableDiffusionPipeline(res.folder)
    got = ort_pipe(prompts, num_inference_steps=4, guidance_scale=guidance, latents=lat).images
    assert got.shape == ref.shape == (2, 16, 16, 3)
    diff = float(np.abs(got - ref).max())
    print(f"torch vs ONNX Runtime pipeline, guidance {guidance}: max abs pixel diff {diff:.3g}")
    assert diff <= PIXEL_ATOL, diff
    # the comparison can fail: a different prompt moves the image by far more than the tolerance
    other = ort_pipe(["something else entirely", "x"], num_inference_steps=4, guidance_scale=guidance,
                     latents=lat).images
    assert float(np.abs(other - ref).max()) > 10 * PIXEL_ATOL


def test_seeded_noise_is_deterministic(exported):
    _, res = exported
    p = OnnxStableDiffusionPipeline(res.folder)
    a = p("the circle", num_inference_steps=2, seed=5).images
    b = p("the circle", num_inference_steps=2, seed=5).images
    c = p("the circle", num_inference_steps=2, seed=6).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("cls,extra", [
    ("DDIMScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True)),
    ("DDIMScheduler", dict(timestep_spacing="linspace", clip_sample=True)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction")),
])
def test_numpy_schedulers_match_diffusers(tmp_path, cls, extra):
    import diffusers

    sched = getattr(diffusers, cls)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **extra)
    sched.save_pretrained(str(tmp_path))
    mine = load_scheduler(tmp_path)
    sched.set_timesteps(6)
    mine.set_timesteps(6)
    np.testing.assert_allclose(mine.timesteps.astype(np.float64), sched.timesteps.numpy().astype(np.float64))
    assert abs(mine.init_noise_sigma - float(sched.init_noise_sigma)) < 1e-4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 4, 4), dtype=np.float32)
    xt, xm = torch.from_numpy(x.copy()), x.copy()
    for t in sched.timesteps:
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        xm_in = mine.scale_model_input(xm, t.item())
        xt_in = sched.scale_model_input(xt, t)
        np.testing.assert_allclose(xm_in, xt_in.numpy(), atol=1e-5)
        xt = sched.step(torch.from_numpy(eps), t, xt).prev_sample
        xm = mine.step(eps, t.item(), xm)
    np.testing.assert_allclose(xm, xt.numpy(), atol=1e-4)


def test_unsupported_scheduler_is_refused(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    with pytest.raises(ExportError, match="PNDMScheduler"):
        load_scheduler(tmp_path)


def test_runtime_imports_neither_torch_nor_diffusers(exported):
    """The ONNX pipeline must run where only numpy, onnxruntime and transformers' tokenizer exist."""
    _, res = exported
    code = textwrap.dedent(f"""
        import sys
        sys.modules['torch'] = None; sys.modules['diffusers'] = None  # importing either now raises
        from exporter.onnx_pipeline import OnnxStableDiffusionPipeline
        out = OnnxStableDiffusionPipeline({str(res.folder)!r})('the circle', num_inference_steps=2, seed=0)
        assert out.images.shape == (1, 16, 16, 3)
        print('ok')
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(not OPTIMUM_PY.exists(), reason="no .venv-optimum (create it with scripts/setup_optimum_env.sh)")
def test_optimum_runs_our_folder(exported):
    """optimum's ORTStableDiffusionPipeline loads our folder and reproduces our ONNX pipeline's image."""
    _, res = exported
    lat = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.save(res.folder.parent / "lat.npy", lat)
    ours = OnnxStableDiffusionPipeline(res.folder)("the red circle", num_inference_steps=3, latents=lat).images
    code = textwrap.dedent(f"""
        import numpy as np, torch
        from optimum.onnxruntime import ORTStableDiffusionPipeline
        p = ORTStableDiffusionPipeline.from_pretrained({str(res.folder)!r}, export=False)
        lat = torch.from_numpy(np.load({str(res.folder.parent / 'lat.npy')!r}))
        img = p('the red circle', num_inference_steps=3, latents=lat, output_type='np').images
        np.save({str(res.folder.parent / 'optimum.npy')!r}, np.asarray(img, dtype=np.float32))
    """)
    r = subprocess.run([str(OPTIMUM_PY), "-c", code], capture_output=True, text=True, cwd=res.folder.parent,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = np.load(res.folder.parent / "optimum.npy")
    assert theirs.shape == ours.shape
    print(f"optimum vs ours: max abs pixel diff {float(np.abs(theirs - ours).max()):.3g}")
    assert float(np.abs(theirs - ours).max()) <= PIXEL_ATOL
