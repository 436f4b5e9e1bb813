#!/usr/bin/env python
"""Where a UNet's ONNX Runtime time goes, by operator type, dense against slim: why latency != FLOPs.

    OMP_NUM_THREADS=1 python scripts/bench_sd15_cpu.py --size 16 --ratios 0.25 --ablation-ratio 9 --no-optimizer \
        --runs 20 --max-runs 20 --work W          # writes W/dense/unet.onnx and W/r0.25-a8/unet.onnx
    OMP_NUM_THREADS=1 python scripts/profile_ort_ops.py --dense W/dense/unet.onnx --slim W/r0.25-a8/unet.onnx --size 16

Why: on SD1.5 geometry the slim/dense latency ratio sits 2-5 points above the FLOP ratio, more at larger ratios
(README, "Speed"). This runs `--calls` profiled calls of each graph (ONNX Runtime's own profiler, after
`--warmup` untimed calls; the two graphs alternate so a neighbour's burst hits both) and sums node time per
operator type. It prints, per type: dense ms, slim ms, slim/dense, and each type's share of the time the slim
graph saved (or lost). Batch `--batch`, a `--size` x `--size` latent, `--seq-len` tokens, fp32, the CPU provider.
Writes `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path


def main() -> None:
    import onnxruntime as ort

    from exporter.tensorrt_build import DimRange, ShapeRanges, make_feeds, onnx_inputs, profile_shapes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--slim", type=Path, required=True)
    ap.add_argument("--size", type=int, required=True, help="latent height = width")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=77)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calls", type=int, default=6, help="profiled calls per graph")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=14, help="operator types to print (by dense time)")
    ap.add_argument("--json", type=Path, default=Path("runs/profile_ort_ops.json"))
    args = ap.parse_args()
    for p in (args.dense, args.slim):
        if not p.is_file():
            raise SystemExit(f"error: {p} does not exist")

    inputs = onnx_inputs(args.dense)  # one shape per input, by axis role (tensorrt_build), and seeded values
    one = ShapeRanges(*(DimRange.fixed(n) for n in (args.batch, args.size, args.size, args.seq_len)), static=True)
    feed = make_feeds(inputs, {name: opt for name, (_, opt, _) in profile_shapes(inputs, one).items()})

    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, path in (("dense", args.dense), ("slim", args.slim)):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, name)
            sessions[name] = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        for _ in range(args.warmup):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(args.calls):
            for s in sessions.values():
                s.run(None, feed)
        per_type: dict[str, dict[str, float]] = defaultdict(lambda: {"dense": 0.0, "slim": 0.0})
        nodes: dict[str, dict[str, int]] = defaultdict(lambda: {"dense": 0, "slim": 0})
        totals = {}
        for name, s in sessions.items():
            events = json.loads(Path(s.end_profiling()).read_text())
            runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
            timed = runs[args.warmup:]  # the first model_run events are the warm-up calls
            t_lo = min(e["ts"] for e in timed)
            seen: set[str] = set()
            for e in events:
                if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < t_lo:
                    continue
                op = e.get("args", {}).get("op_name", "?")
                per_type[op][name] += e["dur"] / 1e3 / args.calls
                node = e["name"].removesuffix("_kernel_time")
                if node not in seen:
                    seen.add(node)
                    nodes[op][name] += 1
            totals[name] = sum(e["dur"] for e in timed) / 1e3 / len(timed)

    kernels = {n: sum(v[n] for v in per_type.values()) for n in ("dense", "slim")}
    saved = kernels["dense"] - kernels["slim"]
    order = sorted(per_type, key=lambda k: -per_type[k]["dense"])
    print(f"dense {args.dense}: {totals['dense']:.1f} ms per call; slim {args.slim}: {totals['slim']:.1f} ms "
          f"(x{totals['slim'] / totals['dense']:.3f}); kernel time {kernels['dense']:.1f} -> {kernels['slim']:.1f} ms "
          f"(x{kernels['slim'] / kernels['dense']:.3f}); {args.calls} profiled calls each, {args.threads} thread(s)")
    print(f"{'op type':<22}{'nodes d/s':>11}{'dense ms':>10}{'slim ms':>9}{'slim/dense':>11}{'share of saving':>17}")
    for op in order[:args.top]:
        d, s = per_type[op]["dense"], per_type[op]["slim"]
        ratio = f"{s / d:.3f}" if d > 0 else "new"
        share = f"{(d - s) / saved:+.1%}" if saved else "-"
        print(f"{op:<22}{nodes[op]['dense']:>5}/{nodes[op]['slim']:<5}{d:>10.2f}{s:>9.2f}{ratio:>11}{share:>17}")
    rest = order[args.top:]
    if rest:
        d = sum(per_type[o]["dense"] for o in rest)
        s = sum(per_type[o]["slim"] for o in rest)
        print(f"{'(' + str(len(rest)) + ' other types)':<22}{'':>11}{d:>10.2f}{s:>9.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"dense": str(args.dense), "slim": str(args.slim), "size": args.size,
                                     "batch": args.batch, "calls": args.calls, "threads": args.threads,
                                     "ms_per_call": totals, "kernel_ms": kernels, "per_op_type_ms": per_type, "nodes": nodes},
                                    indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
