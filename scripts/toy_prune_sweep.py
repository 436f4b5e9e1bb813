"""Prune the toy with each shipped MaskSet at `--ratios` and check that the slim pipeline is the gated one.

    python scripts/toy_prune_sweep.py --ratios 0.05,auto --json runs/prune_sweep.json

Per (beta, ratio): parameters and FLOPs before/after, slim vs gated parity (fp32 max abs) at three input
shapes, copy rate / nearest-neighbour identity / judge accuracy of the gated and of the slim pipeline with
the same seeds (they must agree within seed noise), and CPU latency of one UNet call, dense vs slim, torch
eager, interleaved in the same run (median of --runs after warm-up). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from uniforget.evaluate import EvalConfig, EvalData, evaluate, sampling_defaults, write_json
from uniforget.geometries import example_inputs
from uniforget.masks import MaskSet
from uniforget.models import TOY_DIR, load_pipeline
from uniforget.plan import make_plan, parse_ratio
from uniforget.prune import check_parity, prune_unet

MASK_DIR = TOY_DIR.parent / "masks"
SHAPES = ((1, 8, 8, 7), (2, 8, 8, 32), (3, 12, 16, 5))  # (batch, latent h, latent w, text tokens)


def _latency(dense, slim, inputs, runs: int) -> tuple[float, float]:
    """Median ms of one call each, dense and slim interleaved so machine noise hits both alike."""
    td, ts = [], []
    with torch.no_grad():
        for _ in range(3):
            dense(**inputs)
            slim(**inputs)
        for _ in range(runs):
            t0 = time.perf_counter()
            dense(**inputs)
            td.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            slim(**inputs)
            ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(td), 1e3 * statistics.median(ts)


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", default="weak,medium,strong")
    ap.add_argument("--ratios", default="0.05,auto")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", type=Path, default=Path("runs/prune_sweep.json"))
    args = ap.parse_args()
    pipe = load_pipeline("toy")
    dense = pipe.unet.eval()
    data = EvalData.from_toy()
    cfg = EvalConfig(seeds=args.seeds, perturb_norms=(), optimized_norm=None)
    defaults = sampling_defaults(TOY_DIR)
    rows = []
    for beta in args.betas.split(","):
        ms = MaskSet.load(MASK_DIR / f"{beta}.safetensors")
        for r in args.ratios.split(","):
            plan = make_plan(dense, ms, parse_ratio(r))
            slim = prune_unet(dense, plan).eval()
            parity = []
            for b, h, w, t in SHAPES:
                x = example_inputs(dense, batch=b, height=h, width=w, seq_len=t, seed=b)
                parity.append(check_parity(dense, slim, plan, x).max_abs)
            gated = evaluate(pipe, data, cfg, gates=plan.effective_gates(), label="gated", defaults=defaults)
            slim_pipe = copy.copy(pipe)
            slim_pipe.unet = slim
            sl = evaluate(slim_pipe, data, cfg, label="slim", defaults=defaults)
            lat_d, lat_s = _latency(dense, slim, example_inputs(dense, batch=2, seq_len=32), args.runs)
            rows.append({
                "beta": beta, "ratio": r, "ratio_achieved": plan.ratio_achieved,
                "params_before": plan.params_before, "params_after": plan.params_after,
                "flops_before": plan.flops_before, "flops_after": plan.flops_after, "flop_ratio": plan.flop_ratio,
                "reference_shape": plan.reference_shape.describe(), "closed_shares": plan.closed_shares,
                "parity_max_abs": parity, "parity_shapes": SHAPES,
                "gated": {"copy_rate": gated.memorized.copy_rate, "nn_identity": gated.memorized.nn_identity,
                          "judge_accuracy": gated.judge_accuracy},
                "slim": {"copy_rate": sl.memorized.copy_rate, "nn_identity": sl.memorized.nn_identity,
                         "judge_accuracy": sl.judge_accuracy},
                "latency_ms": {"dense_eager": lat_d, "slim_eager": lat_s, "ratio": lat_s / lat_d},
            })
    write_json({"rows": rows, "seeds": args.seeds, "runs": args.runs, "threads": torch.get_num_threads()}, args.json)
    t = Table(title="toy: slim vs gated (same seeds), parameters, FLOPs, eager latency (batch 2)")
    for c in ("beta", "ratio", "params removed", "FLOP ratio", "parity max", "copy gated/slim", "NN gated/slim",
              "judge gated/slim", "dense ms", "slim ms", "slim/dense"):
        t.add_column(c, justify="right")
    for x in rows:
        g, s = x["gated"], x["slim"]
        t.add_row(x["beta"], x["ratio"], f"{x['ratio_achieved']:.2%}", f"{x['flop_ratio']:.3f}",
                  f"{max(x['parity_max_abs']):.1e}", f"{g['copy_rate']:.0%}/{s['copy_rate']:.0%}",
                  f"{g['nn_identity']:.0%}/{s['nn_identity']:.0%}",
                  f"{g['judge_accuracy']:.1%}/{s['judge_accuracy']:.1%}",
                  f"{x['latency_ms']['dense_eager']:.1f}", f"{x['latency_ms']['slim_eager']:.1f}",
                  f"{x['latency_ms']['ratio']:.3f}")
    Console().print(t)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
