"""Deployment side of uniforget: ONNX export and parity, TensorRT build, Triton repository, benchmark, report, CLIs.

Consumes a slim UNet (or a PruningPlan) only; TensorRT is imported lazily by `tensorrt_build` alone.
"""

__version__ = "0.1.0"
