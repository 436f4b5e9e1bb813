"""One process, a few minutes on a GPU box: dense vs slim UNet latency on SD1.5 geometry (random weights) and the toy.

    python scripts/gpu_check.py                 # GPU: fp16, batch 2, 64x64 latents; eager, CUDA graph,
                                                # torch.compile (reduce-overhead), ONNX Runtime (if onnxruntime-gpu)
    python scripts/gpu_check.py --quick         # CPU: tiny SD1-like geometry + the toy, eager + ONNX Runtime

Needs only torch, diffusers and onnxruntime (plus this repository on the path). The slim SD1.5 UNet has
`--ratio` of its parameters removed by random gate scores (speed does not depend on which units go);
the toy uses its shipped medium MaskSet when present. Prints one table, writes gpu_check.json and
gpu_check.png to --out.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.bench import BenchOptions, bench_pair, format_table, plot, write_json  # noqa: E402


def random_slim(unet, ratio: float, seed: int = 0, align: int = 8):
    """(slim, plan): `ratio` of the parameters removed by random gate scores (uniforget.masks.random_maskset)."""
    from uniforget.masks import random_maskset
    from uniforget.plan import make_plan
    from uniforget.prune import prune_unet

    plan = make_plan(unet, random_maskset(unet, seed), ratio, with_flops=False, align=align)
    return prune_unet(unet, plan), plan


def toy_pair(ratio: float):
    """The toy's dense UNet and its slim UNet (shipped medium masks at `ratio`, else random gate scores)."""
    from uniforget.models import TOY_DIR

    if not (TOY_DIR / "model_index.json").is_file():
        return None
    from uniforget.plan import load_source_unet

    dense = load_source_unet("toy")
    masks = TOY_DIR.parent / "masks" / "medium.safetensors"
    if masks.is_file():
        from uniforget.masks import MaskSet
        from uniforget.plan import make_plan
        from uniforget.prune import prune_unet

        plan = make_plan(dense, MaskSet.load(masks), ratio, with_flops=False)
        return dense, prune_unet(dense, plan), f"toy (medium masks, {plan.ratio_achieved:.1%} removed)"
    slim, plan = random_slim(dense, ratio)
    return dense, slim, f"toy (random removal {plan.ratio_achieved:.1%})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU run on a tiny geometry (for tests and laptops)")
    p.add_argument("--ratio", type=float, default=0.15, help="share of SD1.5 UNet parameters to remove")
    p.add_argument("--toy-ratio", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (about a minute per model)")
    p.add_argument("--out", type=Path, default=Path("engines/bench"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "onnx", "onnxruntime", "matplotlib", "PIL", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from uniforget.geometries import SD15, TINY, build_unet

    t0 = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.quick
    if not gpu and not args.quick:
        print("no CUDA device: run with --quick for the CPU variant", file=sys.stderr)
        return 2
    if gpu:
        runtimes = ("eager", "cuda_graph") + (() if args.no_compile else ("compile",)) + ("onnxruntime",)
        opts = BenchOptions(runtimes=runtimes, batch=args.batch, height=64, width=64, runs=args.runs, device="cuda",
                            fp16=True)
        geometry, name = SD15, "SD1.5 geometry (random weights)"
    else:
        opts = BenchOptions(runtimes=("eager", "onnxruntime"), batch=args.batch, runs=args.runs)
        geometry, name = TINY["sd1"], "tiny SD1-like geometry (random weights)"
    results = []
    dense = build_unet(geometry, seed=0)
    slim, plan = random_slim(dense, args.ratio)
    results.append(bench_pair(dense, slim, opts, label=f"{name}, {plan.ratio_achieved:.1%} removed"))
    del dense, slim
    if gpu:
        torch.cuda.empty_cache()
    toy = toy_pair(args.toy_ratio)
    if toy is not None:
        d, s, label = toy
        results.append(bench_pair(d, s, BenchOptions(runtimes=opts.runtimes, batch=args.batch, runs=args.runs,
                                                     device=opts.device, fp16=opts.fp16), label=label))
    else:
        print("toy pipeline not installed: toy rows skipped", file=sys.stderr)
    from exporter.bench import TABLE_HEADER

    rows = format_table(results)
    widths = [max(len(str(r[i])) for r in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    for r in [TABLE_HEADER, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    write_json(results, args.out / "gpu_check.json")
    plot(results, args.out / "gpu_check.png", f"dense vs slim, {results[0].device_name}")
    print(f"wrote {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.png'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
