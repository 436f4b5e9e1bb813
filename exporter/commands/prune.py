"""`uniforget prune`: physically remove the planned units and write the slim UNet directory.

    uniforget prune --model toy|PATH [--unet DIR] --masks masks.safetensors --ratio 0.05|auto [--align 8] --out DIR
    uniforget prune --model toy|PATH [--unet DIR] --plan plan.json --out DIR

Checks slim == gated (fp32, max abs <= --atol) at the reference input before anything is written; the
directory appears only when complete. Prints the before/after table (parameters, FLOPs, removed shares).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.argtypes import nonnegative_float
from exporter.commands import STAGE_HELP, DocstringFormatter, quiet_libraries
from uniforget.configs import parse_ratio

from .plan import add_model_args, check_align, check_sources, print_plan_table, reference_shape


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prune", help=STAGE_HELP["prune"], description=__doc__,
                              formatter_class=DocstringFormatter)
    add_model_args(p)
    p.add_argument("--masks", type=Path, default=None, help="MaskSet file (masks.safetensors)")
    p.add_argument("--ratio", default=None, help="'auto' or the fraction of UNet parameters to remove, in [0, 1)")
    p.add_argument("--plan", type=Path, default=None, help="use this plan.json instead of --masks/--ratio")
    p.add_argument("--out", type=Path, required=True, help="slim UNet directory to write")
    p.add_argument("--plan-out", type=Path, default=None, help="also write the plan here (it is always in --out)")
    p.add_argument("--atol", type=nonnegative_float, default=1e-5, help="parity tolerance slim vs gated (fp32 max abs)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from exporter.publish import check_can_create, check_input_file
    from uniforget.errors import PlanError

    if args.plan is None and (args.masks is None or args.ratio is None):
        raise PlanError("give --masks and --ratio, or --plan")
    ratio = None if args.ratio is None else parse_ratio(args.ratio)
    ref, align = reference_shape(args), check_align(args.align)
    check_can_create(args.out, "--out", replace=args.overwrite)  # before the model is loaded
    check_sources(args)
    if args.plan is not None:
        check_input_file(args.plan, "--plan")
    quiet_libraries(getattr(args, "verbose", 0))
    from uniforget.slim_io import PruneRequest, prune_to_dir

    req = PruneRequest(out=args.out, masks=args.masks, ratio=ratio, plan=args.plan, model=args.model,
                       unet_dir=args.unet, reference_shape=ref, atol=args.atol, overwrite=args.overwrite,
                       plan_out=args.plan_out, align=align)
    res = prune_to_dir(req)
    print_plan_table(res.plan, f"slim UNet -> {res.out}")
    print(f"parity slim vs gated: max abs {res.parity.max_abs:.2e} at {res.parity.shape} "
          f"(tolerance {res.parity.atol:g})")
    return 0
