"""The differentiable sampler equals the pipeline's own inference loop and carries gradients through all N steps."""

from __future__ import annotations

import pytest
import torch

from uniforget.gates import GateConfig
from uniforget.gating import attach_gates
from uniforget.geometries import TINY, build_unet, example_inputs, tiny_pipeline
from uniforget.learn import GateParams
from uniforget.sampler import Conditioning, SamplerConfig, encode_prompts, sample
from uniforget.targets import discover_targets


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


PROMPTS = ["a red circle", "blue square on grey", "green triangle"]


def _scheduler(pipe, name):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    return cls.from_config(pipe.scheduler.config)


@pytest.mark.parametrize("sched_name", ["ddim", "euler", "dpm"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_matches_pipeline_inference(pipe, sched_name, guidance):
    """F(z0, N, c) is exactly what the pipeline itself generates (output_type='latent') from the same z0."""
    pipe.scheduler = _scheduler(pipe, sched_name)
    z0 = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe(PROMPTS, height=64, width=64, num_inference_steps=4, guidance_scale=guidance,
                        latents=z0.clone(), output_type="latent").images
        cond = encode_prompts(pipe, PROMPTS)
        got = sample(pipe.unet, pipe.scheduler, z0, cond, SamplerConfig(steps=4, guidance_scale=guidance))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_template_scheduler_untouched(pipe):
    pipe.scheduler = _scheduler(pipe, "dpm")
    before = pipe.scheduler.timesteps
    cond = encode_prompts(pipe, PROMPTS[:1])
    with torch.no_grad():
        sample(pipe.unet, pipe.scheduler, torch.randn(1, 4, 8, 8), cond, SamplerConfig(steps=3))
    assert pipe.scheduler.timesteps is before


def _gate_grads(unet, cond, z0, cfg):
    gp = GateParams(discover_targets(unet, ["ffn"]), GateConfig())
    for p in gp.params.values():
        p.data.fill_(0.5)  # inside the active region, where reconstruction gradients exist
    with attach_gates(unet, gp.sources()):
        out = sample(unet, _ddim(), z0, cond, cfg)
        out.pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in gp.params.items()}, out.detach()


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("mode", ["step", "unet"])
def test_checkpointing_same_values_and_gradients(pipe, mode):
    cond = encode_prompts(pipe, PROMPTS[:2])
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    g_ref, out_ref = _gate_grads(pipe.unet, cond, z0, SamplerConfig(steps=3, guidance_scale=3.0))
    g_ck, out_ck = _gate_grads(pipe.unet, cond, z0, SamplerConfig(steps=3, guidance_scale=3.0, checkpointing=mode))
    torch.testing.assert_close(out_ck, out_ref, rtol=0, atol=1e-6)
    for k in g_ref:
        assert torch.count_nonzero(g_ref[k]) > 0
        torch.testing.assert_close(g_ck[k], g_ref[k], rtol=1e-4, atol=1e-9)
    assert not pipe.unet.is_gradient_checkpointing


def test_gradient_flows_through_every_step(pipe):
    """Gates that act only at the first of N steps still get a gradient from the final latent."""
    cond = encode_prompts(pipe, PROMPTS[:2])
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    t = discover_targets(pipe.unet, ["ffn"])[0]
    m = torch.nn.Parameter(torch.full((t.size,), 0.5))
    calls = {"n": 0}

    def first_step_only():
        calls["n"] += 1
        return m if calls["n"] == 1 else torch.ones_like(m).detach()

    with attach_gates(pipe.unet, {t.key: first_step_only}):
        out = sample(pipe.unet, _ddim(), z0, cond, SamplerConfig(steps=4, guidance_scale=1.0))
    out.sum().backward()
    assert calls["n"] == 4 and torch.count_nonzero(m.grad) > 0


def test_sdxl_geometry_runs_with_added_conditioning():
    unet = build_unet(TINY["sdxl"], seed=0)
    ex = example_inputs(unet, batch=2, seed=1)
    cond = Conditioning(ex["encoder_hidden_states"], torch.zeros_like(ex["encoder_hidden_states"]),
                        dict(ex["added_cond_kwargs"]), {k: torch.zeros_like(v) for k, v in ex["added_cond_kwargs"].items()})
    z0 = torch.randn(2, 4, 8, 8)
    out = sample(unet, _ddim(), z0, cond, SamplerConfig(steps=2, guidance_scale=4.0))
    assert out.shape == z0.shape and torch.isfinite(out).all()
    assert len(cond.select([1])) == 1


def test_bad_inputs_are_refused(pipe):
    cond = encode_prompts(pipe, PROMPTS[:2])
    with pytest.raises(ValueError, match="batch"):
        sample(pipe.unet, _ddim(), torch.randn(3, 4, 8, 8), cond)
    with pytest.raises(ValueError, match="unconditional"):
        sample(pipe.unet, _ddim(), torch.randn(2, 4, 8, 8), Conditioning(cond.cond), SamplerConfig(guidance_scale=3))
    with pytest.raises(ValueError):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError):
        SamplerConfig(checkpointing="sometimes")


def test_sdxl_pipeline_matches_inference():
    """SDXL: two text encoders, pooled embeddings, time ids and zeroed negatives, as the SDXL pipeline does."""
    pipe = tiny_pipeline("sdxl", scheduler="euler", image_size=8)  # 1-level VAE: height 8 is the latent height
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pipe(PROMPTS[:2], height=8, width=8, num_inference_steps=3, guidance_scale=4.0,
                        latents=z0.clone(), output_type="latent").images
        cond = encode_prompts(pipe, PROMPTS[:2], height=8, width=8)
        got = sample(pipe.unet, pipe.scheduler, z0, cond, SamplerConfig(steps=3, guidance_scale=4.0))
    assert set(cond.added) == {"text_embeds", "time_ids"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
