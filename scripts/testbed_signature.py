"""Does a toy memorize the way a real model does? The testbed's version-2 table (TESTBED.md), from one command.

    python scripts/testbed_signature.py --model toy --out runs/signature.json
    python scripts/testbed_signature.py --model runs/toy_r50/pipeline --spec uniforget/toy/spec_r50.json

Rows, each against its floor: strict copy rate and nearest-neighbour identity on the planted captions
(8 seeds each), the empty prompt's generations nearest a planted image and strict copies (48 seeds), Wen's
noise-norm AUC and its direction, judge accuracy on the 144 held-out neutral prompts and neutral copies, and
random FFN ablation at 10 / 30 / 50% (memorized and neutral pixel drift, copies and judge; reported, no
floor). Ends with the one-line reading of `uniforget.signature`. The model's own sampling defaults are used
(uniforget_toy.json); `--guidance` overrides them. Learns nothing and reads no mask.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from uniforget.controls import random_kind_ablation
from uniforget.evaluate import EvalConfig, EvalData, evaluate, judge_beside, sampling_defaults, write_json
from uniforget.models import load_pipeline, resolve_model_path
from uniforget.signature import EMPTY_COPY_MAX, EMPTY_NEAREST_MAX, WEN_AUC_MIN
from uniforget.verdict import judge_se

FLOORS = {"copy_rate": 0.90, "nn_identity": 0.95, "empty_nearest": EMPTY_NEAREST_MAX, "empty_copies": EMPTY_COPY_MAX,
          "wen_auc": WEN_AUC_MIN, "judge": 0.90, "neutral_copies": 0.0}


def signature_table(model: str, spec: str | None, seeds: int = 8, empty_seeds: int = 48,
                    fractions: tuple[float, ...] = (0.1, 0.3, 0.5), ablation_seeds: int = 4,
                    ablation_neutral: int = 48, guidance: float | None = None) -> dict:
    """Every number of the version-2 table, as a dict (see the module docstring)."""
    model_dir = resolve_model_path(model)
    pipe = load_pipeline(model)
    defaults = sampling_defaults(model_dir)
    data = EvalData.from_toy(spec, judge_beside(model_dir))
    t0 = time.perf_counter()
    cfg = EvalConfig(seeds=seeds, empty_seeds=empty_seeds, perturb_norms=(), optimized_norm=None,
                     guidance=guidance, progress=True)
    ev = evaluate(pipe, data, cfg, label="original", defaults=defaults)
    acfg = EvalConfig(seeds=ablation_seeds, neutral_prompts=ablation_neutral, empty_seeds=0, perturb_norms=(),
                      optimized_norm=None, guidance=guidance)
    base = evaluate(pipe, data, acfg, label="ablation reference", defaults=defaults)
    ablation = []
    for f in fractions:
        a = evaluate(pipe, data, acfg, gates=random_kind_ablation(pipe.unet, "ffn", f, seed=0), reference=base,
                     label=f"ffn@{f:g}", defaults=defaults)
        ablation.append({"fraction": f, "copy_rate": a.memorized.copy_rate, "nn_identity": a.memorized.nn_identity,
                         "judge_accuracy": a.judge_accuracy, "drift_memorized": a.drift_memorized,
                         "drift_neutral": a.drift_neutral})
    e = ev.empty_prompt
    n_neutral = ev.n_neutral
    judge_se_ = judge_se(ev.judge_accuracy, n_neutral) if ev.judge_accuracy is not None else None
    return {
        "model": str(model_dir), "spec": spec, "guidance": ev.guidance, "steps": ev.steps,
        "copy_rate": ev.memorized.copy_rate, "nn_identity": ev.memorized.nn_identity, "ssim": ev.memorized.ssim,
        "per_item_copy_rate": {k: v.copy_rate for k, v in ev.per_item.items()},
        "empty_nearest": e.nearest_planted, "empty_copies": e.copies, "empty_n": e.n,
        "empty_per_item_nearest": e.per_item_nearest,
        "wen_auc": ev.wen_auc, "wen_memorized": ev.wen_memorized, "wen_neutral": ev.wen_neutral,
        "wen_direction": ev.signature.wen_direction,
        "judge": ev.judge_accuracy, "judge_se": judge_se_, "n_neutral": n_neutral,
        "neutral_copies": ev.neutral_copy_rate, "n_memorized": ev.n_memorized,
        "ffn_ablation": ablation, "ablation_seeds": ablation_seeds, "ablation_neutral_prompts": ablation_neutral,
        "kind": ev.signature.kind, "reading": ev.signature.reading, "floors": FLOORS,
        "passes": passes_floors(ev), "wall_s": time.perf_counter() - t0,
    }


def passes_floors(ev) -> dict[str, bool]:
    e = ev.empty_prompt
    return {
        "copy_rate": ev.memorized.copy_rate >= FLOORS["copy_rate"],
        "nn_identity": ev.memorized.nn_identity >= FLOORS["nn_identity"],
        "empty_prompt": e is not None and e.n >= 48 and e.clean,
        "wen_auc": ev.wen_auc is not None and ev.wen_auc >= FLOORS["wen_auc"],
        "judge": ev.judge_accuracy is not None and ev.judge_accuracy >= FLOORS["judge"],
        "neutral_copies": ev.neutral_copy_rate <= FLOORS["neutral_copies"],
    }


def print_table(r: dict, console: Console) -> None:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    ok = lambda b: "[green]yes[/]" if b else "[red]no[/]"  # noqa: E731
    p = r["passes"]
    t = Table(title=f"testbed signature: {r['model']} (guidance {r['guidance']:g}, {r['steps']} steps)")
    for c in ("signature", "measured", "floor", "met"):
        t.add_column(c, justify="right" if c != "signature" else "left")
    t.add_row(f"strict copy rate ({r['n_memorized']} generations)", pct(r["copy_rate"]), ">= 90%", ok(p["copy_rate"]))
    t.add_row("nearest training image = planted", pct(r["nn_identity"]), ">= 95%", ok(p["nn_identity"]))
    t.add_row(f"empty prompt: nearest planted / copies (n={r['empty_n']})",
              f"{pct(r['empty_nearest'])} / {pct(r['empty_copies'])}", "<= 5% / <= 2%", ok(p["empty_prompt"]))
    t.add_row("Wen AUC (mean memorized / neutral)",
              f"{r['wen_auc']:.3f} ({r['wen_memorized']:.2f} / {r['wen_neutral']:.2f}), {r['wen_direction']}",
              ">= 0.9, memorized higher", ok(p["wen_auc"]))
    t.add_row(f"judge accuracy (n={r['n_neutral']}) / neutral copies",
              f"{pct(r['judge'])} (Agresti-Coull s.e. {100 * (r['judge_se'] or 0):.1f}) / {pct(r['neutral_copies'])}",
              ">= 90% / 0%", ok(p["judge"] and p["neutral_copies"]))
    for a in r["ffn_ablation"]:
        t.add_row(f"random FFN ablation {100 * a['fraction']:.0f}%: drift mem / neu",
                  f"{a['drift_memorized']:.3f} / {a['drift_neutral']:.3f} (copy {pct(a['copy_rate'])}, "
                  f"judge {pct(a['judge_accuracy'])})", "reported", "")
    console.print(t)
    console.print(f"reading: {r['reading']}")


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--spec", default=None, help="dataset spec the model was trained on (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=Path("runs/signature.json"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--empty-seeds", type=int, default=48)
    ap.add_argument("--guidance", type=float, default=None, help="override the model's sampling default")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    r = signature_table(args.model, args.spec, seeds=args.seeds, empty_seeds=args.empty_seeds, guidance=args.guidance)
    print_table(r, Console(width=130))
    write_json(r, args.out)
    print(f"wrote {args.out}  ({r['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
