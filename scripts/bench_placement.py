"""Is a slim/dense eager ratio the models, or where this process put them? Blocks of interleaved rounds, in one process.

    python scripts/bench_placement.py --slim engines/toy-auto-r0.05 --blocks 8 --rounds 30 --out runs/placement.json

`uniforget bench` pairs dense and slim calls round by round and bootstraps the ratio over rounds, which covers the
noise that changes from round to round. It cannot cover an offset that stays for a whole process, such as where the
two models' weights landed in memory. This script times `--blocks` blocks of `--rounds` interleaved eager rounds
(exporter.bench.interleaved, ABBA order), twice: on the same two modules for every block ("same"), then on fresh
deep copies of both for each block ("copied"), and prints each block's ratio with its interval and the spread of the
block ratios. If "same" blocks agree with each other but differ from "copied" ones, the offset belongs to the
placement, not to the models (README, Speed: "Not everywhere on the toys").
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy", help="the dense model: 'toy' or a diffusers pipeline folder")
    ap.add_argument("--slim", required=True, help="an uniforget-export folder or a slim UNet folder")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per block (>= 20)")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args()
    if args.blocks < 2:
        ap.error("--blocks must be >= 2 (a spread needs two blocks)")

    from exporter.bench import (
        BenchOptions,
        eager_call,
        in_fresh_memory,
        interleaved,
        ratio_estimate,
        torch_inputs,
    )
    from exporter.onnx_export import load_unet
    from uniforget.models import load_pipeline

    slim_dir = Path(args.slim) / "unet" if (Path(args.slim) / "unet").is_dir() else Path(args.slim)
    dense = load_pipeline(args.model).unet.eval()
    slim = load_unet(slim_dir).eval()
    h = int(dense.config.sample_size)
    opts = replace(BenchOptions(runtimes=("eager",), runs=args.rounds, max_runs=args.rounds), height=h, width=h)
    out: dict = {"model": args.model, "slim": str(slim_dir), "rounds": args.rounds, "modes": {}}
    print(f"{'mode':<7} {'block':>5} {'dense p50 ms':>12}  slim/dense [95% interval]")
    for mode in ("same", "copied"):
        rows = []
        for b in range(args.blocks):
            d, s = (in_fresh_memory(dense), in_fresh_memory(slim)) if mode == "copied" else (dense, slim)
            calls = {"dense": eager_call(d, torch_inputs(d, opts)), "slim": eager_call(s, torch_inputs(s, opts))}
            ms = interleaved(calls, opts)
            e = ratio_estimate(ms["dense"], ms["slim"], seed=b)
            rows.append({"block": b, "ratio": e.ratio, "low": e.low, "high": e.high, "verdict": e.verdict,
                         "dense_p50_ms": statistics.median(ms["dense"])})
            print(f"{mode:<7} {b:>5} {rows[-1]['dense_p50_ms']:>12.2f}  {e.describe()}", flush=True)
        ratios = [r["ratio"] for r in rows]
        summary = {"mean": statistics.fmean(ratios), "sd": statistics.stdev(ratios),
                   "slower_blocks": sum(r["verdict"] == "slim slower" for r in rows),
                   "faster_blocks": sum(r["verdict"] == "slim faster" for r in rows)}
        out["modes"][mode] = {"blocks": rows, **summary}
        print(f"{mode}: block ratios mean {summary['mean']:.4f}, sd {summary['sd']:.4f}; "
              f"{summary['slower_blocks']} of {args.blocks} blocks 'slim slower', {summary['faster_blocks']} 'faster'")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
