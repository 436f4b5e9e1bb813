"""Triton model repository: configs rendered and parsed back against Triton's ModelConfig schema (tritonclient),
options (batching, instances), malformed configs rejected, and nothing half-written on failure."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tritonclient", reason='needs tritonclient: pip install "uniforget[triton]"')

from exporter.errors import ExportError, ValidationError  # noqa: E402
from exporter.triton_repo import (  # noqa: E402
    PIPELINE,
    UNET_ONNX,
    UNET_TRT,
    TritonRepoOptions,
    config_texts,
    model_config_pb2,
    parse_config,
    validate_repository,
    write_repository,
)


def test_default_repository_parses_against_triton_schema(tmp_path, unet_onnx, pipeline_dir):
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    res = write_repository(TritonRepoOptions(out_dir=tmp_path / "triton", unet_onnx=unet_onnx,
                                             pipeline_dir=pipeline_dir, python_env=env, steps=7))
    assert set(res.models) == {UNET_ONNX, PIPELINE}
    cfgs = validate_repository(res.path)
    mc = model_config_pb2()
    unet = cfgs[UNET_ONNX]
    assert unet.platform == "onnxruntime_onnx" and unet.max_batch_size == 0
    dims = {t.name: list(t.dims) for t in unet.input}
    assert dims == {"sample": [-1, 4, -1, -1], "timestep": [-1], "encoder_hidden_states": [-1, -1, 48]}
    assert [list(t.dims) for t in unet.output] == [[-1, 4, -1, -1]]
    assert all(t.data_type == mc.TYPE_FP32 for t in unet.input)
    assert unet.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and not unet.HasField("dynamic_batching")
    assert (res.path / UNET_ONNX / "1" / "model.onnx").is_file()

    pipe = cfgs[PIPELINE]
    assert pipe.backend == "python"
    assert pipe.parameters["EXECUTION_ENV_PATH"].string_value == str(env)
    assert pipe.parameters["steps"].string_value == "7"
    assert [o.name for o in pipe.output] == ["image"] and pipe.output[0].data_type == mc.TYPE_UINT8
    version = res.path / PIPELINE / "1"
    for f in ("model.py", "vendor/exporter/onnx_pipeline.py", "vendor/exporter/runners.py",
              "vendor/uniforget/errors.py", "pipeline/unet/model.onnx"):
        assert (version / f).exists(), f
    texts = config_texts(res.path)
    assert 'platform: "onnxruntime_onnx"' in texts[UNET_ONNX]


def test_batching_instances_and_dynamic_batching(tmp_path, unet_onnx):
    res = write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx, max_batch_size=8,
                                             dynamic_batching=True, max_queue_delay_us=500, instances=2,
                                             instance_kind="gpu"))
    cfg = validate_repository(res.path)[UNET_ONNX]
    mc = model_config_pb2()
    assert cfg.max_batch_size == 8 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    ins = {t.name: t for t in cfg.input}
    assert list(ins["sample"].dims) == [4, -1, -1]  # batch axis implied
    assert list(ins["timestep"].dims) == [1] and ins["timestep"].HasField("reshape")  # (B,) -> scalar per item
    assert list(ins["timestep"].reshape.shape) == []


@pytest.mark.parametrize("text, why", [
    ('name: "m" backend: "python" colour: "red"', "no field named"),
    ('name: "m" platform: "onnxruntime_onnx" input [{name: "x" data_type: TYPE_FLOAT32 dims: [1]}]', "TYPE_FLOAT32"),
    ('name: "m" platform: "onnxruntime_onnx" input [{name: "x" data_type: TYPE_FP32 dims: [0]}] '
     'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]', "dims"),
    ('name: "m" platform: "onnxruntime_onnx" max_batch_size: 0 dynamic_batching {} '
     'input [{name: "x" data_type: TYPE_FP32 dims: [1]}] output [{name: "y" data_type: TYPE_FP32 dims: [1]}]',
     "dynamic_batching needs max_batch_size"),
    ('name: "m" input [{name: "x" data_type: TYPE_FP32 dims: [1]}] output [{name: "y" dims: [1]}]',
     "neither backend nor platform"),
    ('name: "m" backend: "python" input [{name: "x" data_type: TYPE_FP32 dims: [1] ', "Expected"),
])
def test_malformed_config_is_rejected(text, why):
    with pytest.raises(ValidationError, match=why):
        parse_config(text)


def test_validator_rejects_a_corrupted_repository(tmp_path, unet_onnx):
    res = write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx))
    pbtxt = res.path / UNET_ONNX / "config.pbtxt"
    pbtxt.write_text(pbtxt.read_text().replace("TYPE_FP32", "TYPE_FLOAT", 1))
    with pytest.raises(ValidationError, match=UNET_ONNX):
        validate_repository(res.path)
    pbtxt.write_text(pbtxt.read_text().replace("TYPE_FLOAT", "TYPE_FP32").replace('"unet_onnx"', '"other"'))
    with pytest.raises(ValidationError, match="differs from its folder name"):
        validate_repository(res.path)


def test_tensorrt_plan_model_when_a_build_exists(tmp_path, unet_onnx, pipeline_dir):
    # a finished build's layout: the writer links unet.plan and reads build.json (placeholder plan bytes here;
    # the engine itself is only built where TensorRT runs, see test_tensorrt_build.py)
    trt = tmp_path / "trt"
    trt.mkdir()
    (trt / "unet.plan").write_bytes(b"plan")
    prof = {"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}}
    (trt / "build.json").write_text(json.dumps({"onnx": {"path": str(unet_onnx)}, "profiles": [prof]}))
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    res = write_repository(TritonRepoOptions(out_dir=tmp_path / "t", trt_dir=trt, pipeline_dir=pipeline_dir,
                                             python_env=env, pipeline_unet="tensorrt", max_batch_size=4))
    cfgs = validate_repository(res.path)
    assert set(cfgs) == {UNET_TRT, PIPELINE}
    assert cfgs[UNET_TRT].platform == "tensorrt_plan" and cfgs[UNET_TRT].max_batch_size == 4
    mc = model_config_pb2()
    assert cfgs[UNET_TRT].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert (res.path / UNET_TRT / "1" / "model.plan").read_bytes() == b"plan"
    assert cfgs[PIPELINE].parameters["unet_plan"].string_value == "unet.plan"
    assert (res.path / PIPELINE / "1" / "unet.plan").is_file()
    with pytest.raises(ExportError, match="exceeds the engine profile"):
        write_repository(TritonRepoOptions(out_dir=tmp_path / "t2", trt_dir=trt, max_batch_size=8))
    assert not (tmp_path / "t2").exists()


def test_bad_options_and_no_half_written_repository(tmp_path, unet_onnx, pipeline_dir):
    with pytest.raises(ExportError, match="dynamic batching needs"):
        TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx, dynamic_batching=True)
    with pytest.raises(ExportError, match="nothing to serve"):
        TritonRepoOptions(out_dir=tmp_path / "t")
    (pipeline_dir / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(ExportError, match="vae_decoder"):
        write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx, pipeline_dir=pipeline_dir))
    assert not (tmp_path / "t").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t.partial")]
    write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx))
    with pytest.raises(ExportError, match="--overwrite"):
        write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx))
    write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx, overwrite=True))
    assert validate_repository(tmp_path / "t")


def test_build_cli_writes_repository_and_rejects_empty_request(tmp_path, unet_onnx, pipeline_dir, capsys):
    import argparse

    from exporter import cli
    from exporter.commands import build as build_cmd

    p = argparse.ArgumentParser()
    build_cmd.add_parser(p.add_subparsers())
    out = tmp_path / "engines" / "x"
    args = p.parse_args(["build", "--out", str(out), "--onnx", str(unet_onnx), "--pipeline", str(pipeline_dir),
                         "--triton", "--instances", "2", "--python-env", str(tmp_path)])
    (tmp_path / "bin").mkdir()
    assert cli._run(build_cmd.run, args) == 0
    cfgs = validate_repository(out / "triton")
    assert set(cfgs) == {UNET_ONNX, PIPELINE} and cfgs[PIPELINE].instance_group[0].count == 2
    assert "uniforget serve --repo" in capsys.readouterr().out
    assert cli._run(build_cmd.run, p.parse_args(["build", "--out", str(out)])) == 2
    assert "nothing to build" in capsys.readouterr().err


def test_external_data_is_not_hard_linked(tmp_path, unet_onnx, pipeline_dir):
    """onnx (>= 1.17) refuses to load external data with more than one hard link, so a repository that linked a
    > 2 GB UNet's weights would break `onnx.load` (Polygraphy, ONNX Runtime's optimizer) on the repository *and* on
    the export it came from. Graphs saved with external data stand in for the big UNet here."""
    import onnx

    src = tmp_path / "src"
    src.mkdir()
    big = src / "unet.onnx"
    onnx.save_model(onnx.load(str(unet_onnx)), str(big), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="unet.onnx_data", size_threshold=0)
    pipe = pipeline_dir
    onnx.save_model(onnx.load(str(big)), str(pipe / "unet" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    res = write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=big, pipeline_dir=pipe))
    copies = [res.path / UNET_ONNX / "1" / "model.onnx", res.path / PIPELINE / "1" / "pipeline" / "unet" /
              "model.onnx"]
    for graph in [big, pipe / "unet" / "model.onnx", *copies]:
        data = next(graph.parent.glob("*.onnx_data"))
        assert data.stat().st_nlink == 1, data
        assert len(onnx.load(str(graph)).graph.initializer) > 0  # external data loads: no hard-link refusal
    assert res.external_data_bytes == sum(next(c.parent.glob("*.onnx_data")).stat().st_size for c in copies) > 0
    # files onnx does not guard are still linked (no space spent on them)
    assert (res.path / PIPELINE / "1" / "pipeline" / "text_encoder" / "model.onnx").stat().st_nlink == 2
