"""`uniforget learn`: learn UniForget gates from neutral prompts and write a MaskSet.

    uniforget learn --model toy --beta auto|weak|medium|strong|NUMBER --out masks.safetensors [--prompts FILE]
        [--targets heads,ffn,norm] [--steps 300] [--lr 0.05] [--sampler-steps 6] [--batch 8]
        [--checkpoint-every 50] [--resume] [--tune-weights LR]

Runs on CPU for the toy and data-parallel on several GPUs (each process takes a slice of the batch,
gate gradients are averaged):

    accelerate launch --multi_gpu --num_processes 4 -m exporter.cli learn --model PATH --precision bf16 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.argtypes import count_or_zero, float_open_unit, nonnegative_float, positive_float, positive_int
from exporter.commands import STAGE_HELP, DocstringFormatter, quiet_libraries
from uniforget.calibrate import STATISTICS, CalibrationConfig, parse_ladder
from uniforget.configs import (
    CHECKPOINTING,
    KINDS,
    LEARN_PRECISIONS,
    LearnConfig,
    LearnError,
    SamplerConfig,
    parse_beta,
)

if TYPE_CHECKING:
    from uniforget.learn import LearnRequest, LearnResult, StepStats


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d, ds, dc = LearnConfig(), SamplerConfig(), CalibrationConfig()
    p = subparsers.add_parser("learn", help=STAGE_HELP["learn"],
                              description=__doc__, formatter_class=DocstringFormatter)
    p.add_argument("--model", default="toy", help="'toy', a diffusers pipeline folder or a .safetensors checkpoint")
    p.add_argument("--out", type=Path, default=Path("masks.safetensors"), help="MaskSet file to write")
    p.add_argument("--beta", default="auto",
                   help="sparsity weight: auto (default: the strongest rung of --ladder whose drift on held-out neutral "
                        "prompts stays within --budget), weak (1), medium (2), strong (5) or a number")
    p.add_argument("--budget", type=positive_float, default=dc.budget,
                   help=f"--beta auto: max relative latent drift on held-out neutral prompts (default {dc.budget:g})")
    p.add_argument("--drift-seeds", type=positive_int, default=dc.drift_seeds, metavar="K",
                   help="--beta auto: start noises per held-out prompt, pooled per prompt, for the budget's drift "
                        f"(default {dc.drift_seeds})")
    p.add_argument("--budget-statistic", choices=STATISTICS, default=dc.statistic,
                   help="--beta auto: which drift --budget bounds: pooled over the held-out prompts (default) or the "
                        "median prompt's (robust to a few prompts whose image flips)")
    p.add_argument("--ladder", default=",".join(f"{b:g}" for b in dc.ladder),
                   help="--beta auto: increasing betas to try (default %(default)s)")
    p.add_argument("--holdout", type=float_open_unit, default=dc.holdout,
                   help=f"--beta auto: share of the neutral prompts held out for the budget (default {dc.holdout:g})")
    p.add_argument("--rung-steps", type=positive_int, default=None,
                   help="--beta auto: steps of each rung after the first (default: half of --steps)")
    p.add_argument("--recon", choices=("relative", "absolute"), default=d.recon,
                   help="reconstruction term: relative (/ variance of the original's latents; default) or absolute")
    p.add_argument("--prompts", type=Path, default=None,
                   help="neutral prompts, one per line (default: the toy's training prompts, else a shipped generic list)")
    p.add_argument("--targets", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (cosine annealed)")
    p.add_argument("--lr-min", type=nonnegative_float, default=d.lr_min, help="cosine floor")
    p.add_argument("--optimizer", choices=("adamw", "adam"), default=d.optimizer,
                   help="adamw: decoupled weight decay; adam: the paper's coupled decay (collapses small models)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay)
    p.add_argument("--tune-weights", type=nonnegative_float, default=d.weight_lr, metavar="LR",
                   help="also fine-tune a copy of the UNet's weights at this rate, jointly with the gates, against "
                        "the frozen original (0 = off, the paper's recipe; with --beta auto each rung continues from the "
                        "rung below's weights); writes OUT.unet/ for `prune --unet`")
    p.add_argument("--batch", type=positive_int, default=d.batch, help="prompts per step (global, across processes)")
    p.add_argument("--sampler-steps", type=positive_int, default=ds.steps, help="N: sampler steps unrolled per sample")
    p.add_argument("--guidance-scale", type=nonnegative_float, default=None,
                   help=f"classifier-free guidance scale (default: the model's own, else {ds.guidance_scale})")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, default=ds.checkpointing,
                   help="activation checkpointing: per sampler step, diffusers' UNet blocks, or none")
    p.add_argument("--precision", choices=LEARN_PRECISIONS, default=d.precision,
                   help="autocast dtype for the UNet (bf16 on GPUs; fp16 has no loss scaling)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=count_or_zero, default=50, metavar="K",
                   help="save resumable state every K steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--device", choices=("cpu",), default=None, help="force CPU (default: accelerate's choice)")
    p.add_argument("--history", type=Path, default=None,
                   help="write per-step loss parts and closed shares (JSON lines)")
    p.add_argument("--drift-prompts", type=count_or_zero, default=16,
                   help="measure the final gates' neutral drift on this many training prompts (0 = skip)")
    p.add_argument("--controls", action="store_true",
                   help="also write random-removal and shuffled-gates control MaskSets at the learned masks' "
                        "neutral drift (<out>.control-random/-shuffled.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_paths(args: argparse.Namespace) -> None:
    """Output and input paths, before the model loads or a progress bar starts: one line, exit 2."""
    from exporter.publish import check_can_write_file, check_model, check_prompts_file

    check_can_write_file(args.out, "--out", replace=args.overwrite or args.resume)
    if args.history is not None:
        check_can_write_file(args.history, "--history")
    check_model(args.model)
    if args.prompts is not None:
        check_prompts_file(args.prompts)


def _configs(args: argparse.Namespace) -> tuple[LearnConfig, CalibrationConfig | None]:
    """Every option built into its frozen config and checked, with no torch import: a bad one costs milliseconds."""
    kinds = tuple(k.strip() for k in args.targets.split(",") if k.strip())
    cal = None
    if str(args.beta).lower() == "auto":
        cal = CalibrationConfig(ladder=parse_ladder(args.ladder), budget=args.budget, holdout=args.holdout,
                                rung_steps=args.rung_steps, statistic=args.budget_statistic,
                                drift_seeds=args.drift_seeds)
    beta = cal.ladder[0] if cal is not None else parse_beta(args.beta)
    cfg = LearnConfig(beta=beta, recon=args.recon, steps=args.steps, lr=args.lr, lr_min=args.lr_min,
                      optimizer=args.optimizer, weight_decay=args.weight_decay, batch=args.batch, kinds=kinds,
                      sampler=_sampler(args), seed=args.seed, precision=args.precision, weight_lr=args.tune_weights)
    return cfg, cal


def _request(args: argparse.Namespace, cfg: LearnConfig, cal: CalibrationConfig | None) -> LearnRequest:
    from uniforget.learn import LearnRequest

    return LearnRequest(model=args.model, out=args.out, config=cfg, prompts_file=args.prompts,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, device=args.device,
                        guidance_scale=args.guidance_scale, history=args.history, drift_prompts=args.drift_prompts,
                        controls=args.controls, calibration=cal)


def _sampler(args: argparse.Namespace) -> SamplerConfig:
    try:
        guidance = SamplerConfig.guidance_scale if args.guidance_scale is None else args.guidance_scale
        return SamplerConfig(steps=args.sampler_steps, guidance_scale=guidance, checkpointing=args.checkpointing)
    except ValueError as e:
        raise LearnError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    cfg, cal = _configs(args)
    check_paths(args)
    req = _request(args, cfg, cal)
    quiet_libraries(getattr(args, "verbose", 0))
    from uniforget.learn import kind_summary, run_learn

    result = run_learn(req) if args.no_progress else _with_progress(req)

    closed = ", ".join(f"{k} {v:.1%}" for k, v in kind_summary(result.maskset.gate_values())[0].items())
    meta = result.maskset.meta
    drift = meta.get("neutral_drift_rel")
    print(f"wrote {req.out}  beta {meta.get('beta')}  closed: {closed}  neutral drift (rel): {drift or '-'}  "
          f"({result.wall_s:.0f} s)")
    if result.unet is not None:
        from uniforget.learn import tuned_unet_path_for

        d = tuned_unet_path_for(req.out)
        print(f"  weights tuned jointly (lr {meta.get('weight_lr')}): {d}/; these masks gate that copy, not the "
              f"original: uniforget prune --unet {d} --masks {req.out} --ratio 0.05 --out DIR")
    if meta.get("beta_mode") == "auto":
        se = f" (bootstrap s.e. {meta['calibration_rungs_se']})" if meta.get("calibration_rungs_se") else ""
        med = f", median prompt {meta['calibration_rungs_median']}" if meta.get("calibration_rungs_median") else ""
        stat = meta.get("calibration_statistic", "pooled")
        print(f"  --beta auto: ladder beta:held-out drift {meta['calibration_rungs']}{se}{med}, budget "
              f"{meta['calibration_budget_rel_drift']} on the {stat} drift, chose beta {meta['beta']}"
              + (" (OVER BUDGET even at the weakest rung)" if meta["calibration_over_budget"] == "true" else ""))
        if meta.get("calibration_close_call"):
            print(f"  close call: {meta['calibration_close_call']}")
    return 0


def _with_progress(req: LearnRequest) -> LearnResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from uniforget.learn import run_learn

    cols = (TextColumn("learn"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*cols, transient=False) as bar:
        total = req.config.steps
        if req.calibration is not None:  # an upper bound: the ladder may stop early
            rung = req.calibration.rung_steps or max(1, req.config.steps // 2)
            total += rung * (len(req.calibration.ladder) - 1)
        task = bar.add_task("learn", total=total, info="")
        done = [0]

        def update(s: StepStats) -> None:
            shut = " ".join(f"{k}:{v:.0%}" for k, v in s.closed.items())
            done[0] += 1
            bar.update(task, completed=done[0],
                       info=f"mse {s.mse:.2e}  l1 {s.l1:.3f}  lr {s.lr:.3g}  closed {shut}")

        return run_learn(req, callback=update)
