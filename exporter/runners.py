"""One runner protocol for every backend: `activate()`, `infer(feed) -> outputs`, `deactivate()`.

Why: parity checks compare a reference stage against a candidate stage (torch vs ONNX Runtime,
ONNX Runtime vs TensorRT) with the same code, so each backend only has to say how it loads and runs.
A runner maps input names to NumPy arrays and returns output names to NumPy arrays. It is a context
manager; `infer` outside `with` (or before `activate()`) is an error. A TensorRT runner lives in
`exporter.tensorrt_build` against this same base; nothing here imports TensorRT.

Only NumPy is imported at module level: `OnnxRuntimeRunner` must also work where torch is absent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ExportError, MissingDependencyError

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


class Runner:
    """Base runner. Subclasses implement `_activate`, `_infer` and `_deactivate`; the base keeps state."""

    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False

    def activate(self) -> None:
        """Load the model / create the session. Idempotent."""
        if not self.is_active:
            self._activate()
            self.is_active = True

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run one inference on named NumPy inputs; returns named NumPy outputs (copies, host memory)."""
        if not self.is_active:
            raise ExportError(f"{self.name}: infer() called before activate() (use the runner as a context manager)")
        return self._infer(feed)

    def deactivate(self) -> None:
        """Release the session / device memory. Idempotent."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- for subclasses
    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass


class TorchRunner(Runner):
    """Runs a torch module called positionally with `input_names` from the feed (missing optional ones -> None).

    The module returns a tensor or a tuple of tensors, mapped in order to `output_names`.
    """

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str],
                 device: str = "cpu", name: str = "torch") -> None:
        super().__init__()
        self.module = module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.device = device
        self.name = name

    def _activate(self) -> None:
        self.module.eval().to(self.device)

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        import torch

        unknown = set(feed) - set(self.input_names)
        if unknown:
            raise ExportError(f"{self.name}: unknown inputs {sorted(unknown)} (expects {list(self.input_names)})")
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) if n in feed else None
                for n in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self.output_names):
            raise ExportError(f"{self.name}: module returned {len(outs)} outputs, expected {list(self.output_names)}")
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.output_names, outs, strict=True)}


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file (or serialized bytes) in ONNX Runtime; casts each input to the dtype the model declares.

    `threads` sets intra-op threads (None: ONNX Runtime's default, or OMP_NUM_THREADS when that is set).
    """

    def __init__(self, model: str | os.PathLike | bytes, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, name: str = "onnxruntime") -> None:
        super().__init__()
        self.model = model if isinstance(model, bytes) else os.fspath(model)
        self.providers = tuple(providers)
        self.threads = threads
        self.name = name
        self.session: Any = None
        self.input_types: dict[str, Any] = {}
        self.output_names: tuple[str, ...] = ()

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from e
        so = ort.SessionOptions()
        threads = self.threads
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.model, sess_options=so, providers=list(self.providers))
        except Exception as e:  # ORT raises its own exception types; one line for the user
            raise ExportError(f"{self.name}: ONNX Runtime could not load {self._label()}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        self.input_types = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def _label(self) -> str:
        return "<bytes>" if isinstance(self.model, bytes) else self.model

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        unknown = set(feed) - set(self.input_types)
        missing = set(self.input_types) - set(feed)
        if unknown or missing:
            raise ExportError(f"{self.name}: inputs do not match the model: missing {sorted(missing)}, "
                              f"unknown {sorted(unknown)}")
        cast = {n: np.asarray(a, dtype=self.input_types[n]) if self.input_types[n] is not None else np.asarray(a)
                for n, a in feed.items()}
        outs = self.session.run(list(self.output_names), cast)
        return dict(zip(self.output_names, outs, strict=True))

    def _deactivate(self) -> None:
        self.session = None
