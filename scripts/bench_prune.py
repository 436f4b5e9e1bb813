"""Dense vs slim UNet latency at given pruning ratios, beside the FLOP ratio: does removing units pay?

    OMP_NUM_THREADS=2 python scripts/bench_prune.py --geometry tiny --ratios 0.05,0.15,0.3 --out bench.json
    python scripts/bench_prune.py --geometry sd15 --device cuda --ratios 0.1,0.2 --batch 2 --size 64

Geometries: tiny (TINY sd1), tiny-sd2, tiny-sdxl, mid (a mid-size SD1-like UNet), sd15 (full SD1.5 shapes,
random weights), toy (the embedded pipeline's UNet; pass --masks to use its learned MaskSet).
Without --masks the gate parameters are random (seeded), so a ratio removes a random mix of heads, FFN
neurons and norm channels, most-closed first as `make_plan` does. Every slim model is checked against the
gated dense model (fp32 max abs) before it is timed.

CPU: torch eager fp32, no_grad; dense and slim calls alternate so drift in machine load hits both alike.
CUDA: fp16, one CUDA graph per model replayed (eager mode is launch-bound and hides pruning gains).
Prints a table and writes JSON (per ratio: params, FLOPs, median / p10 / p90 latency, latency ratio).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from uniforget.errors import UniforgetError
from uniforget.fingerprint import model_fingerprint
from uniforget.flops import ReferenceShape, reference_inputs
from uniforget.geometries import SD15, TINY, build_unet
from uniforget.masks import MaskSet
from uniforget.plan import make_plan, parse_ratio
from uniforget.prune import check_parity, prune_unet
from uniforget.targets import discover_targets

MID = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=256,
    attention_head_dim=8,
    norm_num_groups=32,
)


def load_geometry(name: str):
    if name == "toy":
        from uniforget.models import load_pipeline

        return load_pipeline("toy").unet.float().eval()
    cfg = {"tiny": TINY["sd1"], "tiny-sd2": TINY["sd2"], "tiny-sdxl": TINY["sdxl"], "mid": MID, "sd15": SD15}[name]
    return build_unet(cfg, seed=0)


def random_masks(unet, seed: int) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    logits = {t.key: torch.rand(t.size, generator=g) * 0.6 + 0.9 for t in discover_targets(unet)}  # all open
    return MaskSet(logits, model_fingerprint(unet))


def _median_ms(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"median_ms": statistics.median(s), "p10_ms": q(0.1), "p90_ms": q(0.9)}


def time_cpu(models: dict[str, torch.nn.Module], inputs: dict, iters: int, warmup: int) -> dict[str, dict]:
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(warmup):
            for m in models.values():
                m(**inputs)
        for _ in range(iters):
            for k, m in models.items():  # alternate: load drift hits every model alike
                t0 = time.perf_counter()
                m(**inputs)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _median_ms(v) for k, v in times.items()}


def time_cuda_graph(models: dict[str, torch.nn.Module], inputs: dict, iters: int, warmup: int) -> dict[str, dict]:
    """fp16 CUDA-graph replay per model; static inputs captured once."""
    out: dict[str, dict] = {}
    graphs = {}
    with torch.no_grad():
        for k, m in models.items():
            m.half().cuda()
            static = {a: (v.half() if torch.is_floating_point(v) and a != "timestep" else v).cuda()
                      if torch.is_tensor(v) else {b: w.half().cuda() for b, w in v.items()}
                      for a, v in inputs.items()}
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    m(**static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                m(**static)
            graphs[k] = g
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(warmup):
            for g in graphs.values():
                g.replay()
        torch.cuda.synchronize()
        for _ in range(iters):
            for k, g in graphs.items():
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                times[k].append(a.elapsed_time(b))
    for k, v in times.items():
        out[k] = _median_ms(v)
    return out


def main(argv: list[str] | None = None) -> int:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="tiny", choices=("tiny", "tiny-sd2", "tiny-sdxl", "mid", "sd15", "toy"))
    p.add_argument("--ratios", default="0.05,0.15,0.3", help="comma-separated ratios ('auto' needs --masks)")
    p.add_argument("--masks", type=Path, default=None, help="a MaskSet for this UNet (default: random gates)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=None, help="latent height=width (default: the UNet's sample_size)")
    p.add_argument("--seq", type=int, default=77)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_prune.json"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2

    unet = load_geometry(args.geometry)
    size = args.size or int(unet.config.sample_size)
    ref = ReferenceShape(args.batch, size, size, args.seq)
    masks = MaskSet.load(args.masks) if args.masks else random_masks(unet, args.seed)
    inputs = reference_inputs(unet, ref, seed=args.seed)
    rows = []
    try:  # every plan first: an unreachable ratio fails before any time is spent timing
        plans = [make_plan(unet, masks, parse_ratio(x), ref) for x in args.ratios.split(",")]
    except UniforgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for plan in plans:
        r = plan.ratio_requested
        slim = prune_unet(unet, plan)
        parity = check_parity(unet, slim, plan, reference_inputs(unet, ReferenceShape(1, size, size, 7)))
        if args.device == "cpu":
            t = time_cpu({"dense": unet, "slim": slim}, inputs, args.iters, args.warmup)
        else:
            import copy

            t = time_cuda_graph({"dense": copy.deepcopy(unet), "slim": slim}, inputs, args.iters, args.warmup)
        units = {k: {"total": sum(x.size for x in plan.targets if x.kind == k),
                     "removed": sum(x.n_removed for x in plan.targets if x.kind == k)} for k in ("heads", "ffn", "norm")}
        rows.append({
            "ratio_requested": r, "ratio_achieved": plan.ratio_achieved,
            "params_before": plan.params_before, "params_after": plan.params_after,
            "flops_before": plan.flops_before, "flops_after": plan.flops_after, "flop_ratio": plan.flop_ratio,
            "units": units, "parity_max_abs": parity.max_abs,
            "dense": t["dense"], "slim": t["slim"],
            "latency_ratio": t["slim"]["median_ms"] / t["dense"]["median_ms"],
        })
        del slim

    result = {
        "geometry": args.geometry, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "precision": "fp16 CUDA graph" if args.device == "cuda" else "fp32 eager",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "shape": ref.to_dict(), "iters": args.iters, "masks": str(args.masks) if args.masks else "random",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _print_table(result)
    return 0


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{res['geometry']} UNet, {res['precision']} on {res['device']} ({res['threads']} threads), "
                    f"batch {res['shape']['batch']}, latent {res['shape']['height']}x{res['shape']['width']}")
    for c in ("ratio", "params removed", "FLOP ratio", "dense ms", "slim ms", "latency ratio", "parity"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        t.add_row(str(r["ratio_requested"]), f"{r['ratio_achieved']:.2%}",
                  "-" if r["flop_ratio"] is None else f"{r['flop_ratio']:.3f}",
                  f"{r['dense']['median_ms']:.2f}", f"{r['slim']['median_ms']:.2f}", f"{r['latency_ratio']:.3f}",
                  f"{r['parity_max_abs']:.1e}")
    Console().print(t)


if __name__ == "__main__":
    sys.exit(main())
