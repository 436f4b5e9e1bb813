"""ONNX Runtime's transformer optimizer on an exported UNet: CPU-only fusions, fewer nodes, the torch parity gate
on the optimized graph, and refusal (file removed) when the gate fails."""

from __future__ import annotations

import onnx
import pytest

from exporter.errors import ExportError, ValidationError
from exporter.onnx_export import OnnxExportOptions, export_unet
from exporter.onnx_optimize import (
    GPU_ONLY_FUSIONS,
    cpu_fusion_options,
    node_count,
    optimize_unet_onnx,
    optimize_unet_validated,
)
from exporter.parity import Tolerance
from uniforget.geometries import TINY, build_unet

CPU_CONTRIB = {"Gelu", "BiasGelu", "SkipLayerNormalization", "LayerNormalization"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    unet = build_unet(TINY["sd1"], seed=0)
    d = tmp_path_factory.mktemp("opt")
    res = export_unet(unet, d / "unet.onnx", OnnxExportOptions(symbolic_shapes=False))
    return unet, res.path


def test_cpu_fusion_options_leave_cuda_only_fusions_off():
    opts = cpu_fusion_options()
    assert not any(getattr(opts, name, False) for name in GPU_ONLY_FUSIONS)
    assert opts.enable_skip_layer_norm and opts.enable_gelu


def test_optimized_graph_is_smaller_and_passes_the_torch_gate(exported, tmp_path):
    unet, src = exported
    res, report = optimize_unet_validated(unet, src, tmp_path / "unet.opt.onnx")
    assert report.passed and report.max_abs <= 1e-4 and len(report.cases) >= 3
    assert res.nodes_before == node_count(src) and res.nodes_after == node_count(res.path) < res.nodes_before
    assert res.fused_ops and set(res.fused_ops) <= CPU_CONTRIB, res.fused_ops  # only ops with CPU kernels
    ops = {n.domain for n in onnx.load(str(res.path)).graph.node}
    assert "com.microsoft" in ops
    assert not list(tmp_path.glob(".*staging*"))


def test_in_place_keeps_the_file_name(exported, tmp_path):
    _, src = exported
    copy = tmp_path / "model.onnx"
    copy.write_bytes(src.read_bytes())
    res = optimize_unet_onnx(copy, copy)
    assert res.path == copy and node_count(copy) == res.nodes_after < res.nodes_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_external_data_in_place_keeps_its_layout_and_permissions(exported, tmp_path):
    """A > 2 GB UNet comes with external data (optimum's layout: model.onnx + model.onnx_data); the fused graph keeps
    that layout under the same names, readable like the model file (onnx writes data files 0600), and loads."""
    unet, src = exported
    copy = tmp_path / "model.onnx"
    onnx.save_model(onnx.load(str(src)), str(copy), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    res, report = optimize_unet_validated(unet, copy, copy)
    assert report.passed and res.nodes_after < res.nodes_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    data = tmp_path / "model.onnx_data"
    assert data.stat().st_mode & 0o777 == copy.stat().st_mode & 0o777
    assert len(onnx.load(str(copy)).graph.initializer) > 0 and copy.stat().st_size < data.stat().st_size


def test_failed_gate_removes_the_optimized_file(exported, tmp_path):
    unet, src = exported
    dst = tmp_path / "unet.opt.onnx"
    with pytest.raises(ValidationError):
        optimize_unet_validated(unet, src, dst, Tolerance(atol=0.0))  # float rounding alone exceeds atol 0
    assert not dst.exists()


def test_not_an_onnx_file_is_one_export_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="bad.onnx"):
        optimize_unet_onnx(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
