"""The comparator returns data and is truthy only when every output of every input set is within tolerance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporter.errors import ExportError, ValidationError
from exporter.parity import ParityReport, Tolerance, check_parity, compare_arrays, compare_outputs
from exporter.runners import OnnxRuntimeRunner, TorchRunner


def _onnx_scale(factor: float) -> bytes:
    """y = x * factor as a one-node ONNX model (a real ONNX Runtime session, no mocks)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [factor])
    g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "scale", [x], [y], [k])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m.SerializeToString()


def test_identical_passes_and_is_truthy():
    a = np.linspace(-1, 1, 100, dtype=np.float32)
    r = compare_arrays("y", a, a.copy(), Tolerance())
    assert r and r.max_abs == 0 and r.max_rel == 0 and not r.nonfinite_candidate
    assert r.reference_max_abs == 1.0  # the scale a max abs is read against


def test_over_atol_fails_with_numbers():
    a = np.ones(10, dtype=np.float32)
    b = a.copy()
    b[3] += 2e-4
    r = compare_arrays("y", a, b, Tolerance(atol=1e-4))
    assert not r and r.max_abs == pytest.approx(2e-4, rel=1e-3) and "atol" in r.detail
    assert compare_arrays("y", a, b, Tolerance(atol=0, rtol=3e-4))  # rtol rule: |d| <= rtol*|ref|


@pytest.mark.parametrize("where,bad", [("candidate", np.nan), ("candidate", np.inf), ("reference", np.nan)])
def test_nonfinite_always_fails(where, bad):
    a = np.zeros(5, dtype=np.float32)
    b = a.copy()
    (b if where == "candidate" else a)[2] = bad
    r = compare_arrays("y", a, b, Tolerance(atol=1e9, rtol=1e9))
    assert not r and "NaN/Inf" in r.detail and where in r.detail


def test_shape_mismatch_and_missing_output_fail():
    a = np.zeros((2, 3), dtype=np.float32)
    assert not compare_arrays("y", a, a.T, Tolerance())
    c = compare_outputs({"y": a, "z": a}, {"y": a})
    assert not c and [o.name for o in c.outputs if not o] == ["z"]


def test_report_lists_every_failure():
    a = np.zeros(4, dtype=np.float32)
    cases = (compare_outputs({"y": a}, {"y": a + 1}, label="b=1"), compare_outputs({"y": a}, {"y": a}, label="b=2"),
             compare_outputs({"y": a}, {"y": a - 1}, label="b=3"))
    rep = ParityReport("torch", "onnxruntime", Tolerance(), cases)
    assert not rep and rep.max_abs == 1.0
    with pytest.raises(ValidationError) as e:
        rep.raise_on_failure()
    assert len(e.value.failures) == 2 and "[b=1]" in e.value.failures[0] and "[b=3]" in e.value.failures[1]
    assert rep.to_dict()["passed"] is False
    assert not ParityReport("a", "b", Tolerance(), ())  # nothing compared is not a pass


def test_check_parity_with_real_onnxruntime():
    feeds = [(f"n={n}", {"x": np.arange(n, dtype=np.float32)}) for n in (1, 7)]
    same = check_parity(OnnxRuntimeRunner(_onnx_scale(2.0), name="ref"), OnnxRuntimeRunner(_onnx_scale(2.0)), feeds)
    assert same and len(same.cases) == 2
    off = check_parity(OnnxRuntimeRunner(_onnx_scale(2.0), name="ref"), OnnxRuntimeRunner(_onnx_scale(2.001)), feeds)
    assert not off and off.max_abs == pytest.approx(0.006, rel=1e-3)


def test_torch_runner_against_onnxruntime():
    feeds = [("n=5", {"x": np.linspace(-3, 3, 5, dtype=np.float32)})]

    class Doubler(torch.nn.Module):
        def forward(self, x):
            return x * 2.0

    ref = TorchRunner(Doubler(), ["x"], ["y"])
    assert check_parity(ref, OnnxRuntimeRunner(_onnx_scale(2.0)), feeds)


def test_runner_protocol():
    r = OnnxRuntimeRunner(_onnx_scale(3.0))
    with pytest.raises(ExportError, match="before activate"):
        r.infer({"x": np.ones(2, np.float32)})
    with r:
        assert r.is_active
        assert r.infer({"x": np.ones(2, np.float64)})["y"].tolist() == [3.0, 3.0]  # cast to the declared dtype
        with pytest.raises(ExportError, match="missing"):
            r.infer({"z": np.ones(2, np.float32)})
    assert not r.is_active and r.session is None
    with pytest.raises(ExportError, match="could not load"):
        OnnxRuntimeRunner(b"not an onnx model").activate()
