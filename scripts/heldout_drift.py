"""Neutral drift on held-out prompts, for masks learned with frozen or jointly tuned weights.

    python scripts/heldout_drift.py --beta 10 --tune-weights 1e-4 --out runs/heldout/b10w4.json
    python scripts/heldout_drift.py --masks uniforget/toy/masks/auto.safetensors --out runs/heldout/auto.json

Splits the toy's neutral training prompts as `--beta auto` does (calibrate.split_prompts: 72 learned from, 24
held out), learns one MaskSet on the 72 (learn.learn_masks, `--tune-weights` > 0 = the joint mode), and prints
the relative final-latent drift of the gated (tuned) UNet from the original on the 24 held-out prompts: the
measure `--beta auto` budgets. Writes that and the run's settings as JSON. Why it exists: `uniforget learn`
reports drift on its own training prompts, which a tuned copy fits better than prompts it never saw.
With `--masks` it learns nothing and measures that (frozen-weight) MaskSet on the held-out prompts with the
start noise `--beta auto` uses, so an auto MaskSet's recorded drift comes back; the JSON also holds the drift's
bootstrap standard error over the held-out prompts, and the median prompt's relative drift (the other statistic
`--budget-statistic` offers). `--sampler-refs` also measures the original's own drift, both statistics, when it
is sampled with more steps or another guidance than the budget's N-step reference: a neutral scale to read a
budget against (docs/dememorization.md sections 0i and 0l).

    python scripts/heldout_drift.py --masks uniforget/toy/masks/auto.safetensors --sampler-refs --out runs/heldout/refs.json

`--noise-offset S` draws the start noise from another seed, and `--drift-seeds K` samples each held-out prompt from K
start noises (pooled per prompt, as `uniforget learn --drift-seeds K` does): how much of a rung's drift is the one
start noise it was drawn with (section 0o).

    for s in 7 107 207 307; do python scripts/heldout_drift.py --masks uniforget/toy/masks/auto.safetensors \
        --noise-offset $s --drift-seeds 4 --out runs/noise/auto.$s.k4.json; done

`--scale binary|lerp` measures (and with `--masks-out` writes) a rescaled copy of the MaskSet instead: `binary` keeps
the closed gates closed and opens every other gate fully (what a plain pruning of the closed units would leave);
`lerp` scales every gate toward open, g -> 1 - t (1 - g), with t bisected so that the held-out drift meets
`--lerp-target`. Both are studies of whether a strong mask scaled down to a budget beats a weaker rung at the same
drift (section 0n), not options of the product.

    python scripts/heldout_drift.py --beta 10 --masks-out runs/interp/b10_72.safetensors --out runs/interp/b10_72.json
    python scripts/heldout_drift.py --masks runs/interp/b10_72.safetensors --scale lerp --lerp-target 0.193 \
        --masks-out runs/interp/b10_lerp.safetensors --out runs/interp/b10_lerp.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    from uniforget.calibrate import CalibrationConfig, split_prompts
    from uniforget.controls import gates_to_logits
    from uniforget.evaluate import model_guidance
    from uniforget.fingerprint import model_fingerprint
    from uniforget.learn import (
        DriftMeter,
        LearnConfig,
        kind_summary,
        learn_masks,
        prompts_sha256,
        save_unet_atomically,
        tuned_unet_path_for,
    )
    from uniforget.masks import MaskSet
    from uniforget.models import load_pipeline
    from uniforget.prompts import load_prompts
    from uniforget.sampler import encode_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--beta", type=float, help="learn at this beta (or give --masks)")
    ap.add_argument("--masks", type=Path, help="measure this MaskSet instead of learning one")
    ap.add_argument("--tune-weights", type=float, default=0.0, metavar="LR")
    ap.add_argument("--steps", type=int, default=LearnConfig.steps)
    ap.add_argument("--prompts", type=Path, default=None)
    ap.add_argument("--masks-out", type=Path, default=None,
                    help="also write the MaskSet here (and, with --tune-weights, the tuned UNet beside it as .unet/)")
    ap.add_argument("--sampler-refs", action="store_true",
                    help="also measure the original's own drift under sampler changes (N=8,12,25,50; guidance -0.5/+2)")
    ap.add_argument("--scale", choices=("none", "binary", "lerp"), default="none",
                    help="measure a rescaled copy of the gates: binary = closed stay closed, the rest open; "
                         "lerp = 1 - t (1 - g) with t bisected to --lerp-target")
    ap.add_argument("--lerp-target", type=float, default=CalibrationConfig().budget,
                    help="--scale lerp: the held-out pooled relative drift to meet (default: the budget)")
    ap.add_argument("--drift-seeds", type=int, default=1, metavar="K",
                    help="start noises per held-out prompt, pooled per prompt (--drift-seeds of uniforget learn)")
    ap.add_argument("--noise-offset", type=int, default=None,
                    help="start-noise seed offset (default: the one --beta auto uses with --masks, 1 when learning)")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args()
    if args.scale != "none" and args.tune_weights:
        ap.error("--scale rescales frozen-weight gates; drop --tune-weights")
    if (args.beta is None) == (args.masks is None):
        ap.error("give exactly one of --beta (learn) and --masks (measure)")
    if args.drift_seeds < 1:
        ap.error(f"--drift-seeds must be >= 1 (got {args.drift_seeds})")
    if args.masks is not None and not args.masks.is_file():
        ap.error(f"masks file not found: {args.masks}")

    prompts = load_prompts(args.prompts, model=args.model)
    learn_p, held_p = split_prompts(prompts, CalibrationConfig().holdout)
    pipe = load_pipeline(args.model)
    cfg = LearnConfig(beta=args.beta or 0.0, steps=args.steps, weight_lr=args.tune_weights)
    guidance = model_guidance(args.model)
    if guidance is not None:
        cfg = replace(cfg, sampler=replace(cfg.sampler, guidance_scale=guidance))
    t0 = time.perf_counter()
    if args.masks is not None:
        ms = MaskSet.load(args.masks, expect_fingerprint=model_fingerprint(pipe.unet))  # refuses a tuned copy's
        res, offset = SimpleNamespace(maskset=ms, unet=None), 7  # calibrate.calibrate's start noise
    else:
        res = learn_masks(pipe.unet, pipe.scheduler, encode_prompts(pipe, learn_p), cfg,
                          prompts_sha=prompts_sha256(learn_p))
        offset = 1
    if args.noise_offset is not None:
        offset = args.noise_offset
    meter = DriftMeter(pipe.unet, pipe.scheduler, encode_prompts(pipe, held_p), cfg.sampler,
                       seed=cfg.seed + offset, seeds_per_prompt=args.drift_seeds)
    gates = res.maskset.gate_values()
    drift = meter(gates, res.unet)  # a tuned copy is gated, not the original
    scaled: dict = {}
    if args.scale != "none":
        scaled = {"scale": args.scale, "unscaled_drift_rel": drift["rel"], "unscaled_drift_rel_se": drift["rel_se"],
                  "unscaled_closed": kind_summary(gates)[0]}
        measured: dict[int, dict] = {}  # id(gates) -> the full reading, so the kept probe is not re-measured

        def rel(g: dict) -> float:
            measured[id(g)] = meter(g)
            return measured[id(g)]["rel"]

        gates, scaled["knob"] = rescale_gates(gates, args.scale, rel, args.lerp_target)
        drift = measured.get(id(gates)) or meter(gates)  # binary probes nothing
    closed = kind_summary(gates)[0]
    row = {"beta": args.beta if args.masks is None else res.maskset.meta.get("beta"),
           "masks": None if args.masks is None else str(args.masks), "tune_weights": args.tune_weights,
           "steps": args.steps, "learn_prompts": len(learn_p), "heldout_prompts": len(held_p),
           "noise_offset": offset, "drift_seeds": args.drift_seeds,
           "heldout_drift_rel": drift["rel"], "heldout_drift_rel_se": drift["rel_se"],
           "heldout_drift_mse": drift["mse"], "heldout_drift_rel_median": drift["rel_median"],
           "heldout_drift_rel_median_se": drift["rel_median_se"], "closed": closed,
           **scaled, "wall_s": time.perf_counter() - t0}
    if args.sampler_refs:
        changes = [replace(cfg.sampler, steps=n) for n in (8, 12, 25, 50)]
        changes += [replace(cfg.sampler, guidance_scale=cfg.sampler.guidance_scale + g) for g in (-0.5, 2.0)]
        row["sampler_refs"] = {}
        for sc in changes:
            d = meter.of(pipe.unet, sc)
            row["sampler_refs"][f"N={sc.steps} guidance {sc.guidance_scale:g}"] = {
                "rel": d["rel"], "rel_se": d["rel_se"], "rel_median": d["rel_median"],
                "rel_median_se": d["rel_median_se"]}
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1) + "\n")
    if args.masks_out is not None and scaled:
        ms = res.maskset
        MaskSet(gates_to_logits(gates, ms.gate_config), ms.model_fingerprint, ms.gate_config,
                {**ms.meta, "scaled": args.scale, "scale_knob": f"{scaled['knob']:.6g}"}).save(args.masks_out)
    elif args.masks_out is not None and args.masks is None:
        if res.unet is not None:
            save_unet_atomically(res.unet, tuned_unet_path_for(args.masks_out))
        res.maskset.save(args.masks_out)


def rescale_gates(gates: dict, how: str, drift: Callable[[dict], float], target: float) -> tuple[dict, float]:
    """`binary`: closed gates stay closed, the rest open (knob 1); `lerp`: 1 - t (1 - g), t bisected in [0, 1] so that
    drift(gates) ~= target (knob t)."""
    import torch

    from uniforget.controls import match_drift

    if how == "binary":
        return {k: torch.where(v <= 0, v, torch.ones_like(v)) for k, v in gates.items()}, 1.0
    m = match_drift(lambda t: {k: 1 - t * (1 - v) for k, v in gates.items()}, drift, target, iters=10, grow=0)
    return m.gates, m.knob


if __name__ == "__main__":
    main()
