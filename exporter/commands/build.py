"""`uniforget build`: TensorRT engine (--trt) and/or Triton model repository (--triton) from an exported model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.argtypes import int_at_least, int_between, nonnegative_float, positive_float, positive_int
from exporter.commands import STAGE_HELP
from exporter.errors import ExportError
from uniforget.errors import UniforgetError

if TYPE_CHECKING:
    from exporter.tensorrt_build import OnnxGraphFacts

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build", help=STAGE_HELP["build"],
        description="Build OUT/trt (TensorRT engine + build.json, parity-checked against ONNX Runtime fp32) and/or "
                    "OUT/triton (model repository: UNet ONNX, UNet plan, whole-pipeline Python model).")
    p.add_argument("--out", type=Path, required=True, help="output root, e.g. engines/NAME (holds onnx/ already)")
    p.add_argument("--onnx", type=Path, help="UNet ONNX (default: OUT/onnx/unet.onnx, else OUT/onnx/pipeline/unet)")
    p.add_argument("--pipeline", type=Path, help="exported ONNX pipeline folder (default: OUT/onnx/pipeline)")
    p.add_argument("--trt", action="store_true", help="build the TensorRT engine into OUT/trt (needs TensorRT + GPU)")
    p.add_argument("--triton", action="store_true", help="write the Triton model repository into OUT/triton")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/trt or OUT/triton")
    t = p.add_argument_group("TensorRT")
    t.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="fp16 kernels (default on)")
    t.add_argument("--strongly-typed", action=argparse.BooleanOptionalAction, default=None,
                   help="strongly typed network (default: on exactly when the ONNX is fp16)")
    t.add_argument("--static", action="store_true", help="one fixed shape (the opt values) instead of ranges")
    for dim, hint in (("batch", "UNet batch, 2x prompts under guidance"), ("latent", "latent height and width"),
                      ("seq-len", "text length")):
        for which in ("min", "opt", "max"):
            t.add_argument(f"--{which}-{dim}", type=int, help=f"{which} {hint}")
    t.add_argument("--workspace-gib", type=positive_float, default=8.0, help="builder workspace limit (GiB)")
    t.add_argument("--opt-level", type=int_between(0, 5), default=3, help="builder optimization level 0..5")
    t.add_argument("--timing-cache", type=Path, help="timing cache file, loaded when present and updated after")
    t.add_argument("--reference-onnx", type=Path, help="fp32 ONNX for parity (default: --onnx)")
    t.add_argument("--rtol", type=nonnegative_float, default=1e-2, help="parity rtol vs ONNX Runtime fp32")
    t.add_argument("--atol", type=nonnegative_float, default=5e-3, help="parity atol vs ONNX Runtime fp32")
    r = p.add_argument_group("Triton")
    r.add_argument("--max-batch-size", type=int_at_least(0, "0 = batching off"), default=0,
                   help="Triton batching along dim 0 (0: off)")
    r.add_argument("--dynamic-batching", action="store_true", help="let Triton merge requests (needs batching)")
    r.add_argument("--max-queue-delay-us", type=int_at_least(0), default=100)
    r.add_argument("--instances", type=positive_int, default=1, help="model instances per device")
    r.add_argument("--instance-kind", choices=("cpu", "gpu", "auto"), default="cpu")
    r.add_argument("--steps", type=positive_int, default=20, help="pipeline model's default sampler steps")
    r.add_argument("--guidance-scale", type=nonnegative_float, default=7.5, help="pipeline model's default guidance")
    r.add_argument("--threads", type=int_at_least(0, "0 = ONNX Runtime default"), default=0,
                   help="ONNX Runtime threads in the pipeline model (0: default)")
    r.add_argument("--pipeline-unet", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                   help="runtime of the UNet inside the pipeline model")
    r.add_argument("--python-env", type=Path, help="EXECUTION_ENV_PATH for the Python backend (default .venv-triton)")
    r.add_argument("--no-python-env", action="store_true",
                   help="write no EXECUTION_ENV_PATH (the server's own Python runs the pipeline model)")
    return p


def _default_onnx(out: Path) -> Path:
    for cand in (out / "onnx" / "unet.onnx", out / "onnx" / "pipeline" / "unet" / "model.onnx"):
        if cand.is_file():
            return cand
    raise UniforgetError(f"no UNet ONNX under {out}/onnx: run `uniforget export` first or pass --onnx")


def _check_onnx(path: Path, option: str) -> OnnxGraphFacts:
    """An ONNX file whose graph parses (weights in external data are not read), before any build starts; what
    it read is handed to the build, which then need not parse the graph again."""
    from exporter.publish import check_input_file
    from exporter.tensorrt_build import onnx_graph_facts

    check_input_file(path, option)
    try:
        return onnx_graph_facts(path)
    except ExportError as e:
        raise UniforgetError(f"{option} {path} is not a readable ONNX model: {e.__cause__ or e}") from None


def _sample_size(onnx: Path) -> int:
    """Latent size the UNet was trained at (config.json beside an exported UNet), for default profile ranges."""
    cfg = onnx.parent / "config.json"
    try:
        return int(json.loads(cfg.read_text()).get("sample_size", 64))
    except (OSError, ValueError, TypeError):
        return 64


def run(args: argparse.Namespace) -> int:
    from exporter.tensorrt_build import BuildOptions, DimRange, ShapeRanges, build_engine
    from exporter.triton_repo import TritonRepoOptions, write_repository

    if not (args.trt or args.triton):
        raise UniforgetError("nothing to build: pass --trt (TensorRT engine) and/or --triton (model repository)")
    facts = _check_onnx(args.onnx, "--onnx") if args.onnx else None
    onnx = args.onnx if args.onnx else _default_onnx(args.out)
    if args.reference_onnx:
        _check_onnx(args.reference_onnx, "--reference-onnx")
    if args.pipeline is not None and not args.triton:
        raise UniforgetError("--pipeline names the ONNX pipeline for the Triton repository: add --triton")
    trt_dir = args.out / "trt"
    if args.trt:
        s = _sample_size(onnx)

        def rng(name: str, d_min: int, d_opt: int, d_max: int) -> DimRange:
            v = [getattr(args, f"{w}_{name}") for w in ("min", "opt", "max")]
            return DimRange(*(x if x is not None else d for x, d in zip(v, (d_min, d_opt, d_max), strict=True)))

        latent = rng("latent", max(1, s // 2), s, s * 2)
        ranges = ShapeRanges(batch=rng("batch", 1, 2, 4), height=latent, width=latent,
                             seq_len=rng("seq_len", 77, 77, 77), static=args.static)
        res = build_engine(BuildOptions(
            onnx=onnx, out_dir=trt_dir, fp16=args.fp16, strongly_typed=args.strongly_typed, ranges=ranges,
            workspace_gib=args.workspace_gib, builder_optimization_level=args.opt_level,
            timing_cache=args.timing_cache, reference_onnx=args.reference_onnx, rtol=args.rtol, atol=args.atol,
            overwrite=args.overwrite), facts=facts)
        print(f"engine: {res.plan} ({res.seconds:.1f} s); record: {res.build_json}")
    if args.triton:
        default = args.out / "onnx" / "pipeline"  # an explicit --pipeline is checked by write_repository
        pipeline = args.pipeline if args.pipeline is not None else default if default.is_dir() else None
        res = write_repository(TritonRepoOptions(
            out_dir=args.out / "triton", unet_onnx=onnx,
            trt_dir=trt_dir if (trt_dir / "unet.plan").is_file() else None,
            pipeline_dir=pipeline, python_env=args.python_env,
            execution_env=not args.no_python_env,
            max_batch_size=args.max_batch_size, dynamic_batching=args.dynamic_batching,
            max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, instance_kind=args.instance_kind,
            steps=args.steps, guidance_scale=args.guidance_scale, threads=args.threads,
            pipeline_unet=args.pipeline_unet, overwrite=args.overwrite))
        print(f"Triton repository: {res.path} (models: {', '.join(res.models)}); serve it: uniforget serve --repo {res.path}")
    return 0
