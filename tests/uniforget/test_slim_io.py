"""Slim-UNet directory: bit-identical round trip, atomic writes, one-line errors, plugs into a pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from uniforget.errors import PlanError
from uniforget.flops import ReferenceShape
from uniforget.gating import attach_gates
from uniforget.geometries import TINY, build_unet, example_inputs
from uniforget.masks import mixed_maskset
from uniforget.plan import make_plan
from uniforget.prune import SlimLayerNorm, prune_unet
from uniforget.slim_io import PLAN_NAME, WEIGHTS_NAME, load_slim_unet, save_slim_unet

REF = ReferenceShape(batch=1, height=8, width=8, seq_len=7)


random_masks = mixed_maskset  # closed, fractional and open gates in every target


@pytest.fixture(scope="module", params=sorted(TINY))
def pruned(request):
    unet = build_unet(TINY[request.param], seed=0)
    plan = make_plan(unet, random_masks(unet), "auto", REF, with_flops=False)
    return unet, plan, prune_unet(unet, plan)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_round_trip_bit_identical(pruned, tmp_path):
    unet, plan, slim = pruned
    d = save_slim_unet(slim, plan, tmp_path / "unet")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                   "uniforget_plan.json"]
    loaded = load_slim_unet(d)
    assert not loaded.training
    a, b = slim.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for shape in [(1, 8, 8), (2, 16, 16), (2, 16, 24)]:
        inputs = example_inputs(unet, *shape, seed=shape[1])
        assert torch.equal(_out(slim, inputs), _out(loaded, inputs))
    assert any(isinstance(m, SlimLayerNorm) for m in loaded.modules())
    assert [p.name for p in tmp_path.iterdir()] == ["unet"]  # no temp leftovers


def test_load_with_dtype(pruned, tmp_path):
    _, plan, slim = pruned
    loaded = load_slim_unet(save_slim_unet(slim, plan, tmp_path / "u"), dtype=torch.float16)
    assert loaded.dtype == torch.float16
    norm = next(m for m in loaded.modules() if isinstance(m, SlimLayerNorm))
    assert norm.kept.dtype == torch.long


def test_existing_out_dir(pruned, tmp_path):
    _, plan, slim = pruned
    d = save_slim_unet(slim, plan, tmp_path / "u")
    with pytest.raises(PlanError, match="already exists"):
        save_slim_unet(slim, plan, d)
    save_slim_unet(slim, plan, d, overwrite=True)
    assert load_slim_unet(d) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def saved(tmp_path):
    unet = build_unet(TINY["sd1"], seed=0)
    ms = random_masks(unet)
    plan = make_plan(unet, ms, "auto", REF, with_flops=False)
    d = save_slim_unet(prune_unet(unet, plan), plan, tmp_path / "u")
    return unet, ms, d


def test_corrupt_plan_json(saved):
    _, _, d = saved
    p = d / PLAN_NAME
    p.write_text(p.read_text()[:100])
    with pytest.raises(PlanError) as e:
        load_slim_unet(d)
    assert "not valid JSON" in _one_line(e)


def test_edited_plan_with_same_shapes(saved):
    _, _, d = saved
    p = d / PLAN_NAME
    data = json.loads(p.read_text())
    t = next(t for t in data["targets"] if t["kind"] == "ffn")
    t["gates"][0] = 0.5 if t["gates"][0] != 0.5 else 0.25
    p.write_text(json.dumps(data))
    with pytest.raises(PlanError) as e:
        load_slim_unet(d)
    assert "does not match the weights" in _one_line(e)


def test_plan_from_another_prune_run(saved, tmp_path):
    unet, ms, d = saved
    other = make_plan(unet, ms, 0.3, REF, with_flops=False)
    other.save(d / PLAN_NAME)
    with pytest.raises(PlanError) as e:
        load_slim_unet(d)
    assert "does not match the weights" in _one_line(e)


def test_tampered_weights_shape(saved):
    _, _, d = saved
    w = d / WEIGHTS_NAME
    from safetensors import safe_open

    with safe_open(str(w), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(w))
    k = next(k for k in state if k.endswith("attn1.to_q.weight"))
    state[k] = state[k][:-1].clone()
    save_file(state, str(w), metadata=meta)
    with pytest.raises(PlanError) as e:
        load_slim_unet(d)
    assert "the plan makes" in _one_line(e)


def test_missing_files(saved):
    _, _, d = saved
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(PlanError) as e:
        load_slim_unet(d)
    assert "missing diffusion_pytorch_model.safetensors" in _one_line(e)


def test_truncated_weights(saved):
    _, _, d = saved
    w = d / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(PlanError) as e:
        load_slim_unet(d)
    _one_line(e)


def test_plugs_into_a_pipeline(saved):
    """A text-to-image pipeline with the loaded slim UNet equals the same pipeline with the gated dense UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from uniforget.plan import PruningPlan

    unet, _, d = saved
    plan = PruningPlan.load(d / PLAN_NAME)
    slim = load_slim_unet(d)

    def pipe_with(u):
        p = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=u,
                                    scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        return p

    emb = torch.randn(1, 7, TINY["sd1"]["cross_attention_dim"], generator=torch.Generator().manual_seed(0))

    def run(p):
        return p(prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb), num_inference_steps=3,
                 guidance_scale=4.0, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(1)).images

    sp = pipe_with(unet)
    with attach_gates(unet, plan.effective_gates()):
        ref = run(sp)
    sp.unet = slim
    out = run(sp)
    assert out.shape == (1, 4, 8, 8)
    # latents of a random-weight UNet after 3 guided DDIM steps reach |x| ~ 20: fp32 rounding scales with them
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert (run(pipe_with(unet)) - out).abs().max() > 1e-3  # the dense model differs: the check is not vacuous
