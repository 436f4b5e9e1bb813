"""`uniforget-export`: the one-shot. Parse -> ExportOptions -> exporter.oneshot.run_export -> summary table."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any


def _ratio(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a fraction like 0.05 or 'auto', got {text!r}") from None


def _norms(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers like 0.05,0.1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from exporter.cli import OneLineErrorParser, add_single_file_options

    p = OneLineErrorParser(
        prog="uniforget-export",
        description="Checkpoint -> masks -> plan -> slim UNet -> ONNX (+ pipeline) -> TensorRT (--trt) -> Triton "
                    "repository -> validation -> report, into engines/NAME (written to a temporary sibling and "
                    "renamed into place only when every stage passed its parity gate).")
    p.add_argument("--model", default="toy", help="'toy' (default, the embedded testbed), a diffusers pipeline folder, or a single-file "
                   "SD1.x/SD2.x/SDXL .safetensors checkpoint (loaded offline with shipped configs)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--masks", type=Path, help="a masks.safetensors MaskSet learned for this model")
    src.add_argument("--beta", default="auto",
                     help="auto (default: the strongest mask whose drift on held-out neutral prompts stays within "
                          "budget), weak, medium, strong, or a number; the model's shipped MaskSet for it is used, "
                          "else one is learned")
    add_single_file_options(p)
    p.add_argument("--ratio", type=_ratio, default=0.05,
                   help="fraction of UNet parameters to remove, or 'auto' (exactly the closed gates); default 0.05")
    p.add_argument("--align", type=int, default=8,
                   help="round each module's kept width up to a multiple of this (zero-gated units fill it; "
                        "1 = exact widths); default 8")
    p.add_argument("--ort-optimize", action="store_true",
                   help="fuse the ONNX pipeline's UNet with ONNX Runtime's transformer optimizer (CPU fusions), gated "
                        "against torch again; off by default (no measured CPU gain); onnx/unet.onnx is never fused")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (needs TensorRT and a GPU)")
    p.add_argument("--fp16", action="store_true", help="TensorRT engine in fp16 (with --trt)")
    p.add_argument("--out", type=Path, help="output folder (default engines/<model>-<beta>-r<ratio>)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an existing output folder (--overwrite, as the stages spell it)")
    p.add_argument("--learn-steps", type=int, default=300, help="mask-learning steps when no MaskSet is found")
    p.add_argument("--prompts", type=Path,
                   help="neutral prompts to learn (and retrain) from, one per line (default: the toy's own "
                        "training prompts for the toy, else the shipped generic list)")
    p.add_argument("--retrain-steps", type=int, default=0,
                   help="brief neutral retrain of the slim UNet against the original (default 0 = off)")
    p.add_argument("--tune-weights", type=float, default=0.0, metavar="LR",
                   help="learn the masks jointly with a fine-tuned copy of the UNet's weights at this rate, against "
                        "the frozen original (with --beta auto each rung continues from the rung below's weights; "
                        "default 0 = off, the paper's recipe; docs/dememorization.md 0h)")
    v = p.add_argument_group("validation (defaults sized to keep the toy's run within ~10 min on 2 CPU cores)")
    v.add_argument("--no-validate", action="store_true", help="skip memorization/quality evaluation and latency")
    v.add_argument("--seeds", type=int, default=8, help="seeds per memorized caption (default 8)")
    v.add_argument("--neutral-prompts", type=int, default=None,
                   help="held-out neutral prompts to generate (default: all of them)")
    v.add_argument("--neutral-seeds", type=int, default=1, help="seeds per neutral prompt (default 1)")
    v.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's own)")
    v.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own)")
    v.add_argument("--perturb", type=_norms, default=(),
                   help="relative norms of random trigger-embedding perturbations (default none, e.g. 0.05,0.1)")
    v.add_argument("--optimized-perturbation", type=float, default=0.1, metavar="NORM",
                   help="norm ball of the optimized trigger-embedding perturbation (default 0.1)")
    v.add_argument("--no-optimized", action="store_true", help="skip the optimized perturbation")
    v.add_argument("--empty-seeds", type=int, default=48,
                   help="empty-prompt generations for the global-mode check (default 48; 0 = skip)")
    v.add_argument("--no-controls", action="store_true",
                   help="skip the random-removal and shuffled-gates controls at matched drift")
    v.add_argument("--eval-prompts", type=Path,
                   help="any model: JSON with 'neutral' prompts and 'memorized' captions (optional reference images)")
    v.add_argument("--bench-runs", type=int, default=20, help="timed UNet calls per runtime (>= 20)")
    v.add_argument("--eval-spec", type=Path, help="dataset spec (toy format) naming the memorized items to test")
    t = p.add_argument_group("parity tolerances (the report records the measured maxima)")
    t.add_argument("--slim-atol", type=float, default=1e-5, help="slim vs gated UNet, fp32 (default 1e-5)")
    t.add_argument("--onnx-atol", type=float, default=1e-4, help="ONNX Runtime vs torch, fp32 (default 1e-4)")
    t.add_argument("--trt-atol", type=float, default=5e-3, help="TensorRT vs ONNX Runtime fp32 (default 5e-3)")
    t.add_argument("--trt-rtol", type=float, default=1e-2, help="TensorRT vs ONNX Runtime fp32 (default 1e-2)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


class RichObserver:
    """One line per stage (spinner while it runs, a bar where the stage knows its length)."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)
        self._status: Any = None
        self._progress: Any = None
        self._task: Any = None

    def start(self, name: str, total: int | None = None) -> None:
        self._stop()
        if total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(name, total=total)
        else:
            self._status = self.console.status(f"{name} ...")
            self._status.start()

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def done(self, record: Any) -> None:
        self._stop()
        self.console.print(f"[green]✓[/green] [bold]{record.name:<18}[/bold] {record.summary} "
                           f"[dim]({record.seconds:.1f} s)[/dim]", highlight=False)

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    close = _stop


def options_from_args(args: argparse.Namespace):
    from exporter.oneshot import ExportOptions, Tolerances, ValidationSize, python_command

    return ExportOptions(
        model=args.model, masks=args.masks, beta=args.beta, ratio=args.ratio, align=args.align,
        ort_optimize=args.ort_optimize, trt=args.trt,
        fp16=args.fp16,
        out=args.out, force=args.force, validate=not args.no_validate, learn_steps=args.learn_steps,
        eval_spec=args.eval_spec, eval_prompts=args.eval_prompts, retrain_steps=args.retrain_steps,
        tune_weights=args.tune_weights,
        prompts=args.prompts,
        progress=not args.quiet,
        tolerances=Tolerances(slim_atol=args.slim_atol, onnx_atol=args.onnx_atol, trt_atol=args.trt_atol,
                              trt_rtol=args.trt_rtol),
        size=ValidationSize(seeds=args.seeds, neutral_prompts=args.neutral_prompts, neutral_seeds=args.neutral_seeds,
                            perturb_norms=args.perturb,
                            optimized_norm=None if args.no_optimized else args.optimized_perturbation,
                            empty_seeds=args.empty_seeds, controls=not args.no_controls, steps=args.steps,
                            guidance=args.guidance,
                            bench_runs=args.bench_runs),
        command=python_command(getattr(args, "argv", None)))


def _measured(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def summary_table(res: Any) -> Any:
    """The closing table: what was removed, memorization before -> after, parity maxima, latency (the report's
    path is printed below it, whole, so it can be copied)."""
    from exporter.tables import fitted_table

    rows = []
    p = res.plan
    rows.append(("parameters removed", f"{p['ratio_achieved']:.2%} ({p['params_before']:,} -> {p['params_after']:,})"))
    if p.get("flop_ratio") is not None:
        rows.append(("FLOPs slim/dense", f"{p['flop_ratio']:.3f}"))
    if res.evaluation is not None:
        ev = res.evaluation
        o, s = ev["original"], ev.get("retrained") or ev["slim"]
        if _measured(o.memorized.copy_rate):
            rows.append(("memorized copy rate", f"{o.memorized.copy_rate:.1%} -> {s.memorized.copy_rate:.1%}"))
            rows.append(("planted image nearest", f"{o.memorized.nn_identity:.1%} -> {s.memorized.nn_identity:.1%}"))
        else:  # no reference images: a nan% row would read as a measurement
            rows.append(("memorized copy rate", "not measured (no reference images)"))
        for key in o.perturbed:
            rows.append((f"copy rate, trigger {key}",
                         f"{o.perturbed[key].copy_rate:.1%} -> {s.perturbed[key].copy_rate:.1%}"))
        if o.judge_accuracy is not None:
            rows.append(("neutral judge accuracy", f"{o.judge_accuracy:.1%} -> {s.judge_accuracy:.1%}"))
        if o.wen_auc is not None and s.wen_auc is not None:
            rows.append(("Wen AUC", f"{o.wen_auc:.3f} -> {s.wen_auc:.3f}"))
        if s.drift_neutral is not None:
            rows.append(("neutral drift (RMS)", f"{s.drift_neutral:.4f}"))
        for name, c in (ev.get("controls") or {}).items():
            rows.append((f"control {name}: copy rate", f"{c.memorized.copy_rate:.1%} (drift {c.drift_neutral:.4f})"))
    for gate, g in res.parity.items():
        scale = f" (of {g['reference_max_abs']:.2g})" if g.get("reference_max_abs") is not None else ""
        rows.append((f"parity: {gate}", f"{g['max_abs']:.2e}{scale}" if g.get("max_abs") is not None else "-"))
    if res.bench is not None:
        for row in res.bench.rows():
            if row["latency_ratio"] is not None:
                rows.append((f"latency {row['runtime']} (p50 ms)",
                             f"{row['dense_p50_ms']:.1f} -> {row['slim_p50_ms']:.1f} (x{row['latency_ratio']:.2f} "
                             f"[{row['ratio_low']:.2f}, {row['ratio_high']:.2f}], {row['verdict']})"))
    rows.append(("wall time", f"{res.wall_seconds:.0f} s"))
    return fitted_table(("measure", ("value", "right")), rows, title=f"uniforget-export: {res.out}")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from exporter.commands import quiet_libraries
    from exporter.oneshot import preflight, run_export

    opts = options_from_args(args)
    preflight(opts)  # every refusal that needs nothing loaded, before torch or diffusers is even imported
    quiet_libraries(args.verbose)
    obs = RichObserver(quiet=args.quiet)
    try:
        res = run_export(opts, obs)
    finally:
        obs.close()
    console = Console(quiet=args.quiet)
    if res.verdict is not None:
        console.print(res.verdict if isinstance(res.verdict, str) else res.verdict.sentence, highlight=False,
                      soft_wrap=True)
    console.print(summary_table(res))
    console.print(f"report: {res.report.get('markdown', '')}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(build_parser().parse_args()))
