"""TensorRT build: lazy import, profile shapes, the Polygraphy parity gate (real ONNX Runtime runners here), the
missing-TensorRT error, and (where TensorRT and a GPU exist) a real engine build with its parity and build.json."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter import cli
from exporter.commands import build as build_cmd
from exporter.errors import ExportError, MissingDependencyError, ValidationError
from exporter.tensorrt_build import (
    BuildOptions,
    DimRange,
    ShapeRanges,
    build_engine,
    compare_runners,
    make_feeds,
    onnx_graph_facts,
    onnx_inputs,
    onnx_io,
    onnx_is_fp16,
    onnxrt_runner,
    profile_shapes,
    tensorrt_available,
)

HAVE_TRT, TRT_REASON = tensorrt_available()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason=f"needs TensorRT and an NVIDIA GPU: {TRT_REASON}")


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory) -> Path:
    """The tiny SD1-like UNet exported with the project's exporter (dynamic batch, H, W, text length)."""
    from exporter.onnx_export import OnnxExportOptions, export_unet
    from uniforget.geometries import TINY, build_unet

    path = tmp_path_factory.mktemp("unet") / "unet.onnx"
    export_unet(build_unet(TINY["sd1"]), path, OnnxExportOptions(fold_constants=False))
    return path


def _tiny_graph(path: Path, weight: float, nan: bool = False) -> Path:
    """y = x * w (+ sqrt(-1) when `nan`): two models that agree or disagree by a known amount."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [weight] * 4)
    nodes = [helper.make_node("Mul", ["x", "w"], ["m"])]
    inits = [w]
    if nan:
        inits.append(helper.make_tensor("neg", TensorProto.FLOAT, [1], [-1.0]))
        nodes += [helper.make_node("Sqrt", ["neg"], ["s"]), helper.make_node("Add", ["m", "s"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["m"], ["y"]))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_import_does_not_import_tensorrt():
    code = ("import sys, exporter.tensorrt_build, exporter.triton_repo, exporter.triton_server, exporter.cli; "
            "assert 'tensorrt' not in sys.modules, 'tensorrt imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_clear_error(unet_onnx, tmp_path):
    with pytest.raises(MissingDependencyError, match="pip install"):
        build_engine(BuildOptions(onnx=unet_onnx, out_dir=tmp_path / "trt"))
    assert not (tmp_path / "trt").exists()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_cli_trt_without_tensorrt_exits_2_with_one_line(unet_onnx, tmp_path, capsys):
    p = argparse.ArgumentParser()
    build_cmd.add_parser(p.add_subparsers())
    args = p.parse_args(["build", "--out", str(tmp_path), "--onnx", str(unet_onnx), "--trt"])
    assert cli._run(build_cmd.run, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorrt" in err[0].lower() and "pip install" in err[0]


def test_profile_shapes_follow_axis_roles(unet_onnx):
    inputs = {s.name: s for s in onnx_inputs(unet_onnx)}
    assert set(inputs) == {"sample", "timestep", "encoder_hidden_states"}
    ranges = ShapeRanges(batch=DimRange(1, 2, 8), height=DimRange(8, 16, 32), width=DimRange(8, 8, 16),
                         seq_len=DimRange(7, 77, 77))
    shapes = profile_shapes(list(inputs.values()), ranges)
    assert shapes["sample"] == ((1, 4, 8, 8), (2, 4, 16, 8), (8, 4, 32, 16))
    assert shapes["encoder_hidden_states"] == ((1, 7, 48), (2, 77, 48), (8, 77, 48))
    assert shapes["timestep"] == ((1,), (2,), (8,))
    static = profile_shapes(list(inputs.values()), ShapeRanges(batch=DimRange(1, 2, 8), static=True))
    assert static["sample"][0] == static["sample"][1] == static["sample"][2] == (2, 4, 16, 16)


def test_shape_range_rejects_disorder():
    with pytest.raises(ExportError, match="min <= opt <= max"):
        DimRange(4, 2, 8)


def test_unknown_dynamic_axis_is_rejected():
    from exporter.tensorrt_build import InputSpec

    with pytest.raises(ExportError, match="no known role"):
        profile_shapes([InputSpec("odd", "float32", ("b", 3, "what"))], ShapeRanges())


def test_feeds_for_conditioned_unets_stay_in_range():
    """LCM's timestep_cond is a sin/cos embedding, not a timestep; class ids must index the embedding."""
    from exporter.tensorrt_build import InputSpec

    specs = [InputSpec("timestep", "float32", ("b",)), InputSpec("timestep_cond", "float32", ("b", 16)),
             InputSpec("class_labels", "int64", ("b",))]
    feed = make_feeds(specs, {"timestep": (64,), "timestep_cond": (64, 16), "class_labels": (64,)})
    assert feed["timestep"].min() >= 0 and feed["timestep"].max() > 100
    assert np.abs(feed["timestep_cond"]).max() < 10
    assert feed["class_labels"].dtype == np.int64 and (feed["class_labels"] == 0).all()


def test_fp16_detection(unet_onnx, tmp_path):
    assert not onnx_is_fp16(unet_onnx)
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(m, str(tmp_path / "h.onnx"))
    assert onnx_is_fp16(tmp_path / "h.onnx")

    # fp32 inputs over fp16 weights is fp16 too; the one-parse facts agree with the per-question readers
    w = helper.make_tensor("w", TensorProto.FLOAT16, [2], [1.0, 2.0])
    xf = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    yf = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Cast", ["w"], ["wc"], to=TensorProto.FLOAT),
                           helper.make_node("Add", ["x", "wc"], ["y"])], "g", [xf], [yf], initializer=[w])
    onnx.save(helper.make_model(g), str(tmp_path / "w.onnx"))
    facts = onnx_graph_facts(tmp_path / "w.onnx")
    assert facts.fp16 and onnx_is_fp16(tmp_path / "w.onnx")
    assert [(i.name, i.dtype) for i in facts.inputs] == [("x", "float32")]
    assert (facts.inputs, facts.outputs) == onnx_io(tmp_path / "w.onnx")
    assert not onnx_graph_facts(unet_onnx).fp16


def test_polygraphy_parity_passes_for_identical_models(unet_onnx):
    inputs = onnx_inputs(unet_onnx)
    shapes = {k: v[1] for k, v in profile_shapes(inputs, ShapeRanges(height=DimRange(8, 8, 8),
                                                                     width=DimRange(8, 8, 8))).items()}
    feeds = [make_feeds(inputs, shapes, seed=0)]
    res = compare_runners(onnxrt_runner(unet_onnx, "a"), onnxrt_runner(unet_onnx, "b"), feeds, feeds, 1e-5, 1e-5)
    assert res.passed and res.feeds == 1
    assert res.outputs[0].name == "out_sample" and res.outputs[0].max_abs == 0.0


def test_polygraphy_parity_fails_beyond_tolerance(tmp_path):
    a = _tiny_graph(tmp_path / "a.onnx", 1.0)
    b = _tiny_graph(tmp_path / "b.onnx", 1.01)
    feeds = [{"x": np.full((2, 4), 2.0, np.float32)}]
    loose = compare_runners(onnxrt_runner(a, "a"), onnxrt_runner(b, "b"), feeds, feeds, rtol=0.0, atol=0.05)
    assert loose.passed and abs(loose.outputs[0].max_abs - 0.02) < 1e-5
    tight = compare_runners(onnxrt_runner(a, "a"), onnxrt_runner(b, "b"), feeds, feeds, rtol=0.0, atol=0.01)
    assert not tight.passed and "beyond" in tight.failures[0]


def test_polygraphy_parity_flags_nan(tmp_path):
    a = _tiny_graph(tmp_path / "a.onnx", 1.0)
    b = _tiny_graph(tmp_path / "b.onnx", 1.0, nan=True)
    feeds = [{"x": np.ones((1, 4), np.float32)}]
    res = compare_runners(onnxrt_runner(a, "a"), onnxrt_runner(b, "b"), feeds, feeds, rtol=1.0, atol=1.0)
    assert not res.passed
    assert res.outputs[0].nonfinite == 4 and any("NaN/Inf" in f for f in res.failures)


def test_existing_output_is_not_overwritten(unet_onnx, tmp_path):
    out = tmp_path / "trt"
    out.mkdir()
    (out / "unet.plan").write_bytes(b"old")
    with pytest.raises(ExportError, match="not empty"):
        build_engine(BuildOptions(onnx=unet_onnx, out_dir=out))
    assert (out / "unet.plan").read_bytes() == b"old"


# ------------------------------------------------------------------------------ needs TensorRT + GPU

@needs_trt
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_build_parity_and_record(unet_onnx, tmp_path):
    from exporter.parity import Tolerance, check_parity
    from exporter.runners import OnnxRuntimeRunner
    from exporter.tensorrt_build import TensorRTRunner

    ranges = ShapeRanges(batch=DimRange(1, 2, 4), height=DimRange(8, 8, 16), width=DimRange(8, 8, 16),
                         seq_len=DimRange(7, 7, 77))
    cache = tmp_path / "timing.cache"
    res = build_engine(BuildOptions(onnx=unet_onnx, out_dir=tmp_path / "trt", fp16=True, ranges=ranges,
                                    workspace_gib=1.0, timing_cache=cache))
    assert res.plan.is_file() and res.parity is not None and res.parity.passed and res.parity.feeds == 3
    assert cache.is_file()
    rec = json.loads(res.build_json.read_text())
    assert rec["precision"] == "fp16" and rec["gpu"]["compute_capability"] != "unknown"
    assert rec["profiles"][0]["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}
    inputs = onnx_inputs(unet_onnx)
    feed = make_feeds(inputs, {"sample": (2, 4, 16, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 48)})
    report = check_parity(OnnxRuntimeRunner(unet_onnx), TensorRTRunner(res.plan), [("2x16x8", feed)],
                          Tolerance(atol=5e-3, rtol=1e-2))
    assert report.passed


@needs_trt
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_over_tolerance_leaves_no_plan(unet_onnx, tmp_path):
    out = tmp_path / "trt"
    with pytest.raises(ValidationError, match="parity"):
        build_engine(BuildOptions(onnx=unet_onnx, out_dir=out, fp16=True, rtol=0.0, atol=0.0, workspace_gib=1.0))
    assert not out.exists()
    assert not any(p.name.startswith(".trt.partial") for p in tmp_path.iterdir())
