"""`uniforget plan`: turn a MaskSet into a PruningPlan (plan.json) and print the before/after table.

    uniforget plan --model toy|PATH [--unet DIR] --masks masks.safetensors --ratio 0.05|auto --out plan.json
        [--ref-batch 1] [--ref-size 64] [--ref-seq 77]

`--ratio auto` removes exactly the closed gates; a number removes units, most closed first, until that
fraction of UNet parameters is gone. Every module keeps at least one head / neuron / channel. `--align 8`
(default) rounds each module's kept width up to a multiple of 8 with zero-gated units; `--align 1` is exact.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.argtypes import int_at_least, positive_int
from exporter.commands import STAGE_HELP, DocstringFormatter, quiet_libraries
from uniforget.configs import DEFAULT_ALIGN, ReferenceShape, parse_ratio

if TYPE_CHECKING:
    from uniforget.plan import PruningPlan


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --unet / reference-shape options shared by `plan` and `prune`."""
    p.add_argument("--model", default="toy", help="'toy', a diffusers pipeline folder or a .safetensors checkpoint")
    p.add_argument("--unet", type=Path, default=None, metavar="DIR",
                   help="a diffusers UNet folder (config.json + safetensors); overrides --model")
    p.add_argument("--ref-batch", type=positive_int, default=1, help="batch of the FLOP/parity reference input")
    p.add_argument("--ref-size", type=positive_int, default=None,
                   help="latent height=width of the reference input (default: the UNet's sample_size)")
    p.add_argument("--ref-seq", type=positive_int, default=77, help="text tokens of the reference input")
    p.add_argument("--align", type=int_at_least(1, "1 = exact widths"), default=DEFAULT_ALIGN,
                   help="round each module's kept width up to a multiple of this; the units added back stay as "
                        f"zero-gated weights, so the slim model is unchanged (1 = exact widths; default {DEFAULT_ALIGN})")


def check_align(align: int) -> int:
    """--align before the model is loaded: a whole number >= 1."""
    if align < 1:
        from uniforget.errors import PlanError

        raise PlanError(f"--align must be >= 1 (1 = exact widths), got {align}")
    return align


def reference_shape(args: argparse.Namespace) -> ReferenceShape | None:
    if args.ref_size is None and args.ref_batch == 1 and args.ref_seq == 77:
        return None  # the UNet's native size, decided once the UNet is loaded
    from uniforget.errors import PlanError

    if args.ref_batch < 1 or args.ref_seq < 1 or (args.ref_size is not None and args.ref_size < 1):
        raise PlanError("--ref-batch, --ref-size and --ref-seq must be positive")
    if args.ref_size is None:
        raise PlanError("--ref-batch/--ref-seq need --ref-size too")
    return ReferenceShape(args.ref_batch, args.ref_size, args.ref_size, args.ref_seq)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help=STAGE_HELP["plan"], description=__doc__,
                              formatter_class=DocstringFormatter)
    add_model_args(p)
    p.add_argument("--masks", type=Path, required=True, help="MaskSet file (masks.safetensors)")
    p.add_argument("--ratio", required=True, help="'auto' or the fraction of UNet parameters to remove, in [0, 1)")
    p.add_argument("--out", type=Path, default=Path("plan.json"), help="plan file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def check_sources(args: argparse.Namespace) -> None:
    """--masks, --unet and --model before the model loads (plan and prune): one line, exit 2."""
    from exporter.publish import check_input_file, check_model
    from uniforget.errors import UniforgetError

    if args.masks is not None:
        check_input_file(args.masks, "--masks", safetensors=True)
    if args.unet is not None:
        if not args.unet.is_dir():
            raise UniforgetError(f"--unet {args.unet} is not a UNet folder (config.json + safetensors)")
    else:
        check_model(args.model)


def plan_table(plan: PruningPlan, title: str):
    """The before/after table (parameters, FLOPs, units per kind), sized for an 80-column terminal."""
    from exporter.tables import fitted_table

    return fitted_table((("", "left"), ("before", "right"), ("after", "right"), ("change", "right")),
                        plan.summary_rows(), title=title)


def print_plan_table(plan: PruningPlan, title: str) -> None:
    """The before/after table (rich) on stdout."""
    from rich.console import Console

    Console().print(plan_table(plan, title))


def run(args: argparse.Namespace) -> int:
    from exporter.publish import check_can_write_file

    ratio, ref, align = parse_ratio(args.ratio), reference_shape(args), check_align(args.align)
    check_can_write_file(args.out, "--out", replace=args.overwrite)
    check_sources(args)
    quiet_libraries(getattr(args, "verbose", 0))
    from uniforget.plan import PlanRequest, plan_from_request

    plan = plan_from_request(PlanRequest(masks=args.masks, ratio=ratio, model=args.model, unet_dir=args.unet,
                                         reference_shape=ref, out=args.out, align=align))
    print_plan_table(plan, f"plan (ratio {plan.ratio_requested}) -> {args.out}")
    return 0
