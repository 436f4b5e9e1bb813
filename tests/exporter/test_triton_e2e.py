"""End to end through a real tritonserver: export a tiny random Stable Diffusion pipeline to ONNX, write the model
repository, serve it on 127.0.0.1, send a prompt with tritonclient over HTTP, and check the image equals the
in-process ONNX Runtime pipeline's for the same seed. Servers are stopped however each test ends."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.triton_repo import PIPELINE, UNET_ONNX, TritonRepoOptions, default_python_env, write_repository

httpclient = pytest.importorskip("tritonclient.http", reason='needs tritonclient: pip install "uniforget[triton]"')
PY_ENV = default_python_env()
pytestmark = pytest.mark.skipif(PY_ENV is None, reason="no .venv-triton with a tritonserver: run "
                                                       "scripts/setup_triton_env.sh")

STEPS, GUIDANCE = 3, 5.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, Path]:
    """(model repository, exported ONNX pipeline folder)."""
    from exporter.onnx_export import export_pipeline
    from uniforget.geometries import tiny_pipeline

    root = tmp_path_factory.mktemp("e2e")
    onnx_dir = export_pipeline(tiny_pipeline(), root / "onnx", validate=False).folder
    res = write_repository(TritonRepoOptions(out_dir=root / "triton", unet_onnx=onnx_dir / "unet" / "model.onnx",
                                             pipeline_dir=onnx_dir, steps=STEPS, guidance_scale=GUIDANCE, threads=1))
    return res.path, onnx_dir


@pytest.fixture(scope="module")
def server(repo):
    from exporter.triton_server import ServerOptions, TritonServer

    s = TritonServer(ServerOptions(repo=repo[0], http_port=0, startup_timeout_s=90))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _request(client, prompt: str, seed: int | None = None, steps: int | None = None,
             guidance: float | None = None):
    inputs = [httpclient.InferInput("prompt", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    for name, dtype, kind, value in (("seed", np.int64, "INT64", seed), ("steps", np.int32, "INT32", steps),
                                     ("guidance_scale", np.float32, "FP32", guidance)):
        if value is not None:
            t = httpclient.InferInput(name, [1], kind)
            t.set_data_from_numpy(np.array([value], dtype=dtype))
            inputs.append(t)
    return client.infer(PIPELINE, inputs).as_numpy("image")


def _in_process(onnx_dir: Path, prompt: str, seed: int) -> np.ndarray:
    from exporter.onnx_pipeline import OnnxStableDiffusionPipeline

    pipe = OnnxStableDiffusionPipeline(onnx_dir, threads=1)
    try:
        images = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=seed).images
    finally:
        pipe.close()
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)[0]


def test_served_image_equals_in_process_pipeline(server, repo):
    assert server.models == [PIPELINE]  # pytriton's server has no ONNX Runtime backend: unet_onnx is skipped
    assert (repo[0] / UNET_ONNX / "config.pbtxt").is_file()
    client = httpclient.InferenceServerClient(server.url)
    try:
        assert client.is_server_ready() and client.is_model_ready(PIPELINE)
        served = _request(client, "a red square", seed=7)
        other = _request(client, "a red square", seed=8)
    finally:
        client.close()
    expected = _in_process(repo[1], "a red square", seed=7)
    assert served.dtype == np.uint8 and served.shape == expected.shape == (16, 16, 3)
    np.testing.assert_array_equal(served, expected)
    assert not np.array_equal(served, other), "different seeds gave the same image: the comparison means nothing"


@pytest.mark.parametrize("bad, needle", [({"steps": 0}, "steps"), ({"seed": -1}, "seed"),
                                         ({"guidance": float("nan")}, "guidance_scale"),
                                         ({"guidance": float("inf")}, "guidance_scale")],
                         ids=["steps 0", "seed -1", "guidance NaN", "guidance inf"])
def test_bad_input_is_http_400_and_server_keeps_serving(server, bad, needle):
    """A client's out-of-range input is the client's error (400), not the server's (500), and no image."""
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.url)
    try:
        with pytest.raises(InferenceServerException) as e:
            _request(client, "a cat", **{"seed": 1, **bad})
        assert e.value.status() == "400", (e.value.status(), e.value.message())
        assert needle in e.value.message() and "bad request" in e.value.message()
        assert _request(client, "a cat", seed=1).shape == (16, 16, 3)
    finally:
        client.close()
    assert server.alive()


def test_server_is_stopped_when_the_block_fails(repo):
    from exporter.triton_server import ServerOptions, TritonServer

    s = TritonServer(ServerOptions(repo=repo[0], http_port=0, models=(PIPELINE,), startup_timeout_s=90))
    with pytest.raises(RuntimeError, match="boom"):
        with s:
            pid = s.proc.pid
            raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group (server + Python-backend stub) is gone


def test_serve_cli_prints_endpoint_and_stops_on_sigterm(repo):
    from exporter.triton_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exporter.cli", "serve", "--repo", str(repo[0]),
                             "--http-port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline, lines = time.monotonic() + 90, []
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                lines.append(proc.stdout.readline())
                if "Triton ready" in lines[-1]:
                    break
        assert any(f"http://127.0.0.1:{port}" in ln for ln in lines), "".join(lines)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready(PIPELINE)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(Exception):  # noqa: B017 - connection refused, whichever exception tritonclient raises
        httpclient.InferenceServerClient(f"127.0.0.1:{port}").is_server_live()


@pytest.mark.slow
def test_fullsize_script_serves_what_the_oneshot_wrote(tmp_path):
    """scripts/oneshot_fullsize.py --serve on its tiny geometry: the one-shot's own repository is loaded by a real
    server and its image equals in-process ONNX Runtime (the same path its full-size run reports), and --native
    checks the published slim UNet against its graph at another latent size than the one-shot ran at."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "oneshot_fullsize.py"), "--tiny", "--serve",
                           "--native", "16", "--work", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    served, native = result["triton_served"], result["native_parity"]
    assert native["passed"] and native["case"] == ["batch=2 16x16"] and native["max_abs"] <= 1e-4
    assert served["models_loaded"] == [PIPELINE] and served["identical"] and served["max_abs_pixels"] == 0
