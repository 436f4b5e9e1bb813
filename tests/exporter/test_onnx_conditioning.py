"""Every UNet input a config requires reaches the ONNX graph: LCM's timestep_cond, class labels; and the
ORT pipeline samples LCM-style UNets like diffusers' LatentConsistencyModelPipeline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

import exporter.onnx_export as onnx_export
from exporter.errors import ExportError
from exporter.onnx_export import (
    OnnxExportOptions,
    check_onnx_inputs,
    check_unet_inputs,
    export_pipeline,
    export_unet,
    export_unet_validated,
    unet_inputs,
    unet_spec,
)
from exporter.onnx_pipeline import OnnxStableDiffusionPipeline, guidance_scale_embedding, load_scheduler
from exporter.runners import OnnxRuntimeRunner
from uniforget.geometries import CONDITIONED, build_unet, example_inputs, tiny_pipeline

FAST = OnnxExportOptions(symbolic_shapes=False)
EXTRA = {"lcm": "timestep_cond", "class_ids": "class_labels", "class_projection": "class_labels"}
PIXEL_ATOL = 1e-4  # ORT pipeline vs diffusers, images in [0, 1]


@pytest.mark.parametrize("geo", sorted(CONDITIONED))
def test_conditioned_unet_exports_its_input_and_passes_parity(geo, tmp_path):
    unet = build_unet(CONDITIONED[geo], seed=2)
    res, rep = export_unet_validated(unet, tmp_path / "unet.onnx", FAST)
    names = [i.name for i in onnx.load(str(res.path)).graph.input]
    assert names == ["sample", "timestep", "encoder_hidden_states", EXTRA[geo]]
    assert rep and rep.max_abs < 1e-4  # the gate fed the extra input to torch and ORT alike
    # the input is live in the graph: changing it moves the output far beyond the tolerance
    feed = unet_inputs(unet, 2, 8, 8, seed=4)
    other = dict(feed, **{EXTRA[geo]: unet_inputs(unet, 2, 8, 8, seed=5)[EXTRA[geo]]})
    with OnnxRuntimeRunner(res.path) as r:
        assert float(np.abs(r.infer(feed)["out_sample"] - r.infer(other)["out_sample"]).max()) > 1e-3


@pytest.mark.parametrize("geo, says", [("lcm", "time_embedding.cond_proj"), ("class_ids", "class_labels")])
def test_export_fails_when_the_spec_leaves_an_input_out(geo, says, tmp_path, monkeypatch):
    """The old bug: LCM's UNet exported without timestep_cond, and the parity gate could not see it."""
    unet = build_unet(CONDITIONED[geo], seed=2)
    monkeypatch.setattr(onnx_export, "unet_conditioning", lambda u: ())
    with pytest.raises(ExportError, match=f"miss an argument this UNet's forward needs: .*{says}"):
        export_unet(unet, tmp_path / "unet.onnx", FAST)
    assert not (tmp_path / "unet.onnx").exists()


def test_input_check_passes_every_complete_spec():
    for cfg in CONDITIONED.values():
        unet = build_unet(cfg)
        check_unet_inputs(unet, unet_spec(unet).input_names)  # raises if any weighted module stays idle


def test_graph_missing_a_spec_input_is_refused(tmp_path):
    x = onnx.helper.make_tensor_value_info("sample", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("out_sample", onnx.TensorProto.FLOAT, [1])
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["sample"], ["out_sample"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(g), str(tmp_path / "m.onnx"))
    spec = onnx_export.OnnxModelSpec(("sample", "timestep_cond"), ("out_sample",), {})
    with pytest.raises(ExportError, match=r"lacks inputs \['timestep_cond'\]"):
        check_onnx_inputs(tmp_path / "m.onnx", spec)


@pytest.mark.parametrize("config, name", [({"addition_embed_type": "image"}, "addition_embed_type='image'"),
                                          ({"encoder_hid_dim_type": "ip_image_proj"}, "encoder_hid_dim_type")])
def test_unsupported_conditioning_is_named(config, name):
    with pytest.raises(ExportError, match=name):
        unet_spec(SimpleNamespace(config=config, class_embedding=None))


def test_example_inputs_feed_the_conditioning():
    for geo, cfg in CONDITIONED.items():
        assert EXTRA[geo] in example_inputs(build_unet(cfg))


@pytest.mark.parametrize("dim", [256, 15])
def test_guidance_embedding_is_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = np.array([0.0, 1.5, 7.5], dtype=np.float32)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), dim).numpy()
    got = guidance_scale_embedding(w, dim)
    assert got.shape == ref.shape == (3, dim)
    assert float(np.abs(got - ref).max()) < 1e-3  # sin of ~1e4-radian float32 arguments: ulp-level disagreement


# ---------------------------------------------------------------------------------------------- LCM pipeline

@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    pipe = tiny_pipeline("lcm", seed=1)
    res = export_pipeline(pipe, tmp_path_factory.mktemp("lcm") / "pipeline", options=FAST)
    return pipe, res


def test_lcm_pipeline_exports_timestep_cond(lcm):
    _, res = lcm
    names = [i.name for i in onnx.load(str(res.folder / "unet" / "model.onnx")).graph.input]
    assert "timestep_cond" in names
    assert res.parity["unet"] and type(load_scheduler(res.folder / "scheduler")).__name__ == "NumpyLCM"


def test_lcm_timesteps_are_diffusers(lcm):
    pipe, res = lcm
    ours = load_scheduler(res.folder / "scheduler")
    for steps in (1, 4, 7):
        pipe.scheduler.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.timesteps.tolist() == pipe.scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_images_match_diffusers(lcm, steps, monkeypatch):
    """Same latents, same between-step noise (diffusers' draw replaced by the NumPy generator's)."""
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    pipe, res = lcm
    noise = np.random.default_rng(11)
    monkeypatch.setattr(lcm_mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        noise.standard_normal(tuple(shape), dtype=np.float32)))
    prompts = ["the red circle", "a blue square on green"]
    lat = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=8.5, latents=torch.from_numpy(lat),
               output_type="np").images
    ort = OnnxStableDiffusionPipeline(res.folder)
    got = ort(prompts, num_inference_steps=steps, guidance_scale=8.5, latents=lat, seed=11).images
    diff = float(np.abs(got - ref).max())
    print(f"LCM, {steps} step(s): ORT pipeline vs diffusers max abs pixel diff {diff:.3g}")
    assert got.shape == ref.shape == (2, 16, 16, 3) and diff <= PIXEL_ATOL, diff
    # guidance really enters through timestep_cond: another scale moves the image
    other = ort(prompts, num_inference_steps=steps, guidance_scale=2.0, latents=lat, seed=11).images
    assert float(np.abs(other - got).max()) > 10 * PIXEL_ATOL


def test_pruned_lcm_unet_keeps_timestep_cond_through_save_load_and_export(tmp_path):
    """masks -> plan -> prune -> slim folder -> ONNX: the LCM conditioning survives every stage."""
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.plan import make_plan
    from uniforget.prune import prune_unet
    from uniforget.slim_io import save_slim_unet
    from uniforget.targets import discover_targets

    unet = build_unet(CONDITIONED["lcm"], seed=5)
    g = torch.Generator().manual_seed(0)
    ms = MaskSet({t.key: torch.rand(t.size, generator=g) * 2 - 1 for t in discover_targets(unet)},
                 model_fingerprint(unet))
    plan = make_plan(unet, ms, 0.3, with_flops=False)
    save_slim_unet(prune_unet(unet, plan), plan, tmp_path / "slim")
    res, rep = export_unet_validated(tmp_path / "slim", tmp_path / "onnx" / "unet.onnx", FAST)
    assert "timestep_cond" in [i.name for i in onnx.load(str(res.path)).graph.input]
    assert rep and rep.max_abs < 1e-4
