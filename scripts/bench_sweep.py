"""Dense vs slim UNet latency sweep over runtimes, batch sizes and resolutions; prints a table, writes JSON + chart.

    python scripts/bench_sweep.py --model toy --slim engines/toy-medium-r0.05       # a real export
    python scripts/bench_sweep.py --model sd15 --ratio 0.15 --device cuda --fp16     # random weights, GPU
    python scripts/bench_sweep.py --model sd1 --ratio 0.1 --sizes 8,16 --batches 1,2 # tiny geometry, CPU

`--model` is 'toy' / a pipeline folder (its UNet) or a geometry name (sd15, or the tiny sd1/sd2/sdxl) built with
random weights. The slim UNet is `--slim` (export folder or slim-UNet folder) or, for random weights, the dense
one with `--ratio` of its parameters removed by random gate scores. Runtimes: eager, cuda_graph (GPU), compile
(its compile time is reported as setup), onnxruntime, tensorrt (only with an engine from an export folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from exporter.bench import (
    CPU_DEFAULT,
    GPU_DEFAULT,
    TABLE_HEADER,
    BenchOptions,
    bench_pair,
    format_table,
    plot,
    write_json,
)


def random_slim(unet, ratio: float, seed: int = 0, align: int = 8):
    """(slim, plan): `ratio` of the parameters removed by random gate scores (uniforget.masks.random_maskset)."""
    from uniforget.masks import random_maskset
    from uniforget.plan import make_plan
    from uniforget.prune import prune_unet

    plan = make_plan(unet, random_maskset(unet, seed), ratio, with_flops=False, align=align)
    return prune_unet(unet, plan), plan


def load_models(model: str, slim: Path | None, ratio: float, seed: int):
    """(dense, slim, label) for a geometry name or a model path."""
    from uniforget.geometries import SD15, TINY, build_unet

    if model in TINY or model == "sd15":
        dense = build_unet(SD15 if model == "sd15" else TINY[model], seed=seed)
        label = f"{model} (random weights)"
    else:
        from uniforget.plan import load_source_unet

        dense = load_source_unet(model)
        label = model
    if slim is not None:
        from exporter.onnx_export import load_unet

        folder = slim / "unet" if (slim / "unet" / "uniforget_plan.json").is_file() else slim
        return dense, load_unet(folder), f"{label}, slim from {slim}"
    s, plan = random_slim(dense, ratio, seed)
    return dense, s, f"{label}, {plan.ratio_achieved:.1%} params removed"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    for r in [TABLE_HEADER, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--slim", type=Path, default=None)
    p.add_argument("--ratio", type=float, default=0.1, help="random removal ratio when --slim is not given")
    p.add_argument("--runtimes", default=None, help="comma-separated (default: eager,onnxruntime on CPU; all on GPU)")
    p.add_argument("--batches", default="2")
    p.add_argument("--sizes", default=None, help="latent sizes, comma-separated (default: the UNet's sample_size)")
    p.add_argument("--seq-len", type=int, default=77)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("engines/bench"), help="folder for sweep.json and sweep.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "onnx", "onnxruntime", "polygraphy", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    dense, slim, label = load_models(args.model, args.slim, args.ratio, args.seed)
    runtimes = tuple(args.runtimes.split(",")) if args.runtimes else (GPU_DEFAULT if args.device == "cuda"
                                                                      else CPU_DEFAULT)
    base = BenchOptions(runtimes=runtimes, runs=args.runs, warmup=args.warmup, device=args.device, fp16=args.fp16,
                        seq_len=args.seq_len, seed=args.seed)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [int(dense.config.sample_size)]
    trt = None
    if args.slim is not None and (args.slim / "trt" / "unet.plan").is_file():
        trt = {"slim": args.slim / "trt" / "unet.plan"}
    results = []
    for b in (int(x) for x in args.batches.split(",")):
        for s in sizes:
            opts = replace(base, batch=b, height=s, width=s)
            results.append(bench_pair(dense, slim, opts, label=label, trt=trt))
    print_table(format_table(results))
    write_json(results, args.out / "sweep.json")
    plot(results, args.out / "sweep.png", f"{label}: p50 per UNet call, {results[0].device_name}")
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
