"""ONNX Runtime's own transformer optimizer on an exported UNet, for the CPU provider, with the torch parity gate.

Why its own module: `onnxruntime.transformers.optimizer` (model_type "unet") already fuses what a UNet's
transformer blocks spell out op by op (LayerNorm, Gelu / BiasGelu, residual + LayerNorm into SkipLayerNorm);
this module only picks the fusions the CPU provider has kernels for and checks the result.
Its unet defaults target CUDA: GroupNorm / SkipGroupNorm / BiasSplitGelu / BiasAdd and packed QKV/KV are CUDA-only
contrib ops, and NHWC convolutions plus fp16 are GPU layouts, so those are switched off here; a graph they
produced would not load on a CPU session at all.

The optimized graph uses com.microsoft contrib ops, which TensorRT's ONNX parser does not read: the plain
`onnx/unet.onnx` stays the TensorRT input, and the optimized file is what ONNX Runtime sessions load.

onnxruntime is imported on first use (the module imports with NumPy alone).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExportError, MissingDependencyError

log = logging.getLogger(__name__)

# fusions whose contrib ops have CPU kernels (the rest of FusionOptions("unet") stays off)
CPU_FUSIONS = ("enable_gelu", "enable_layer_norm", "enable_skip_layer_norm", "enable_bias_skip_layer_norm",
               "enable_bias_gelu")
# Attention -> MultiHeadAttention stays off: its head-count detection (fusion_attention_unet.get_num_heads) calls
# int() on a 1-element array, which NumPy 2 refuses (TypeError) on SD-size graphs, and a fixed --num_heads would
# be wrong for pruned attentions, whose head counts differ per module.
GPU_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_packed_qkv",
                    "enable_packed_kv", "enable_bias_add", "enable_nhwc_conv", "enable_embed_layer_norm",
                    "enable_rotary_embeddings", "enable_qordered_matmul", "enable_gemm_fast_gelu",
                    "enable_gelu_approximation", "enable_attention")


@dataclass(frozen=True)
class OptimizeResult:
    """What the optimizer did: node counts before/after, op types it introduced, where the graph went."""

    path: Path
    nodes_before: int
    nodes_after: int
    seconds: float
    fused_ops: dict[str, int] = field(default_factory=dict)  # op type -> count, for ops the input did not have

    def summary(self) -> str:
        fused = ", ".join(f"{k} x{v}" for k, v in sorted(self.fused_ops.items())) or "no fusions"
        return f"{self.nodes_before} -> {self.nodes_after} nodes ({fused}) in {self.seconds:.1f} s"


def cpu_fusion_options(num_heads: int = 0) -> Any:
    """FusionOptions("unet") restricted to fusions with CPU kernels (see CPU_FUSIONS for what stays off, and why)."""
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
    except ImportError as e:
        raise MissingDependencyError("the ONNX Runtime transformer optimizer needs onnxruntime: "
                                     "pip install onnxruntime") from e
    opts = FusionOptions("unet")
    for name in GPU_ONLY_FUSIONS:
        if hasattr(opts, name):
            setattr(opts, name, False)
    for name in CPU_FUSIONS:
        if hasattr(opts, name):
            setattr(opts, name, True)
    return opts


def _op_counts(model: Any) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def optimize_unet_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> OptimizeResult:
    """Fuse `src` (an exported UNet) for the CPU provider into `dst` (may equal `src`); external data kept where
    the source has it or the graph needs it (> 2 GB). ExportError in one line when the optimizer fails."""
    import onnx

    try:
        from onnxruntime.transformers import optimizer
    except ImportError as e:
        raise MissingDependencyError("the ONNX Runtime transformer optimizer needs onnxruntime: "
                                     "pip install onnxruntime") from e
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    try:
        before = onnx.load(str(src), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, OSError: one line naming the file
        raise ExportError(f"{src} is not a readable ONNX model: {type(e).__name__}: {e}") from e
    n_before, ops_before = len(before.graph.node), _op_counts(before)
    old_data = next((e.value for t in before.graph.initializer for e in t.external_data if e.key == "location"),
                    None)
    del before
    try:
        # opt_level 0: graph fusions only; ONNX Runtime applies its own level when the session loads the file
        opt = optimizer.optimize_model(str(src), model_type="unet", num_heads=0, hidden_size=0,
                                       optimization_options=cpu_fusion_options(), opt_level=0, use_gpu=False)
    except Exception as e:  # the optimizer raises assorted types; the user needs one line
        raise ExportError(f"ONNX Runtime's transformer optimizer failed on {src}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    model = opt.model
    ops_after, n_after = _op_counts(model), len(model.graph.node)
    # external data where the source had it (a > 2 GB UNet, or the user's layout), or where protobuf needs it
    large = old_data is not None or sum(t.ByteSize() for t in model.graph.initializer) > 2**31 - 2**26
    dst.parent.mkdir(parents=True, exist_ok=True)
    # in place, the data file keeps the source's name (optimum's layout reads model.onnx_data); else <dst>.data
    data_name = (old_data or dst.name + ".data") if dst.resolve() == src.resolve() else dst.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-", dir=dst.parent))
    try:
        opt.save_model_to_file(str(staging / dst.name), use_external_data_format=large, all_tensors_to_one_file=True)
        del opt, model
        if large:
            _point_external_data(staging / dst.name, data_name)
            # onnx creates the data file 0600: give it the model file's (umask) permissions, as the export does,
            # so a server running as another user (Triton's container) can read the weights
            os.chmod(staging / (dst.name + ".data"), (staging / dst.name).stat().st_mode & 0o777)
            os.replace(staging / (dst.name + ".data"), dst.parent / data_name)
        os.replace(staging / dst.name, dst)
        if old_data and (not large or old_data != data_name) and dst.resolve() == src.resolve():
            (dst.parent / old_data).unlink(missing_ok=True)  # the replaced graph's weights, now unreferenced
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fused = {k: v for k, v in ops_after.items() if k not in ops_before}
    res = OptimizeResult(dst, n_before, n_after, time.perf_counter() - t0, fused)
    log.info("ONNX Runtime optimizer: %s", res.summary())
    return res


def _point_external_data(model_path: Path, data_name: str) -> None:
    """Rename the external data file every tensor of `model_path` refers to (the graph only is rewritten)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = data_name
    onnx.save(m, str(model_path))


def optimize_unet_validated(unet: Any, src: str | os.PathLike, dst: str | os.PathLike, tol: Any = None,
                            cases: Sequence[tuple[int, int, int]] | None = None) -> tuple[OptimizeResult, Any]:
    """Optimize, then gate the optimized graph against torch exactly as the plain export is gated
    (`onnx_export.validate_unet`); over tolerance raises ValidationError and `dst` is removed."""
    from .onnx_export import validate_unet

    res = optimize_unet_onnx(src, dst)
    try:
        report = validate_unet(unet, res.path, tol, cases=cases)
    except BaseException:
        if Path(dst) != Path(src):
            for p in (Path(dst), Path(str(dst) + ".data")):
                p.unlink(missing_ok=True)
        raise
    return res, report


def node_count(path: str | os.PathLike) -> int:
    """Nodes in an ONNX graph's main graph (weights not loaded)."""
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


__all__ = ["OptimizeResult", "cpu_fusion_options", "optimize_unet_onnx", "optimize_unet_validated", "node_count"]
