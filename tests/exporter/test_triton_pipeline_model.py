"""The Triton Python-backend pipeline model (exporter/triton_models/pipeline/model.py) without a server: a
client's out-of-range or non-finite input is refused by the pure `request_params` and answered as INVALID_ARG
(HTTP 400), a failure while generating as INTERNAL (HTTP 500), and a bad request never reaches the pipeline.
The real server's HTTP codes are checked in test_triton_e2e.py."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

MODEL_PY = Path(__file__).resolve().parents[2] / "exporter" / "triton_models" / "pipeline" / "model.py"


class FakeTritonError(Exception):
    """pb_utils.TritonError as the 23.x+ Python backend has it: a message and a code."""

    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.message, self.code = message, code


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeResponse:
    def __init__(self, output_tensors=(), error: FakeTritonError | None = None) -> None:
        self.outputs, self.error = list(output_tensors), error


@pytest.fixture()
def model(monkeypatch):
    """model.py imported with a stand-in for triton_python_backend_utils (only the stub process has the real one)."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TritonError, pb.Tensor, pb.InferenceResponse = FakeTritonError, FakeTensor, FakeResponse
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("uniforget_triton_pipeline_model", MODEL_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _params(model, **values):
    return model.request_params({"prompt": b"a red square", **values}, default_steps=20, default_guidance=7.5,
                                max_steps=1000)


def test_defaults_and_good_values(model):
    assert _params(model) == {"prompt": "a red square", "negative_prompt": None, "num_inference_steps": 20,
                              "guidance_scale": 7.5, "seed": None}
    p = _params(model, negative_prompt=b"blurry", seed=0, steps=1000, guidance_scale=0.0)
    assert (p["negative_prompt"], p["seed"], p["num_inference_steps"], p["guidance_scale"]) == ("blurry", 0, 1000, 0.0)
    assert _params(model, seed=2**63 - 1)["seed"] == 2**63 - 1
    assert _params(model, prompt="plain str")["prompt"] == "plain str"


@pytest.mark.parametrize("values, needle", [
    ({"steps": 0}, "steps"),
    ({"steps": -3}, "steps"),
    ({"steps": 1001}, "steps"),
    ({"seed": -1}, "seed"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": math.inf}, "guidance_scale"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"guidance_scale": 1e6}, "guidance_scale"),
    ({"prompt": b"\xff\xfe"}, "prompt is not UTF-8"),
    ({"steps": True}, "steps"),
])
def test_out_of_range_inputs_are_bad_requests(model, values, needle):
    with pytest.raises(model.BadRequest, match=needle):
        _params(model, **values)


def test_every_problem_is_named_at_once(model):
    with pytest.raises(model.BadRequest) as e:
        _params(model, steps=0, seed=-1, guidance_scale=math.nan)
    assert all(k in str(e.value) for k in ("steps", "seed", "guidance_scale"))


class _Pipe:
    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = [], fail

    def __call__(self, prompt, **kw):
        self.calls.append((prompt, kw))
        if self.fail:
            raise RuntimeError("onnxruntime fell over")
        return types.SimpleNamespace(images=np.full((1, 4, 4, 3), 0.5, dtype=np.float32))


def _instance(model, pipe):
    m = model.TritonPythonModel()
    m.steps, m.guidance, m.max_steps, m.pipe = 20, 7.5, 1000, pipe
    return m


def _request(**inputs):
    dtypes = {"prompt": object, "negative_prompt": object, "seed": np.int64, "steps": np.int32,
              "guidance_scale": np.float32}
    return {k: FakeTensor(k, np.array([v], dtype=dtypes[k])) for k, v in inputs.items()}


def test_execute_answers_client_and_server_errors_with_their_codes(model):
    pipe = _Pipe()
    m = _instance(model, pipe)
    good, bad_steps, bad_seed, nan_g = (_request(prompt=b"a cat", seed=1), _request(prompt=b"a cat", steps=0),
                                        _request(prompt=b"a cat", seed=-1),
                                        _request(prompt=b"a cat", guidance_scale=np.float32("nan")))
    responses = m.execute([good, bad_steps, bad_seed, nan_g])
    assert responses[0].error is None and responses[0].outputs[0].array.dtype == np.uint8
    for r, needle in zip(responses[1:], ("steps", "seed", "guidance_scale"), strict=True):
        assert r.error is not None and r.error.code == FakeTritonError.INVALID_ARG and needle in r.error.message
    assert len(pipe.calls) == 1 and pipe.calls[0] == ("a cat", {"negative_prompt": None, "num_inference_steps": 20,
                                                                "guidance_scale": 7.5, "seed": 1})
    failed = _instance(model, _Pipe(fail=True)).execute([good])[0]
    assert failed.error.code == FakeTritonError.INTERNAL and "onnxruntime fell over" in failed.error.message


def test_backends_without_error_codes_still_get_the_message(model, monkeypatch):
    class OldTritonError(Exception):  # Python backend before error codes: TritonError(message) only
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.message = message

    monkeypatch.setattr(model.pb_utils, "TritonError", OldTritonError)
    err = model.triton_error("bad request: steps", client=True)
    assert isinstance(err, OldTritonError) and err.message == "bad request: steps"
