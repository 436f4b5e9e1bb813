#!/usr/bin/env python
"""One exported UNet under four ONNX Runtime session setups, interleaved in one run: does fixing the shapes or
running ONNX Runtime's transformer optimizer make the per-call time smaller?

    OMP_NUM_THREADS=1 python scripts/bench_ort_session.py --onnx W/onnx/unet/model.onnx --size 8 --seq-len 32
    # W: the --work folder of `scripts/bench_e2e.py --model toy --work W` (or any uniforget-export output)

Variants: `plain` (the graph as exported, dynamic batch/height/width/sequence), `fixed` (the same graph with
ONNX Runtime's free-dimension overrides set to the pipeline's shapes, so shape-dependent work is planned once),
`optimized` (exporter.onnx_optimize's CPU fusions), `optimized+fixed`. Why: the toy's UNet call is a few
milliseconds over ~1,000 small nodes, so per-node overhead rather than arithmetic may set its time, and the
end-to-end target (ORT pipeline >= 3x diffusers eager) is missed on the toy.

Inputs are those of one classifier-free-guidance step (batch 2 = unconditional + conditional). Each variant's
output is checked against `plain` first (max abs difference), then every round times `--calls` calls of each
variant in a rotated order; ratios are per-round paired against `plain` (exporter.bench.ratio_estimate), with
"within noise" when the interval contains 1. Prints a table and writes `--json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import onnxruntime as ort

    from exporter.bench import ratio_estimate
    from exporter.onnx_optimize import node_count, optimize_unet_onnx
    from exporter.tensorrt_build import DimRange, ShapeRanges, make_feeds, onnx_inputs, profile_shapes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, required=True, help="an exported UNet (bench_e2e: W/onnx/unet/model.onnx; uniforget-export: OUT/onnx/pipeline/unet/model.onnx)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, required=True, help="latent height = width (toy: 8, SD1.5 at 512 px: 64)")
    ap.add_argument("--seq-len", type=int, default=77, help="text tokens (toy: 32)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=10, help="calls per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("runs/bench_ort_session.json"))
    args = ap.parse_args()
    if not args.onnx.is_file():
        raise SystemExit(f"error: {args.onnx} does not exist (export a pipeline first: uniforget-export or "
                         "scripts/bench_e2e.py --work DIR)")

    inputs = onnx_inputs(args.onnx)  # one shape per input, by axis role (tensorrt_build), and seeded values
    one = ShapeRanges(*(DimRange.fixed(n) for n in (args.batch, args.size, args.size, args.seq_len)), static=True)
    shapes = {name: opt for name, (_, opt, _) in profile_shapes(inputs, one).items()}
    feed = make_feeds(inputs, shapes)
    # ONNX Runtime's overrides name the graph's symbolic dims (batch, height, width, sequence)
    dims = {d: shapes[i.name][axis] for i in inputs for axis, d in enumerate(i.dims) if isinstance(d, str)}

    def session(path: Path, fixed: bool) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
        for name, value in dims.items() if fixed else ():
            so.add_free_dimension_override_by_name(name, value)
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])

    with tempfile.TemporaryDirectory() as tmp:
        opt_path = Path(tmp) / "model.onnx"
        opt = optimize_unet_onnx(args.onnx, opt_path)
        nodes = {"plain": node_count(args.onnx), "optimized": node_count(opt_path)}
        variants = {"plain": session(args.onnx, False), "fixed": session(args.onnx, True),
                    "optimized": session(opt_path, False), "optimized+fixed": session(opt_path, True)}
        ref = variants["plain"].run(None, feed)[0]
        diff = {k: float(np.abs(s.run(None, feed)[0] - ref).max()) for k, s in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    variants[k].run(None, feed)
                times[k].append((time.perf_counter() - t0) / args.calls * 1e3)

    rows = {}
    print(f"{args.onnx}: {nodes['plain']} nodes, optimized {nodes['optimized']} ({opt.summary()}); "
          f"fixed dims {dims}; {args.rounds} rounds x {args.calls} calls, {args.threads} thread(s)")
    print(f"{'variant':<16}{'median ms':>10}{'vs plain [95% CI]':>26}  {'verdict':<14}{'max|d|':>9}")
    for k in names:
        est = ratio_estimate(times["plain"], times[k])
        rows[k] = {"median_ms": statistics.median(times[k]), "ratio": est.ratio, "low": est.low, "high": est.high,
                   "verdict": "reference" if k == "plain" else est.verdict.replace("slim ", ""),
                   "max_abs_diff": diff[k], "ms": times[k]}
        ci = "reference" if k == "plain" else f"x{est.ratio:.3f} [{est.low:.3f}, {est.high:.3f}]"
        print(f"{k:<16}{rows[k]['median_ms']:>10.3f}{ci:>26}  {rows[k]['verdict']:<14}{diff[k]:>9.1e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"onnx": str(args.onnx), "nodes": nodes, "fixed_dims": dims,
                                     "threads": args.threads, "rounds": args.rounds, "calls": args.calls,
                                     "machine": platform.processor() or platform.machine(), "variants": rows},
                                    indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
