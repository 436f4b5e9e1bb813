"""`uniforget bench`: latency of the dense vs the slim UNet across runtimes, interleaved, as a table, JSON and a
chart; each ratio comes with its 95% interval and reads "within noise" when the interval contains 1."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from exporter.argtypes import int_at_least, positive_float, positive_int
from exporter.commands import STAGE_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help=STAGE_HELP["bench"],
        description="Times the model's dense UNet and a slim UNet (from an export folder or a slim-UNet folder) under "
                    "each runtime, calling the two alternately (>= 20 rounds, more until the ratio's 95% interval "
                    "is narrow enough): the median paired ratio with its interval, the FLOP ratio beside it.")
    p.add_argument("--model", default="toy", help="the dense model: 'toy' or a diffusers pipeline folder")
    p.add_argument("--slim", type=Path, required=True,
                   help="an uniforget-export output folder (engines/NAME) or a slim UNet folder (uniforget_plan.json)")
    p.add_argument("--runtimes", default=None,
                   help="comma-separated subset of eager,cuda_graph,compile,onnxruntime,tensorrt "
                        "(default: eager,onnxruntime on CPU; all on CUDA)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--fp16", action="store_true", help="torch runtimes in fp16 (GPU)")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--size", type=positive_int, default=None,
                   help="latent height = width (default: the UNet's sample_size)")
    p.add_argument("--seq-len", type=positive_int, default=77)
    p.add_argument("--runs", type=int_at_least(20, "for a stable p95 and ratio interval"), default=20,
                   help="least interleaved rounds (one call of each model per round)")
    p.add_argument("--max-runs", type=positive_int, default=None, help="most rounds (default 3 x --runs)")
    p.add_argument("--ci", type=positive_float, default=0.02,
                   help="stop adding rounds once the ratio's 95%% interval is within +- this (default 0.02)")
    p.add_argument("--warmup", type=positive_int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write results here (default: print only)")
    p.add_argument("--chart", type=Path, default=None, help="write a latency chart PNG here")
    return p


# 7 columns that fit 80 terminal columns; model, shape and device go in the title, a skipped runtime's reason
# below the table (a "note" column would squeeze every other one)
BENCH_COLUMNS = (("runtime", "left"), ("dense p50 (p95) ms", "right"), ("slim p50 (p95) ms", "right"),
                 ("latency slim / dense", "right"), ("95% interval", "right"), ("reading", "left"),
                 ("FLOPs slim / dense", "right"))


def bench_table(res: Any) -> Any:
    """The dense-vs-slim latency table of one BenchResult (exporter.bench), sized for an 80-column terminal."""
    from exporter.tables import fitted_table

    def num(x: float) -> str:  # 4 significant digits up to 9999 ms: the table is for reading, the JSON keeps all
        return f"{x:.3g}" if x < 10 else f"{x:.4g}" if x < 1000 else f"{x:.0f}"

    def ms(p50: float | None, p95: float | None) -> str:
        return "-" if p50 is None else f"{num(p50)} ({num(p95)})"

    def r(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    rows = [(row["runtime"], ms(row["dense_p50_ms"], row["dense_p95_ms"]), ms(row["slim_p50_ms"], row["slim_p95_ms"]),
             r(row["latency_ratio"]),
             "-" if row["ratio_low"] is None else f"{row['ratio_low']:.3f}-{row['ratio_high']:.3f}",
             row["verdict"] or "-", r(row["flop_ratio"])) for row in res.rows()]
    s = res.shape
    return fitted_table(BENCH_COLUMNS, rows, title=f"uniforget bench: {res.label}, batch {s['batch']} "
                        f"{s['height']}x{s['width']}, {res.device_name}")


def bench_notes(res: Any) -> list[str]:
    """One line per runtime that did not run, with the reason."""
    return [f"{row['runtime']}: {row['status']}" for row in res.rows() if row["status"] != "ok"]


def check_outputs(args: argparse.Namespace) -> None:
    """--json and --chart before the benchmark runs, not after it."""
    from exporter.publish import check_can_write_file

    for path, option in ((args.json, "--json"), (args.chart, "--chart")):
        if path is not None:
            check_can_write_file(path, option)


def run(args: argparse.Namespace) -> int:
    check_outputs(args)
    from rich.console import Console

    from exporter.bench import CPU_DEFAULT, GPU_DEFAULT, BenchOptions, bench_pair, plot, write_json
    from exporter.commands import quiet_libraries
    from exporter.errors import ExportError
    from uniforget.plan import load_source_unet

    slim_dir = args.slim / "unet" if (args.slim / "unet" / "uniforget_plan.json").is_file() else args.slim
    if not (slim_dir / "uniforget_plan.json").is_file():
        raise ExportError(f"{args.slim} is neither an export folder (unet/uniforget_plan.json) nor a slim UNet folder")
    runtimes = tuple(r.strip() for r in args.runtimes.split(",")) if args.runtimes else (
        GPU_DEFAULT if args.device == "cuda" else CPU_DEFAULT)
    opts = BenchOptions(runtimes=runtimes, batch=args.batch, height=args.size, width=args.size,
                        seq_len=args.seq_len, runs=args.runs, max_runs=args.max_runs, ci_halfwidth=args.ci,
                        warmup=args.warmup, device=args.device, fp16=args.fp16)
    quiet_libraries(getattr(args, "verbose", 0))
    dense = load_source_unet(args.model)
    trt = {"slim": args.slim / "trt" / "unet.plan"} if (args.slim / "trt" / "unet.plan").is_file() else None
    res = bench_pair(dense, slim_dir, opts, label=str(args.model), trt=trt)
    console = Console()
    console.print(bench_table(res))
    for line in bench_notes(res):
        console.print(line, highlight=False)
    from exporter.bench import ratio_sentence

    for row in res.rows():
        if row["latency_ratio"] is not None:
            console.print(ratio_sentence(row, opts.confidence), highlight=False, soft_wrap=True)
    if args.json:
        write_json([res], args.json)
    if args.chart:
        plot([res], args.chart)
    return 0
