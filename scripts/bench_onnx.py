#!/usr/bin/env python
"""CPU latency of one UNet call, one run: dense torch eager, slim torch eager, dense ONNX Runtime, slim ONNX Runtime.

Each variant: warm-up calls, then N timed calls on the same inputs; median and p95 in ms, ratios against
dense torch eager. Prints a table and writes JSON. The slim UNet is a slim UNet folder (--slim DIR) or,
for speed only, one pruned with random gate logits to --ratio of the parameters (its outputs are not
meaningful; its shapes are what a real plan of that ratio produces). Each ONNX model passes the parity
gate before it is timed.

    OMP_NUM_THREADS=1 python scripts/bench_onnx.py --model toy --ratio 0.3 --json runs/bench_onnx.json
    OMP_NUM_THREADS=1 python scripts/bench_onnx.py --geometry sd1 --ratio 0.3 --batch 2 --size 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exporter.onnx_export import (
    OnnxExportOptions,
    export_unet,
    load_unet,
    unet_for_onnx,
    unet_inputs,
    unet_spec,
    validate_unet,
)
from exporter.runners import OnnxRuntimeRunner, Runner, TorchRunner

log = logging.getLogger("bench_onnx")


def random_slim(unet, ratio: float, seed: int = 0):
    """Prune `ratio` of the parameters using random gate logits (latency only: the outputs mean nothing)."""
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.plan import make_plan
    from uniforget.prune import prune_unet
    from uniforget.targets import discover_targets

    g = torch.Generator().manual_seed(seed)
    ms = MaskSet({t.key: torch.rand(t.size, generator=g) * 2 - 1 for t in discover_targets(unet)},
                 model_fingerprint(unet))
    plan = make_plan(unet, ms, ratio, with_flops=False)
    return prune_unet(unet, plan), plan


def time_runner(r: Runner, feed: dict, warmup: int, iters: int) -> list[float]:
    with r:
        for _ in range(warmup):
            r.infer(feed)
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            r.infer(feed)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="pipeline folder or 'toy': benchmark its UNet")
    src.add_argument("--unet", default=None, help="diffusers UNet folder")
    src.add_argument("--geometry", default=None, help="random-init geometry: sd1, sd2, sdxl (TINY) or sd15")
    p.add_argument("--slim", default=None, help="slim UNet folder (else --ratio with random logits)")
    p.add_argument("--ratio", type=float, default=None, help="prune this fraction of parameters (random logits)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=None, help="latent height = width (default: the UNet's sample_size)")
    p.add_argument("--seq-len", type=int, default=77)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads "
                   "(default: OMP_NUM_THREADS or the library defaults)")
    p.add_argument("--only", choices=["dense", "slim"], default=None,
                   help="one variant only (e.g. to halve memory for an SD1.5-size UNet)")
    p.add_argument("--export-only", action="store_true", help="export + parity per variant, no latency timing")
    p.add_argument("--fast-fold", action="store_true", help="onnx shape inference while folding (faster export)")
    p.add_argument("--json", type=Path, default=Path("runs/bench_onnx.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("exporter", "uniforget", "polygraphy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threads = args.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
    if threads:
        torch.set_num_threads(threads)

    if args.geometry:
        from uniforget.geometries import SD15, TINY, build_unet

        dense = build_unet(SD15 if args.geometry == "sd15" else TINY[args.geometry])
        source = f"geometry {args.geometry} (random weights)"
    elif args.unet:
        dense, source = load_unet(args.unet), args.unet
    else:
        from uniforget.models import load_pipeline

        dense, source = load_pipeline(args.model or "toy").unet.eval(), args.model or "toy"
    variants = {} if args.only == "slim" else {"dense": dense}
    slim_note = None
    if args.only == "dense":
        pass
    elif args.slim:
        variants["slim"], slim_note = load_unet(args.slim), f"slim folder {args.slim}"
    elif args.ratio:
        slim, plan = random_slim(dense, args.ratio)
        variants["slim"] = slim
        if args.only == "slim":
            del dense  # free the dense weights before exporting
        slim_note = f"random logits, ratio requested {args.ratio}, achieved {plan.ratio_achieved:.3f}"

    ref = next(iter(variants.values()))
    size = args.size or ref.config.sample_size
    feed = unet_inputs(ref, args.batch, size, size, seq_len=args.seq_len, seed=0)
    spec = unet_spec(ref)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, unet in variants.items():
            params = sum(p.numel() for p in unet.parameters())
            ex = export_unet(unet, Path(tmp) / f"{name}.onnx", OnnxExportOptions(symbolic_shapes=not args.fast_fold))
            m = 2 ** (len(unet.config.block_out_channels) - 1)
            cases = [(1, size, size), (args.batch, size, size + m)]  # a second, non-square resolution
            rep = validate_unet(unet, ex.path, cases=cases, seq_len=args.seq_len)
            results[f"{name} onnx"] = {"export": ex.to_dict(), "parity": rep.to_dict()}
            print(f"{name}: params {params:,}; export {ex.export_seconds:.2f} s (total with folding+checks "
                  f"{ex.total_seconds:.2f} s); nodes {ex.nodes_exported} -> {ex.nodes_folded}; "
                  f"{ex.file_bytes / 1e6:.1f} MB{' (external data)' if ex.external_data_path else ''}; "
                  f"parity vs torch over {cases}: max abs {rep.max_abs:.3g}, max rel {rep.max_rel:.3g}", flush=True)
            if args.export_only:
                continue
            torch_ms = time_runner(TorchRunner(unet_for_onnx(unet), spec.input_names, spec.output_names), feed,
                                   args.warmup, args.iters)
            ort_ms = time_runner(OnnxRuntimeRunner(ex.path, threads=threads), feed, args.warmup, args.iters)
            for rt, ms in (("torch eager", torch_ms), ("onnxruntime", ort_ms)):
                results[f"{name} {rt}"] = {"params": params, "median_ms": statistics.median(ms),
                                           "p95_ms": float(np.percentile(ms, 95)), "samples_ms": ms}
    base = results.get("dense torch eager", {}).get("median_ms", float("nan"))
    print(f"\nUNet: {source}; batch {args.batch}, latents {size}x{size}, seq {args.seq_len}, threads {threads}, "
          f"{args.iters} timed calls after {args.warmup} warm-up")
    if slim_note:
        print(f"slim: {slim_note}")
    print(f"{'variant':<24}{'params':>12}{'median ms':>12}{'p95 ms':>10}{'speed-up vs dense torch':>26}")
    for key, r in results.items():
        if "median_ms" not in r:
            continue
        r["speedup_vs_dense_torch"] = base / r["median_ms"]
        rows.append(key)
        print(f"{key:<24}{r['params']:>12,}{r['median_ms']:>12.2f}{r['p95_ms']:>10.2f}{r['speedup_vs_dense_torch']:>25.2f}x")
    out = {"source": source, "slim": slim_note, "batch": args.batch, "size": size, "seq_len": args.seq_len,
           "threads": threads, "warmup": args.warmup, "iters": args.iters, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "command": " ".join(sys.argv), "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
