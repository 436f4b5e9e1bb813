"""`uniforget validate`: memorization and quality numbers of a model (before/after masks) as a table and JSON."""

from __future__ import annotations

import argparse

from exporter.argtypes import count_or_zero, nonnegative_float, positive_float, positive_int
from exporter.commands import STAGE_HELP, quiet_libraries


def _norms(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers like 0.05,0.1,0.2, got {text!r}") from e


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate", help=STAGE_HELP["validate"],
        description="Generate for the memorized captions and held-out neutral prompts; print copy rate, nearest-"
                    "neighbour identity, SSIM, judge accuracy, neutral copies, Wen noise-norm AUC and copy rates "
                    "under perturbed trigger embeddings. With --masks: before and after gating, plus drift.")
    p.add_argument("--model", default="toy", help="'toy' (default), a diffusers pipeline folder, or a .safetensors file")
    p.add_argument("--masks", help="a masks.safetensors MaskSet to evaluate against the original")
    p.add_argument("--slim", action="append", default=[], metavar="DIR",
                   help="a slim UNet folder (prune or retrain output) to evaluate against the original; repeatable")
    p.add_argument("--spec", help="toy dataset spec JSON (default: the shipped one)")
    p.add_argument("--prompts", help="evaluation prompts for any model: JSON with 'neutral' prompts and 'memorized' "
                                     "captions, each with an optional reference 'image' (overrides --spec)")
    p.add_argument("--empty-seeds", type=count_or_zero, default=48,
                   help="empty-prompt generations for the global-mode check (default 48; 0 = skip)")
    p.add_argument("--judge", help="judge folder (default: beside the model, else the shipped one)")
    p.add_argument("--seeds", type=positive_int, default=8, help="seeds per memorized caption (default 8)")
    p.add_argument("--neutral-seeds", type=positive_int, default=1, help="seeds per neutral prompt (default 1)")
    p.add_argument("--neutral-prompts", type=positive_int, default=None,
                   help="use this many held-out neutral prompts (default all)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the model's own, else 20)")
    p.add_argument("--guidance", type=nonnegative_float, default=None,
                   help="guidance scale (default: the model's own, else 5)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--perturb", type=_norms, default=(0.05, 0.1, 0.2),
                   help="relative norms of random trigger-embedding perturbations (default 0.05,0.1,0.2; '' = none)")
    p.add_argument("--optimized-norm", type=positive_float, default=0.1, help="norm ball of the optimized perturbation")
    p.add_argument("--no-optimized", action="store_true", help="skip the optimized perturbation")
    p.add_argument("--json", dest="json_path", help="write every number to this JSON file")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle checkpoint you trust")
    return p


def check_paths(args: argparse.Namespace) -> None:
    """Every input and the --json output before the model loads: one line, exit 2."""
    from pathlib import Path

    from exporter.publish import (
        check_can_write_file,
        check_eval_prompts_file,
        check_input_file,
        check_model,
        check_slim_folder,
    )
    from uniforget.errors import UniforgetError

    if args.json_path:
        check_can_write_file(Path(args.json_path), "--json")
    check_model(args.model)
    if args.masks:
        check_input_file(args.masks, "--masks", safetensors=True)
    for slim in args.slim:
        check_slim_folder(slim, "--slim")
    if args.spec:
        check_input_file(args.spec, "--spec")
    if args.judge and not Path(args.judge).is_dir():
        raise UniforgetError(f"--judge folder not found: {args.judge}")
    if args.prompts:
        check_eval_prompts_file(args.prompts, "--prompts")


def run(args: argparse.Namespace) -> int:
    check_paths(args)
    from rich.console import Console

    from exporter.tables import fitted_table
    from uniforget.evaluate import EvalConfig, ValidateOptions, table_rows, validate

    cfg = EvalConfig(seeds=args.seeds, neutral_seeds=args.neutral_seeds, neutral_prompts=args.neutral_prompts,
                     steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
                     perturb_norms=args.perturb, optimized_norm=None if args.no_optimized else args.optimized_norm,
                     empty_seeds=args.empty_seeds, progress=not getattr(args, "quiet", False))
    quiet_libraries(getattr(args, "verbose", 0))
    report = validate(ValidateOptions(model=args.model, masks=args.masks, slims=tuple(args.slim), spec=args.spec, prompts=args.prompts,
                                      judge=args.judge,
                                      config=cfg, json_path=args.json_path, allow_pickle=args.allow_pickle))
    table = fitted_table([("measure", "left"), *((e.label, "right") for e in report.evaluations)],
                         [(name, *cells) for name, cells in table_rows(report.evaluations)],
                         title=f"uniforget validate: {report.model}")
    console = Console()
    console.print(table)
    for e in report.evaluations:
        console.print(f"{e.label}: {e.signature.reading}")
    if args.json_path:
        console.print(f"wrote {args.json_path}")
    return 0
