"""`uniforget export`: slim (or dense) UNet folder -> ONNX (+ the whole pipeline), gated on ONNX Runtime parity."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from exporter.argtypes import nonnegative_float
from exporter.commands import STAGE_HELP

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help=STAGE_HELP["export"],
                              description="Writes OUT/unet.onnx (+ OUT/pipeline/ in optimum's ONNX layout) and "
                                          "OUT/export.json; fails (exit 2) when ONNX Runtime misses the tolerance.")
    p.add_argument("--unet", required=True, type=Path, help="slim UNet folder (uniforget_plan.json) or diffusers UNet folder")
    p.add_argument("--out", required=True, type=Path, help="output folder, e.g. engines/NAME/onnx")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and compute (fp32 inputs/outputs)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    p.add_argument("--external-data", action="store_true", help="always store weights as external data "
                   "(automatic above 2 GB)")
    p.add_argument("--fast-fold", action="store_true", help="onnx's shape inference while folding constants "
                   "instead of ONNX Runtime's symbolic one: ~3x faster export, ~10%% more shape nodes left")
    p.add_argument("--atol", type=nonnegative_float, default=None,
                   help="parity tolerance (default 1e-4 fp32, 5e-2 fp16)")
    p.add_argument("--rtol", type=nonnegative_float, default=None,
                   help="relative parity tolerance (default 0 fp32, 5e-2 fp16)")
    p.add_argument("--pipeline", metavar="MODEL", default=None,
                   help="also export text encoder + this UNet + VAE decoder of MODEL (pipeline folder or 'toy')")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from exporter.onnx_export import FP16_TOLERANCE, ExportRequest, OnnxExportOptions, run_export
    from exporter.parity import Tolerance
    from exporter.publish import check_can_create, check_model

    check_can_create(args.out, "--out")  # before the UNet is loaded and traced; run_export refuses an existing one
    if args.pipeline is not None:
        check_model(args.pipeline, "--pipeline")
    options = OnnxExportOptions(opset=args.opset, fp16=args.fp16, external_data=True if args.external_data else None,
                                symbolic_shapes=not args.fast_fold)
    tol = None
    if args.atol is not None or args.rtol is not None:
        base = FP16_TOLERANCE if args.fp16 else Tolerance()
        tol = Tolerance(atol=base.atol if args.atol is None else args.atol,
                        rtol=base.rtol if args.rtol is None else args.rtol)
    summary = run_export(ExportRequest(unet=args.unet, out=args.out, options=options, tolerance=tol,
                                       pipeline=args.pipeline, overwrite=args.overwrite))
    u = summary.unet
    log.info("%s: %d -> %d nodes, %.1f MB, export %.2f s; %s", u.path, u.nodes_exported, u.nodes_folded,
             u.file_bytes / 1e6, u.export_seconds, summary.unet_parity.summary())
    if summary.pipeline is not None:
        log.info("pipeline: %s", summary.pipeline.folder)
    log.info("summary: %s", summary.summary_path)
    return 0
