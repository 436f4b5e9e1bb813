"""The product's science claim on the toy: learn masks at each beta, then measure memorization and fidelity
against the original and against two controls at matched neutral drift (TESTBED.md, METHOD.md).

    python scripts/toy_study.py --out runs/study [--betas auto,weak,medium,strong] [--ratio 0.05]
        [--retrain-steps 200] [--ship]

Per beta (`auto` = the calibrated strength, calibrate.py): `uniforget learn` (neutral training prompts only)
also writes a random-removal and a shuffled-gates control matched on neutral latent drift over those training
prompts. With `--ratio`, the masks are also pruned at that ratio (slim == gated is checked) and, with
`--retrain-steps`, the slim UNet is briefly retrained on neutral prompts (retrain.py). Every variant (soft
gates, slim, slim + retrain, both controls) is then evaluated with the same seeds on the memorized captions and
the held-out neutral prompts: strict copy rate, nearest-neighbour identity, SSIM, judge accuracy, pixel drift
vs the original, selectivity, Wen's AUC, and the copy rate under perturbed trigger embeddings (random at stated
relative norms, plus one optimized). Prints a table, writes study.json. `--ship` copies the learned MaskSets
and their controls to uniforget/toy/masks/.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from uniforget.calibrate import CalibrationConfig
from uniforget.evaluate import EvalConfig, EvalData, evaluate, judge_beside, sampling_defaults, write_json
from uniforget.learn import LearnConfig, LearnRequest, control_path_for, kind_summary, parse_beta, run_learn
from uniforget.masks import MaskSet
from uniforget.models import load_pipeline, resolve_model_path
from uniforget.prompts import TOY_PROMPTS
from uniforget.retrain import RetrainConfig

SHIP_DIR = Path(__file__).resolve().parents[1] / "uniforget" / "toy" / "masks"


def _closed(ms: MaskSet) -> dict[str, float]:
    values = ms.gate_values()
    closed, mean = kind_summary(values)
    total = sum(v.numel() for v in values.values())
    closed["all"] = sum(int((v == 0).sum()) for v in values.values()) / total
    return {**{f"closed_{k}": v for k, v in closed.items()}, **{f"mean_gate_{k}": v for k, v in mean.items()}}


def _row(ev, ms: MaskSet | None) -> dict:
    d = {
        "copy_rate": ev.memorized.copy_rate, "nn_identity": ev.memorized.nn_identity, "ssim": ev.memorized.ssim,
        "judge_accuracy": ev.judge_accuracy, "neutral_copy_rate": ev.neutral_copy_rate,
        "drift_neutral": ev.drift_neutral, "drift_memorized": ev.drift_memorized, "selectivity": ev.selectivity,
        "wen_auc": ev.wen_auc,
        "perturbed": {k: {"copy_rate": v.copy_rate, "nn_identity": v.nn_identity} for k, v in ev.perturbed.items()},
    }
    if ms is not None:
        d.update(_closed(ms))
        d["latent_drift_train"] = float(ms.meta.get("neutral_drift_mse", ms.meta.get("control_drift_mse", "nan")))
    return d


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _slim_variants(pipe, data, ecfg, original, defaults, ms: MaskSet, args, beta: str) -> dict:
    """The masks pruned at --ratio (slim == gated checked), and that slim UNet after a brief neutral retrain."""
    import copy

    from uniforget.geometries import example_inputs
    from uniforget.plan import make_plan
    from uniforget.prompts import load_prompts
    from uniforget.prune import check_parity, prune_unet
    from uniforget.retrain import retrain_unet
    from uniforget.sampler import encode_prompts

    dense = pipe.unet
    plan = make_plan(dense, ms, float(args.ratio))
    slim = prune_unet(dense, plan).eval()
    par = check_parity(dense, slim, plan, example_inputs(dense, 2, 8, 8, seed=3), atol=1e-5)
    out: dict = {}
    variants = [("slim", slim, 0.0)]
    if args.retrain_steps:
        student = copy.deepcopy(slim)
        prompts = load_prompts(args.prompts, model=args.model)
        cond = encode_prompts(pipe, prompts)
        guidance = float(defaults.get("guidance_scale", 7.5))
        t0 = time.perf_counter()
        retrain_unet(student, dense, pipe.scheduler, cond, RetrainConfig(steps=args.retrain_steps,
                                                                         lr=args.retrain_lr, guidance_scale=guidance))
        variants.append(("retrained", student.eval(), time.perf_counter() - t0))
    for name, unet, wall in variants:
        pipe.unet = unet
        try:
            ev = evaluate(pipe, data, ecfg, reference=original, label=f"{beta}/{name}", defaults=defaults)
        finally:
            pipe.unet = dense
        row = _row(ev, None)
        row.update({"ratio_achieved": plan.ratio_achieved, "slim_parity_max_abs": par.max_abs})
        if name == "retrained":
            row["retrain_wall_s"] = wall
        out[name] = row
    return out


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--spec", type=Path, default=None,
                    help="dataset spec the model was trained on (default: the shipped toy's); sets the copy-detection "
                         "reference set")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="neutral mask-learning prompts (default: the toy's own prompts_train.txt)")
    ap.add_argument("--betas", default="auto,weak,medium,strong")
    ap.add_argument("--ratio", default=None, help="also prune at this ratio (e.g. 0.05) and evaluate the slim UNet")
    ap.add_argument("--retrain-steps", type=int, default=0, help="also retrain the slim UNet this many steps")
    ap.add_argument("--retrain-lr", type=float, default=RetrainConfig.lr, help="retrain learning rate")
    ap.add_argument("--empty-seeds", type=int, default=48, help="empty-prompt generations per variant (0 = skip)")
    ap.add_argument("--learn-steps", type=int, default=LearnConfig.steps)
    ap.add_argument("--sampler-steps", type=int, default=None, help="N unrolled while learning (default: learn's)")
    ap.add_argument("--targets", default=None, help="gate kinds to learn, e.g. ffn,norm (default: learn's)")
    ap.add_argument("--lr", type=float, default=None, help="mask learning rate (default: learn's)")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per memorized caption")
    ap.add_argument("--perturb", default="0.05,0.1,0.2")
    ap.add_argument("--optimized-norm", type=float, default=0.1, help="0 skips the optimized perturbation")
    ap.add_argument("--ship", action="store_true", help="copy learned MaskSets into the package (toy only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)

    betas = [b for b in args.betas.split(",") if b]
    learn_wall: dict[str, float] = {}
    for b in betas:
        out = args.out / f"{b}.safetensors"
        if out.is_file():
            console.print(f"[dim]{out} exists, not relearning[/]")
            continue
        cal = CalibrationConfig() if b == "auto" else None
        cfg = LearnConfig(beta=cal.ladder[0] if cal else parse_beta(b), steps=args.learn_steps)
        if args.sampler_steps:
            cfg = replace(cfg, sampler=replace(cfg.sampler, steps=args.sampler_steps))
        if args.targets:
            cfg = replace(cfg, kinds=tuple(k for k in args.targets.split(",") if k))
        if args.lr:
            cfg = replace(cfg, lr=args.lr)
        t0 = time.perf_counter()
        run_learn(LearnRequest(model=args.model, out=out, config=cfg, drift_prompts=32, controls=True,
                               prompts_file=args.prompts or TOY_PROMPTS,
                               history=args.out / f"{b}.history.jsonl", device="cpu", calibration=cal))
        learn_wall[b] = time.perf_counter() - t0

    pipe = load_pipeline(args.model)
    model_dir = resolve_model_path(args.model)
    data = EvalData.from_toy(spec_path=args.spec, judge_dir=judge_beside(model_dir))
    norms = tuple(float(x) for x in args.perturb.split(",") if x)
    ecfg = EvalConfig(seeds=args.seeds, perturb_norms=norms, optimized_norm=args.optimized_norm or None,
                      empty_seeds=args.empty_seeds)
    ccfg = replace(ecfg, perturb_norms=(), optimized_norm=None, empty_seeds=0)  # controls: copies and drift only
    defaults = sampling_defaults(model_dir)
    original = evaluate(pipe, data, ecfg, label="original", defaults=defaults)
    n_neutral = original.n_neutral
    acc = original.judge_accuracy or 0.0
    results: dict = {"config": {"seeds": args.seeds, "perturb": norms, "optimized_norm": args.optimized_norm,
                                "learn_steps": args.learn_steps, "n_neutral_prompts": n_neutral,
                                "judge_accuracy_binomial_se": math.sqrt(acc * (1 - acc) / max(1, n_neutral))},
                     "learn_wall_s": learn_wall, "original": _row(original, None), "betas": {}}
    for b in betas:
        path = args.out / f"{b}.safetensors"
        variants = {"learned": path, "random": control_path_for(path, "random"),
                    "shuffled": control_path_for(path, "shuffled")}
        results["betas"][b] = {}
        for name, p in variants.items():
            ms = MaskSet.load(p)
            ev = evaluate(pipe, data, ecfg if name == "learned" else ccfg, gates=ms, reference=original,
                          label=f"{b}/{name}", defaults=defaults)
            results["betas"][b][name] = _row(ev, ms)
        results["betas"][b]["learned"]["learn_wall_s"] = float(MaskSet.load(path).meta.get("wall_s", "nan"))
        if args.ratio:
            results["betas"][b].update(_slim_variants(pipe, data, ecfg, original, defaults, MaskSet.load(path),
                                                      args, b))
        if args.ship:
            SHIP_DIR.mkdir(parents=True, exist_ok=True)
            for p in variants.values():
                shutil.copyfile(p, SHIP_DIR / p.name.replace(path.stem, b))
        write_json(results, args.out / "study.json")  # after every beta: a long study keeps what it measured
    write_json(results, args.out / "study.json")

    t = Table(title=f"UniForget on {args.model}: {args.seeds} seeds x {len(data.memorized_captions)} memorized "
                    f"captions, {n_neutral} held-out neutral prompts")
    for col in ("variant", "closed ffn/norm/heads", "copy", "NN=planted", "SSIM", "judge", "drift neu", "select.",
                *[f"copy@{n}" for n in norms], f"copy@opt{args.optimized_norm}", "Wen AUC", "wall s"):
        t.add_column(col, justify="right")

    def add(name: str, r: dict) -> None:
        closed = "/".join(_pct(r.get(f"closed_{k}")) for k in ("ffn", "norm", "heads")) if "closed_ffn" in r else "-"
        pert = [_pct(r["perturbed"].get(f"random@{n}", {}).get("copy_rate")) for n in norms]
        opt = _pct(r["perturbed"].get(f"optimized@{args.optimized_norm}", {}).get("copy_rate"))
        wall = r.get("learn_wall_s", r.get("retrain_wall_s"))
        t.add_row(name, closed, _pct(r["copy_rate"]), _pct(r["nn_identity"]), _num(r["ssim"]),
                  _pct(r["judge_accuracy"]), _num(r["drift_neutral"]), _num(r["selectivity"]), *pert, opt,
                  _num(r.get("wen_auc")), _num(wall))

    add("original", results["original"])
    for b in betas:
        for name, r in results["betas"][b].items():
            add(f"{b} {name}", r)
    console.print(t)
    console.print(f"wrote {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
