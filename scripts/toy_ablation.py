"""Where does the toy keep its memorized images? Random ablation of each gate kind at growing fractions.

    python scripts/toy_ablation.py --out runs/ablation.json [--fractions 0.1,0.3,0.5,0.7,0.9]

UniForget can only remove what its gates reach (attention heads, FFN neurons, norm channels). If closing a
large random share of one kind leaves the planted images intact while neutral fidelity holds, memorization
does not live in that kind, and no mask over it can remove it selectively. The kind `resnet` is outside the
gates' reach, for comparison: random hidden channels of every ResNet block (the input columns of its second
convolution) zeroed in a copy of the UNet. This script measures, per kind
and fraction (random units closed in every module of that kind, same seeds throughout): strict copy rate,
nearest-neighbour identity, SSIM to the planted image, judge accuracy on held-out neutral prompts and pixel
drift against the original. Prints a table and writes JSON; it reads no mask and learns nothing.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch
from diffusers.models.resnet import ResnetBlock2D
from rich.console import Console
from rich.table import Table

from uniforget.controls import random_kind_ablation
from uniforget.evaluate import EvalConfig, EvalData, evaluate, sampling_defaults, write_json
from uniforget.models import load_pipeline, resolve_model_path


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation.json"))
    ap.add_argument("--spec", type=Path, default=None, help="dataset spec the model was trained on (default: toy's)")
    ap.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--kinds", default="ffn,norm,heads,attn2,resnet")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per memorized caption")
    ap.add_argument("--neutral", type=int, default=48, help="held-out neutral prompts (evenly spaced subset)")
    ap.add_argument("--mask-seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    fractions = [float(x) for x in args.fractions.split(",") if x]
    kinds = [k for k in args.kinds.split(",") if k]

    model_dir = resolve_model_path(args.model)
    pipe = load_pipeline(args.model)
    defaults = sampling_defaults(model_dir)
    data = EvalData.from_toy(spec_path=args.spec)
    cfg = EvalConfig(seeds=args.seeds, neutral_prompts=args.neutral, perturb_norms=(), optimized_norm=None)
    t0 = time.perf_counter()
    original = evaluate(pipe, data, cfg, label="original", defaults=defaults)
    rows = [{"kind": "-", "fraction": 0.0, **_metrics(original)}]
    for kind in kinds:
        # "attn2": cross-attention heads only, the path every text trigger must take.
        gk, only = ("heads", ".attn2") if kind == "attn2" else (kind, None)
        for f in fractions:
            if kind == "resnet":
                dense = pipe.unet
                pipe.unet = _ablate_resnets(dense, f, args.mask_seed)
                try:
                    ev = evaluate(pipe, data, cfg, reference=original, label=f"{kind}@{f}", defaults=defaults)
                finally:
                    pipe.unet = dense
            else:
                gates = random_kind_ablation(pipe.unet, gk, f, args.mask_seed, only)
                ev = evaluate(pipe, data, cfg, gates=gates, reference=original, label=f"{kind}@{f}",
                              defaults=defaults)
            rows.append({"kind": kind, "fraction": f, **_metrics(ev)})
            Console(stderr=True).print(f"{kind} {f:.2f}: copy {rows[-1]['copy_rate']:.2f} "
                                       f"nn {rows[-1]['nn_identity']:.2f} judge {rows[-1]['judge_accuracy']:.3f}")
    _table(rows)
    write_json({"model": str(model_dir), "seeds": args.seeds, "neutral_prompts": args.neutral,
                "mask_seed": args.mask_seed, "wall_s": time.perf_counter() - t0, "rows": rows}, args.out)
    print(f"wrote {args.out}")


def _ablate_resnets(unet: torch.nn.Module, fraction: float, seed: int) -> torch.nn.Module:
    """A copy of `unet` with round(fraction * C) random hidden channels of every ResNet block removed (zero input
    columns of conv2, i.e. after norm2 and the activation), the same seeds throughout like the gate kinds."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(unet)
    with torch.no_grad():
        for mod in out.modules():
            if isinstance(mod, ResnetBlock2D):
                c = mod.conv2.in_channels
                idx = torch.randperm(c, generator=gen)[: round(fraction * c)]
                mod.conv2.weight[:, idx] = 0.0
    return out


def _metrics(ev) -> dict[str, float | None]:
    return {"copy_rate": ev.memorized.copy_rate, "nn_identity": ev.memorized.nn_identity,
            "ssim": ev.memorized.ssim, "judge_accuracy": ev.judge_accuracy,
            "drift_neutral": ev.drift_neutral, "drift_memorized": ev.drift_memorized}


def _table(rows: list[dict]) -> None:
    t = Table(title="toy: random ablation by gate kind (same seeds)")
    for c in ("kind", "closed", "copy", "NN=item", "SSIM", "judge", "drift neu", "drift mem"):
        t.add_column(c, justify="right")
    f = lambda x, p=True: "-" if x is None else (f"{100 * x:.1f}%" if p else f"{x:.3f}")  # noqa: E731
    for r in rows:
        t.add_row(r["kind"], f(r["fraction"]), f(r["copy_rate"]), f(r["nn_identity"]), f(r["ssim"], False),
                  f(r["judge_accuracy"]), f(r["drift_neutral"], False), f(r["drift_memorized"], False))
    Console(width=120).print(t)


if __name__ == "__main__":
    main()
