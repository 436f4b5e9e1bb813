"""UNet -> ONNX over every TINY geometry: interface, folding, external data, fp16, and the parity gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.cli import main
from exporter.errors import ExportError, ValidationError
from exporter.onnx_export import (
    FP16_TOLERANCE,
    OnnxExportOptions,
    export_unet,
    export_unet_validated,
    load_unet,
    unet_inputs,
    validate_unet,
)
from exporter.parity import Tolerance
from exporter.runners import OnnxRuntimeRunner
from uniforget.geometries import TINY, build_unet

# onnx's shape inference between folding passes: 3x faster than ONNX Runtime's symbolic one (the default,
# tested once below); the shared CI CPU pays for every export
FAST = OnnxExportOptions(symbolic_shapes=False)


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):
    geo = request.param
    unet = build_unet(TINY[geo], seed=3)
    res = export_unet(unet, tmp_path_factory.mktemp(geo) / "unet.onnx", FAST)
    return geo, unet, res


def test_interface_and_cleanup(exported):
    geo, _, res = exported
    m = onnx.load(str(res.path))
    names = [i.name for i in m.graph.input]
    want = ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if geo == "sdxl" else [])
    assert names == want and [o.name for o in m.graph.output] == ["out_sample"]
    dims = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2:] == ["height", "width"]
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 17 == res.opset
    assert res.nodes_folded < res.nodes_exported and len(m.graph.node) == res.nodes_folded
    assert res.external_data_path is None and res.file_bytes == res.path.stat().st_size
    assert [p.name for p in res.path.parent.iterdir()] == ["unet.onnx"], "temp files left behind"


def test_parity_over_batches_and_resolutions(exported):
    _, unet, res = exported
    rep = validate_unet(unet, res.path, cases=[(1, 8, 8), (3, 16, 8), (2, 8, 24)])
    assert rep and len(rep.cases) == 3 and rep.max_abs < 1e-4


def test_timestep_broadcasts_like_pipelines_pass_it(exported):
    """Pipelines pass one timestep for a CFG batch of 2: the (1,) timestep must broadcast."""
    _, unet, res = exported
    feed = unet_inputs(unet, 2, 8, 8, seed=9)
    one = dict(feed, timestep=feed["timestep"][:1])
    with OnnxRuntimeRunner(res.path) as r:
        np.testing.assert_allclose(r.infer(one)["out_sample"], r.infer(feed)["out_sample"], atol=1e-6)


def test_broken_weight_fails_the_gate(exported, tmp_path):
    _, unet, res = exported
    m = onnx.load(str(res.path))
    big = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(big).copy()
    w.flat[0] += 0.5
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    onnx.save(m, str(tmp_path / "broken.onnx"))
    with pytest.raises(ValidationError) as e:
        validate_unet(unet, tmp_path / "broken.onnx")
    assert len(e.value.failures) == 3 and all("out_sample" in f for f in e.value.failures)


def test_nan_weight_fails_even_with_huge_tolerance(exported, tmp_path):
    _, unet, res = exported
    m = onnx.load(str(res.path))
    big = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(big).copy()
    w[...] = np.nan
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    rep = validate_unet(unet, tmp_path / "nan.onnx", Tolerance(atol=1e9, rtol=1e9), raise_on_failure=False)
    assert not rep and all("NaN/Inf" in f for f in rep.failures())


def test_forced_external_data(tmp_path):
    unet = build_unet(TINY["sd1"])
    res = export_unet(unet, tmp_path / "unet.onnx", OnnxExportOptions(external_data=True, symbolic_shapes=False))
    assert res.external_data_path == tmp_path / "unet.onnx_data" and res.external_data_path.is_file()
    assert res.path.stat().st_size < 0.15 * res.file_bytes  # only tensors < 1 KB stay inline
    assert res.file_bytes == res.path.stat().st_size + res.external_data_path.stat().st_size
    onnx.checker.check_model(str(res.path), full_check=True)
    assert validate_unet(unet, res.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx_data"]


def test_external_data_is_as_readable_as_the_model_file(tmp_path):
    """onnx writes the data file 0600: a server under another user would load a graph without its weights."""
    res = export_unet(build_unet(TINY["sd1"]), tmp_path / "unet.onnx",
                      OnnxExportOptions(external_data=True, symbolic_shapes=False, fold_constants=False))
    mode = res.path.stat().st_mode & 0o777
    assert res.external_data_path.stat().st_mode & 0o777 == mode


def test_fp16(tmp_path):
    unet = build_unet(TINY["sd1"])
    res = export_unet(unet, tmp_path / "unet16.onnx", OnnxExportOptions(fp16=True, symbolic_shapes=False))
    m = onnx.load(str(res.path))
    assert res.precision == "fp16"
    assert {t.data_type for t in m.graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O kept
    rep = validate_unet(unet, res.path, FP16_TOLERANCE)
    print(f"fp16 ONNX vs fp32 torch: {rep.summary()}")
    assert rep and rep.max_abs > 1e-5  # really computed in half precision


def test_validated_export_leaves_nothing_when_the_gate_fails(tmp_path):
    unet = build_unet(TINY["sd1"])
    with pytest.raises(ValidationError):
        export_unet_validated(unet, tmp_path / "unet.onnx", FAST, tol=Tolerance(atol=0.0))
    assert list(tmp_path.iterdir()) == []
    res, rep = export_unet_validated(unet, tmp_path / "unet.onnx", FAST)
    assert rep and res.path == tmp_path / "unet.onnx" and list(tmp_path.iterdir()) == [res.path]


def test_load_unet_sources(tmp_path):
    unet = build_unet(TINY["sd2"])
    unet.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    loaded = load_unet(tmp_path / "unet")
    assert type(loaded).__name__ == "UNet2DConditionModel"
    with pytest.raises(ExportError, match="neither a slim UNet folder"):
        load_unet(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="AutoencoderKL"):
        load_unet(tmp_path / "vae")
    with pytest.raises(ExportError, match="not a folder"):
        load_unet(tmp_path / "nope")


def test_pipeline_folder_gets_a_hint(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ExportError, match="try .*unet"):
        load_unet(tmp_path)


def test_default_symbolic_shapes_fold_more(exported, tmp_path):
    geo, unet, fast = exported
    if geo != "sd1":
        pytest.skip("one geometry is enough: ~20 s per export")
    res = export_unet(unet, tmp_path / "unet.onnx")
    assert res.nodes_exported == fast.nodes_exported and res.nodes_folded < fast.nodes_folded
    assert validate_unet(unet, res.path, cases=[(2, 8, 16)])


def test_opset_below_17_is_refused():
    with pytest.raises(ExportError, match="opset 16"):
        OnnxExportOptions(opset=16)


# ------------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "unet"
    build_unet(TINY["sd1"]).save_pretrained(str(d), safe_serialization=True)
    return d


def test_cli_export(unet_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["-q", "export", "--unet", str(unet_dir), "--out", str(out), "--opset", "18", "--fast-fold"]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["unet"]["opset"] == 18 and summary["unet_parity"]["passed"] is True
    assert summary["unet"]["path"] == str(out / "unet.onnx")  # where it was published, not the staging folder
    assert (out / "unet.onnx").is_file()
    capsys.readouterr()
    assert main(["-q", "export", "--unet", str(unet_dir), "--out", str(out), "--fast-fold"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # a failed gate (no tolerance at all) leaves the published export as it was and no staging folder behind
    assert main(["-q", "export", "--unet", str(unet_dir), "--out", str(out), "--fast-fold", "--overwrite",
                 "--atol", "0"]) == 2
    assert json.loads((out / "export.json").read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


@pytest.mark.parametrize("case", ["opset", "not_unet", "unwritable"])
def test_cli_bad_input_is_one_line_exit_2(unet_dir, tmp_path, capsys, case):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = {"opset": ["--unet", str(unet_dir), "--out", str(tmp_path / "o"), "--opset", "13"],
            "not_unet": ["--unet", str(tmp_path), "--out", str(tmp_path / "o")],
            "unwritable": ["--unet", str(unet_dir), "--out", str(blocker / "sub")]}[case]
    assert main(["-q", "export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("geo", ["sd1", "sdxl"])
def test_slim_unet_folder_exports_with_parity(tmp_path, geo):
    """A pruned UNet saved as a slim folder (uniforget_plan.json) exports and passes the fp32 gate."""
    import torch

    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.plan import make_plan
    from uniforget.prune import prune_unet
    from uniforget.slim_io import save_slim_unet
    from uniforget.targets import discover_targets

    unet = build_unet(TINY[geo], seed=5)
    g = torch.Generator().manual_seed(0)
    ms = MaskSet({t.key: torch.rand(t.size, generator=g) * 2 - 1 for t in discover_targets(unet)},
                 model_fingerprint(unet))
    plan = make_plan(unet, ms, 0.3, with_flops=False)
    slim = prune_unet(unet, plan)
    save_slim_unet(slim, plan, tmp_path / "slim")
    res, rep = export_unet_validated(tmp_path / "slim", tmp_path / "onnx" / "unet.onnx", FAST)
    assert rep and rep.max_abs < 1e-4
    dense = export_unet(unet, tmp_path / "dense.onnx", FAST)
    assert res.file_bytes < 0.85 * dense.file_bytes  # really smaller
