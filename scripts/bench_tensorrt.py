#!/usr/bin/env python
"""TensorRT engine vs ONNX Runtime for a UNet: build (fp16, profiles), parity vs ONNX Runtime fp32, latency.
Needs TensorRT and an NVIDIA GPU; prints a table and writes JSON.

    python scripts/bench_tensorrt.py [--onnx UNET.onnx | --geometry sd1|sd15] [--batch 2] [--latent 64]
        [--iters 50] [--json engines/bench/tensorrt.json]

Without --onnx it exports a random-weight UNet of the named geometry (uniforget.geometries: `sd15` is SD1.5's
full UNet shape, `sd1` the tiny test one) with the project's exporter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(runner, feed, iters: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        runner.infer(feed)
    ms = []
    for _ in range(iters):
        t = time.perf_counter()
        runner.infer(feed)  # host outputs: includes the device->host copy, as a server would
        ms.append((time.perf_counter() - t) * 1e3)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--geometry", choices=("sd1", "sd15"), default="sd15")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=77)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rtol", type=float, default=1e-2)
    ap.add_argument("--atol", type=float, default=5e-3)
    ap.add_argument("--json", type=Path, default=ROOT / "engines" / "bench" / "tensorrt.json")
    args = ap.parse_args()

    from exporter.parity import Tolerance, check_parity
    from exporter.runners import OnnxRuntimeRunner
    from exporter.tensorrt_build import (
        BuildOptions,
        DimRange,
        ShapeRanges,
        TensorRTRunner,
        build_engine,
        import_tensorrt,
        make_feeds,
        onnx_inputs,
    )

    import_tensorrt()  # fail first, with what to install
    work = Path(tempfile.mkdtemp(prefix="bench-trt-"))
    onnx = args.onnx
    if onnx is None:
        from exporter.onnx_export import export_unet
        from uniforget.geometries import SD15, TINY, build_unet

        onnx = work / "onnx" / "unet.onnx"
        print(f"exporting a random-weight {args.geometry} UNet ...", flush=True)
        export_unet(build_unet(SD15 if args.geometry == "sd15" else TINY["sd1"]), onnx,
                    height=args.latent, width=args.latent)
    b, s = args.batch, args.latent
    ranges = ShapeRanges(batch=DimRange(1, b, max(b, 4)), height=DimRange(max(8, s // 2), s, s * 2),
                         width=DimRange(max(8, s // 2), s, s * 2), seq_len=DimRange(args.seq_len, args.seq_len, 77))
    res = build_engine(BuildOptions(onnx=onnx, out_dir=work / "trt", fp16=True, ranges=ranges,
                                    rtol=args.rtol, atol=args.atol, timing_cache=work / "timing.cache"))
    inputs = onnx_inputs(onnx)
    shapes = {i.name: (b, 4, s, s) if len(i.dims) == 4 else (b, args.seq_len, i.dims[2]) if len(i.dims) == 3
              else (b,) for i in inputs}
    feed = make_feeds(inputs, shapes, seed=1)
    rows = {}
    trt_runner = TensorRTRunner(res.plan)
    providers = {"onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "onnxruntime-cpu": ["CPUExecutionProvider"]}
    with trt_runner:
        rows["tensorrt-fp16"] = timed(trt_runner, feed, args.iters)
        for name, prov in providers.items():
            try:
                with OnnxRuntimeRunner(onnx, providers=prov, name=name) as ort:
                    if name == "onnxruntime-cuda" and "CUDAExecutionProvider" not in ort.session.get_providers():
                        continue
                    rows[name] = timed(ort, feed, args.iters if "cuda" in name else max(3, args.iters // 10))
            except Exception as e:  # onnxruntime-gpu missing: report the rows that ran
                print(f"skipping {name}: {e}")
    parity = check_parity(OnnxRuntimeRunner(onnx), TensorRTRunner(res.plan), [(f"b{b} {s}x{s}", feed)],
                          Tolerance(atol=args.atol, rtol=args.rtol))
    record = json.loads(res.build_json.read_text())
    out = {"onnx": str(onnx), "geometry": None if args.onnx else args.geometry, "batch": b, "latent": s,
           "build": record, "parity_at_bench_shape": parity.to_dict(),
           "latency": {k: {"median_ms": statistics.median(v), "n": len(v)} for k, v in rows.items()}}
    print(f"\n{record['gpu']['name']} (sm {record['gpu']['compute_capability']}), TensorRT {record['tensorrt_version']}, "
          f"batch {b}, latent {s}x{s}; build {record['build_seconds']:.1f} s")
    print(f"{'runtime':<20}{'median ms':>12}")
    for k, v in rows.items():
        print(f"{k:<20}{statistics.median(v):>12.2f}")
    print(parity.summary())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0 if parity.passed else 1


if __name__ == "__main__":
    from uniforget.errors import run_script

    run_script(main)
