"""SD1.5-geometry UNet (random weights) on ONNX Runtime's CPU provider: dense vs slim at several ratios.

    OMP_NUM_THREADS=1 python scripts/bench_sd15_cpu.py                       # the README's Speed table
    OMP_NUM_THREADS=1 python scripts/bench_sd15_cpu.py --ratios 0.15 --size 16 --runs 20   # a quicker look

What is compared, all at batch 1 (one UNet call without CFG; with CFG a pipeline calls it at batch 2), a
`--size` x `--size` latent (32: 256 px images), 77 text tokens, fp32:
- main rows: slim with aligned widths (`--align`, default 8) and ONNX Runtime's transformer optimizer
  (exporter/onnx_optimize.py) against the dense UNet through the same optimizer, at each ratio;
- ablations at `--ablation-ratio`: unaligned widths (align 1), and both graphs without the optimizer.
Slim UNets come from synthetic masks: every FFN neuron, attention head and transformer-norm channel gets a
N(0, 1) gate score (uniforget.masks.random_maskset, seed `--seed`), and uniforget.plan.make_plan removes the
lowest scores until the ratio of UNet parameters is gone, as it would for a learned MaskSet (FFN neurons and
heads alone hold only ~27% of SD1.5's parameters once every module keeps one unit: 0.30 needs the norms). Latency does not
depend on which units go, only on how many per module.

Timing is exporter.bench: dense and slim sessions are called alternately (ABBA), at least `--runs` rounds, more
(up to `--max-runs`) until the 95% bootstrap interval of the median per-round slim/dense ratio is within
+-`--ci`. The FLOP ratio (uniforget.flops, meta-device count at the same shape) is printed beside it. Every
optimized slim graph passes the ORT-vs-torch parity gate (atol 1e-4) before it is timed.

Writes runs/bench_sd15_cpu.json (git-ignored) and prints a table. Needs ~12 GB of RAM (one fp32 UNet in torch
plus the optimizer while exporting; two ORT sessions while timing) and ~20 GB of disk under --work.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.bench import BenchOptions, percentile  # noqa: E402

log = logging.getLogger("bench_sd15_cpu")


def export(unet, path: Path, size: int, optimize: bool, reuse: bool = False) -> dict:
    """ONNX export with the project's exporter; with `optimize`, ORT's transformer optimizer and its parity gate.
    `reuse`: graphs already in the work folder (from an earlier run of this script, gated then) are kept."""
    from exporter.onnx_export import OnnxExportOptions, export_unet
    from exporter.onnx_optimize import node_count, optimize_unet_validated

    opt_path = path.with_name(path.stem + ".opt.onnx")
    if reuse and path.is_file() and (opt_path.is_file() or not optimize):
        info = {"plain": str(path), "plain_nodes": node_count(path), "reused": True}
        if optimize:
            info.update(optimized=str(opt_path), optimized_nodes=node_count(opt_path))
        return info
    t0 = time.perf_counter()
    # onnx's own shape inference between folding passes: the ORT symbolic pass costs ~3x on a model this size
    res = export_unet(unet, path, OnnxExportOptions(dummy_batch=1, symbolic_shapes=False), height=size, width=size)
    info = {"plain": str(res.path), "plain_nodes": node_count(res.path), "export_s": time.perf_counter() - t0}
    if optimize:
        r, report = optimize_unet_validated(unet, res.path, opt_path, cases=[(1, size, size)])
        info.update(optimized=str(r.path), optimized_nodes=r.nodes_after, optimize_s=r.seconds,
                    fused_ops=r.fused_ops, parity_max_abs=report.max_abs)
        log.info("optimized %s: %s; parity vs torch max abs %.2e", path.name, r.summary(), report.max_abs)
    return info


def geometry(name: str) -> dict:
    from uniforget.geometries import SD15, TINY

    return SD15 if name == "sd15" else TINY["sd1"]


def slim_for(geo: str, ratio: float, align: int, seed: int, size: int, batch: int):
    """(slim UNet, plan) from a freshly built dense UNet, which is freed before returning (memory: SD-size)."""
    from uniforget.flops import ReferenceShape
    from uniforget.geometries import build_unet
    from uniforget.masks import random_maskset
    from uniforget.plan import make_plan
    from uniforget.prune import prune_unet

    dense = build_unet(geometry(geo), seed=seed)
    plan = make_plan(dense, random_maskset(dense, seed), ratio,
                     ReferenceShape(batch, size, size, 77), align=align)
    slim = prune_unet(dense, plan)
    del dense
    gc.collect()
    return slim, plan


def time_pair(dense_path: str, slim_path: str, feed: dict, opts: BenchOptions) -> dict:
    """Both ORT sessions loaded, then called alternately (exporter.bench.interleaved); the paired ratio."""
    from exporter.bench import interleaved, ort_session, ratio_estimate

    sessions = {"dense": ort_session(dense_path, opts), "slim": ort_session(slim_path, opts)}
    feeds = {n: {i.name: feed[i.name] for i in s.get_inputs()} for n, s in sessions.items()}
    ms = interleaved({n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()}, opts)
    e = ratio_estimate(ms["dense"], ms["slim"], opts.confidence, seed=opts.seed)
    del sessions
    gc.collect()
    return {"dense_p50_ms": percentile(ms["dense"], 50), "slim_p50_ms": percentile(ms["slim"], 50),
            "latency_ratio": e.ratio, "ratio_low": e.low, "ratio_high": e.high, "verdict": e.verdict,
            "rounds": e.rounds, "samples": ms}


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in ("slim", "params removed", "ORT optimizer", "nodes dense / slim", "dense p50 ms", "slim p50 ms",
              "latency slim/dense [95%]", "FLOPs slim/dense", "gap (points)", "reading"):
        t.add_column(h, justify="left" if h in ("slim", "reading") else "right")
    for r in rows:
        gap = 100 * (r["latency_ratio"] - r["flop_ratio"])
        opt = r["ort_optimizer"] if isinstance(r["ort_optimizer"], str) else "yes" if r["ort_optimizer"] else "no"
        t.add_row(r["label"], f"{r['ratio_achieved']:.1%}", opt,
                  f"{r['dense_nodes']} / {r['slim_nodes']}", f"{r['dense_p50_ms']:.0f}", f"{r['slim_p50_ms']:.0f}",
                  f"{r['latency_ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]", f"{r['flop_ratio']:.3f}",
                  f"{gap:+.1f}", r["verdict"])
    Console(width=200).print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0.05,0.15,0.30")
    p.add_argument("--ablation-ratio", type=float, default=0.15, help="ratio of the aligned/optimizer ablations "
                   "(a value outside --ratios skips them)")
    p.add_argument("--align", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="latent height = width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default OMP_NUM_THREADS or 1)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--max-runs", type=int, default=40)
    p.add_argument("--ci", type=float, default=0.01, help="target half-width of the ratio's 95%% interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-optimizer", action="store_true",
                   help="skip ONNX Runtime's optimizer (about 3 min and ~10 GB extra per SD-size graph): main rows "
                        "and the unaligned ablation on the plain graphs")
    p.add_argument("--reuse", action="store_true", help="keep graphs already in --work (from an earlier run)")
    p.add_argument("--compare-optimizer", action="store_true",
                   help="also time the dense UNet's optimized graph against its plain graph (same model)")
    p.add_argument("--geometry", choices=("sd15", "tiny"), default="sd15", help="tiny: TINY['sd1'] (script's test)")
    p.add_argument("--work", type=Path, default=None, help="folder for the ONNX files (default: a temp folder)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_sd15_cpu.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "onnx", "onnxruntime", "polygraphy", "matplotlib", "PIL", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from exporter.bench import device_name
    from exporter.onnx_export import unet_inputs
    from uniforget.geometries import build_unet

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    torch.set_num_threads(threads)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    opts = BenchOptions(runtimes=("onnxruntime",), batch=args.batch, height=args.size, width=args.size,
                        runs=args.runs, max_runs=args.max_runs, ci_halfwidth=args.ci, warmup=2, threads=threads,
                        seed=args.seed)
    t_start = time.perf_counter()
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-sd15-") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)

    dense = build_unet(geometry(args.geometry), seed=args.seed)
    log.info("dense %s UNet: %d parameters; exporting", args.geometry, sum(p.numel() for p in dense.parameters()))
    feed = unet_inputs(dense, args.batch, args.size, args.size, seq_len=77, seed=args.seed, timestep=500.0)
    optimize = not args.no_optimizer
    dense_info = export(dense, work / "dense" / "unet.onnx", args.size, optimize=optimize, reuse=args.reuse)
    del dense
    gc.collect()
    variants = [(r, args.align, optimize) for r in ratios]
    if args.ablation_ratio in ratios:
        variants += [(args.ablation_ratio, 1, optimize)] + ([(args.ablation_ratio, args.align, False)] if optimize
                                                            else [])
    exported: dict[str, dict] = {}
    plans: dict[str, dict] = {}
    for ratio, align, _ in variants:  # phase 1: every graph exported and gated, one torch UNet alive at a time
        name = f"r{ratio:g}-a{align}"
        if name in exported:
            continue
        slim, plan = slim_for(args.geometry, ratio, align, args.seed, args.size, args.batch)
        log.info("%s: %.2f%% of parameters removed, FLOPs x%.4f; exporting", name, 100 * plan.ratio_achieved,
                 plan.flop_ratio)
        exported[name] = export(slim, work / name / "unet.onnx", args.size, optimize=optimize, reuse=args.reuse)
        plans[name] = {"ratio_achieved": plan.ratio_achieved, "flop_ratio": plan.flop_ratio,
                       "params_before": plan.params_before, "params_after": plan.params_after,
                       "flops_before": plan.flops_before, "flops_after": plan.flops_after}
        del slim
        gc.collect()

    def save(rows: list[dict]) -> None:  # after every row: a killed run keeps what it timed
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": "uniforget.bench_sd15_cpu/1", "command": " ".join(["python", *sys.argv]),
                   "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "threads": threads, "device": device_name("cpu"), "batch": args.batch, "latent": args.size,
                   "masks": "uniforget.masks.random_maskset (ffn, heads, norm): N(0, 1) per unit",
                   "dense": dense_info, "slim_exports": exported, "rows": rows,
                   "wall_s": time.perf_counter() - t_start}
        args.out.write_text(json.dumps(payload, indent=1))

    rows = []
    if args.compare_optimizer and optimize:  # the optimizer's own effect: one model, two graphs
        t = time_pair(dense_info["plain"], dense_info["optimized"], feed, opts)
        rows.append({"label": "dense: optimized graph vs plain graph", "ratio_requested": 0.0, "align": None,
                     "ort_optimizer": "optimized vs plain", "dense_nodes": dense_info["plain_nodes"],
                     "slim_nodes": dense_info["optimized_nodes"], "ratio_achieved": 0.0, "flop_ratio": 1.0, **t,
                     "parity_max_abs": dense_info.get("parity_max_abs")})
        log.info("optimizer on dense: %s", json.dumps({k: rows[-1][k] for k in (
            "latency_ratio", "ratio_low", "ratio_high", "rounds", "dense_p50_ms", "slim_p50_ms")}))
        save(rows)
    for ratio, align, optimized in variants:  # phase 2: timing, only the two ORT sessions in memory
        name = f"r{ratio:g}-a{align}"
        key, nodes = ("optimized", "optimized_nodes") if optimized else ("plain", "plain_nodes")
        t = time_pair(dense_info[key], exported[name][key], feed, opts)
        r = {"label": f"ratio {ratio:g}, align {align}", "ratio_requested": ratio, "align": align,
             "ort_optimizer": optimized, "dense_nodes": dense_info[nodes], "slim_nodes": exported[name][nodes],
             **plans[name], **t, "parity_max_abs": exported[name].get("parity_max_abs") if optimized else None}
        rows.append(r)
        log.info("%s, optimizer %s: %s", r["label"], optimized, json.dumps({k: r[k] for k in (
            "latency_ratio", "ratio_low", "ratio_high", "flop_ratio", "rounds", "dense_p50_ms", "slim_p50_ms")}))
        save(rows)
    print_table(rows, f"{'SD1.5' if args.geometry == 'sd15' else 'tiny SD1-like'} geometry (random weights), ONNX Runtime CPU, {threads} thread(s), batch {args.batch}, "
                      f"latent {args.size}x{args.size}, 77 tokens")
    print(f"wrote {args.out} in {time.perf_counter() - t_start:.0f} s")
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
