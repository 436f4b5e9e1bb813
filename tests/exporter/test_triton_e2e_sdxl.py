"""SDXL through a real tritonserver: the served image equals the in-process ONNX Runtime pipeline's, same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.triton_repo import PIPELINE, TritonRepoOptions, default_python_env, write_repository

httpclient = pytest.importorskip("tritonclient.http", reason='needs tritonclient: pip install "uniforget[triton]"')
pytestmark = pytest.mark.skipif(default_python_env() is None, reason="no .venv-triton with a tritonserver: run "
                                                                     "scripts/setup_triton_env.sh")
STEPS, GUIDANCE = 3, 5.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, Path]:
    from exporter.onnx_export import export_pipeline
    from uniforget.geometries import tiny_pipeline

    root = tmp_path_factory.mktemp("e2e_sdxl")
    onnx_dir = export_pipeline(tiny_pipeline("sdxl", scheduler="euler"), root / "onnx", validate=False).folder
    res = write_repository(TritonRepoOptions(out_dir=root / "triton", pipeline_dir=onnx_dir, steps=STEPS,
                                             guidance_scale=GUIDANCE, threads=1))
    return res.path, onnx_dir


def _served(repo: Path, prompt: str, seeds: tuple[int, ...]) -> list[np.ndarray]:
    from exporter.triton_server import ServerOptions, TritonServer

    s = TritonServer(ServerOptions(repo=repo, http_port=0, startup_timeout_s=90))
    try:
        s.start()
        client = httpclient.InferenceServerClient(s.url)
        out = []
        for seed in seeds:
            inputs = [httpclient.InferInput("prompt", [1], "BYTES"), httpclient.InferInput("seed", [1], "INT64")]
            inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
            inputs[1].set_data_from_numpy(np.array([seed], dtype=np.int64))
            out.append(client.infer(PIPELINE, inputs).as_numpy("image"))
        client.close()
    finally:
        s.stop()
    return out


def test_served_sdxl_image_equals_in_process_pipeline(repo):
    from exporter.onnx_pipeline import OnnxStableDiffusionPipeline

    served, other = _served(repo[0], "a red square", (7, 8))
    pipe = OnnxStableDiffusionPipeline(repo[1], threads=1)
    try:
        images = pipe("a red square", num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=7).images
    finally:
        pipe.close()
    expected = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)[0]
    assert served.dtype == np.uint8 and served.shape == expected.shape == (16, 16, 3)
    diff = int(np.abs(served.astype(int) - expected.astype(int)).max())
    print(f"SDXL served by Triton vs in-process ONNX Runtime: max abs {diff} (uint8)")
    assert diff == 0
    assert not np.array_equal(served, other), "different seeds gave the same image: the comparison means nothing"
