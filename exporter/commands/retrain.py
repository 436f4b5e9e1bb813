"""`uniforget retrain`: briefly fine-tune a slim UNet so it matches the original again on neutral prompts.

    uniforget retrain --slim engines/NAME/unet --out engines/NAME/unet-retrained [--model toy] [--prompts FILE]
        [--steps 200] [--lr 1e-5] [--batch 8] [--sampler-steps 8] [--checkpoint-every 50] [--resume]
        [--device cpu] [--precision fp32|bf16]

The original model is the teacher: the slim UNet learns to reproduce its N-step samples on neutral prompts
(default), or its noise predictions along its trajectories (--objective noise, cheaper; no images needed). The output is a slim UNet folder with the same plan and shapes plus
uniforget_retrain.json (options, prompts digest, loss, neutral drift before/after on held-out prompts).
Export it with `uniforget export`, which checks the retrained UNet against ONNX Runtime. Data-parallel:

    accelerate launch --multi_gpu --num_processes 4 -m exporter.cli retrain --slim DIR --out DIR --precision bf16
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.argtypes import count_or_zero, int_at_least, nonnegative_float, positive_float, positive_int
from exporter.commands import STAGE_HELP, DocstringFormatter, quiet_libraries
from uniforget.configs import OBJECTIVES, RETRAIN_PRECISIONS, RetrainConfig

if TYPE_CHECKING:
    from uniforget.retrain import RetrainRequest, RetrainResult


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = RetrainConfig()
    p = subparsers.add_parser("retrain", help=STAGE_HELP["retrain"],
                              description=__doc__, formatter_class=DocstringFormatter)
    p.add_argument("--slim", type=Path, required=True, help="slim UNet folder to retrain (uniforget prune's --out)")
    p.add_argument("--out", type=Path, required=True, help="retrained slim UNet folder to write")
    p.add_argument("--model", default="toy",
                   help="the original model the slim UNet was cut from: 'toy', a diffusers folder or a .safetensors file")
    p.add_argument("--prompts", type=Path, default=None,
                   help="neutral prompts, one per line (default: the toy's training prompts, else a shipped generic list)")
    p.add_argument("--steps", type=int_at_least(0, "0 = copy the slim UNet unchanged"), default=d.steps,
                   help="optimizer steps (0 = copy the slim UNet unchanged)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (cosine annealed)")
    p.add_argument("--lr-min", type=nonnegative_float, default=d.lr_min, help="cosine floor")
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay,
                   help="AdamW decoupled weight decay")
    p.add_argument("--batch", type=positive_int, default=d.batch,
                   help="trajectories per step (global, across processes)")
    p.add_argument("--sampler-steps", type=positive_int, default=d.sampler_steps,
                   help="N: sampler steps of the trajectory (the noise objective draws its states from it)")
    p.add_argument("--guidance-scale", type=nonnegative_float, default=None,
                   help=f"teacher trajectory guidance (default: the model's own, else {d.guidance_scale})")
    p.add_argument("--precision", choices=RETRAIN_PRECISIONS, default=d.precision,
                   help="autocast dtype for both UNets (weights stay fp32)")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="noise: match the teacher's noise predictions on its own trajectory states (cheap); "
                        "trajectory: match its N-step final latents, backpropagating through the sampler")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--drift-prompts", type=count_or_zero, default=4,
                   help="neutral prompts held out of the retrain to measure drift before/after on (0 = skip)")
    p.add_argument("--checkpoint-every", type=count_or_zero, default=50, metavar="K",
                   help="save resumable state every K steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--device", choices=("cpu",), default=None, help="force CPU (default: accelerate's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace) -> RetrainConfig:
    """Every option built and checked, with no torch import: a bad one costs milliseconds."""
    d = RetrainConfig()
    return RetrainConfig(steps=args.steps, lr=args.lr, lr_min=args.lr_min, weight_decay=args.weight_decay,
                         batch=args.batch, sampler_steps=args.sampler_steps, objective=args.objective,
                         guidance_scale=d.guidance_scale if args.guidance_scale is None else args.guidance_scale,
                         seed=args.seed, precision=args.precision)


def _request(args: argparse.Namespace, cfg: RetrainConfig) -> RetrainRequest:
    from uniforget.retrain import RetrainRequest

    return RetrainRequest(slim=args.slim, out=args.out, model=args.model, config=cfg, prompts_file=args.prompts,
                          checkpoint_every=args.checkpoint_every, resume=args.resume, device=args.device,
                          guidance_scale=args.guidance_scale, drift_prompts=args.drift_prompts,
                          overwrite=args.overwrite)


def check_paths(args: argparse.Namespace) -> None:
    """--out, --slim, --model and --prompts before the models load or a progress bar starts: one line, exit 2."""
    from exporter.publish import check_can_create, check_model, check_prompts_file, check_slim_folder

    check_can_create(args.out, "--out", replace=args.overwrite)
    check_slim_folder(args.slim, "--slim")
    check_model(args.model)
    if args.prompts is not None:
        check_prompts_file(args.prompts)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_paths(args)
    req = _request(args, cfg)
    quiet_libraries(getattr(args, "verbose", 0))
    from uniforget.retrain import run_retrain

    result = run_retrain(req) if args.no_progress else _with_progress(req)
    s = result.summary
    loss = "-" if s.get("final_loss") is None else f"{s['first_loss']:.3g} -> {s['final_loss']:.3g}"
    before, after = s.get("neutral_drift_before"), s.get("neutral_drift_after")
    drift = "-" if not before else f"{before['rel']:.3g} -> {after['rel']:.3g}"
    print(f"wrote {req.out}  loss {loss}  neutral drift (rel, held-out) {drift}  ({result.wall_s:.0f} s)")
    return 0


def _with_progress(req: RetrainRequest) -> RetrainResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from uniforget.retrain import RetrainStep, run_retrain

    cols = (TextColumn("retrain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"))
    with Progress(*cols, transient=False) as bar:
        task = bar.add_task("retrain", total=req.config.steps, info="")

        def update(s: RetrainStep) -> None:
            bar.update(task, completed=s.step, info=f"loss {s.loss:.3e}  lr {s.lr:.3g}")

        return run_retrain(req, callback=update)
