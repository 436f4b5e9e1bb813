"""Benchmark one mask-learning step: wall time and peak memory, with and without activation checkpointing.

One step = the frozen original's N-step sample (no grad) + the gated N-step sample + backward through all
N steps + AdamW update, exactly as `uniforget.learn.learn_masks` runs it. Random weights, random text
embeddings (77 tokens), so no checkpoint download is needed.

    # GPU, the numbers that matter (SD1.5 geometry, 64x64 latents, N=4, batch 4, bf16 autocast)
    python scripts/bench_learn_step.py --geometry sd15 --json engines/bench_learn_step.json
    # CPU smoke check (tiny geometry, seconds)
    OMP_NUM_THREADS=1 python scripts/bench_learn_step.py --geometry sd1 --steps 3 --precision fp32

Prints a table and writes JSON (median and min step time after warm-up, peak memory per mode).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from uniforget.geometries import SD15, TINY, build_unet
from uniforget.learn import LearnConfig, learn_masks
from uniforget.sampler import CHECKPOINTING, Conditioning, SamplerConfig


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def bench_mode(unet, cond: Conditioning, mode: str, args: argparse.Namespace) -> dict:
    cfg = LearnConfig(beta=2.0, steps=args.warmup + args.steps, batch=args.batch, lr=0.05,
                      sampler=SamplerConfig(steps=args.sampler_steps, guidance_scale=7.5, checkpointing=mode),
                      precision=args.precision, height=args.latent, width=args.latent)
    cuda = unet.device.type == "cuda"
    stamps: list[float] = []

    def tick(_stats) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    learn_masks(unet, _scheduler(), cond, cfg, callback=tick)
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)][args.warmup:]
    return {
        "checkpointing": mode,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "timed_steps": len(times),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="sd15", choices=["sd15", *sorted(TINY)])
    p.add_argument("--latent", type=int, default=None, help="latent side (default 64 for sd15, 8 for tiny)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--sampler-steps", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--modes", default="none,unet,step", help=f"comma-separated subset of {CHECKPOINTING}")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    args.latent = args.latent or (64 if args.geometry == "sd15" else 8)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.geometry == "sd15" and device == "cpu":
        p.error("the SD1.5 geometry needs a CUDA GPU (hours on a CPU); use --geometry sd1 for a CPU smoke check")
    unet = build_unet(SD15 if args.geometry == "sd15" else TINY[args.geometry], seed=0).to(device)
    ctx = unet.config.cross_attention_dim
    seq = 77 if args.geometry == "sd15" else 7
    g = torch.Generator().manual_seed(0)
    n_prompts = max(8, args.batch)
    cond = Conditioning(torch.randn(n_prompts, seq, ctx, generator=g), torch.randn(n_prompts, seq, ctx, generator=g))
    if unet.config.addition_embed_type == "text_time":
        text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(n_prompts, text_dim, generator=g), "time_ids": torch.full((n_prompts, 6), 64.0)}
        cond = Conditioning(cond.cond, cond.uncond, added, dict(added))

    rows = [bench_mode(unet, cond, m.strip(), args) for m in args.modes.split(",") if m.strip()]
    env = {
        "geometry": args.geometry, "latent": args.latent, "batch": args.batch, "sampler_steps": args.sampler_steps,
        "precision": args.precision, "guidance_scale": 7.5, "device": torch.cuda.get_device_name() if device == "cuda"
        else platform.processor() or "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
    }
    print(f"mask-learning step: {env['geometry']} ({env['unet_params_m']:.1f} M params), latents {args.latent}x"
          f"{args.latent}, N={args.sampler_steps}, batch {args.batch}, {args.precision}, CFG, on {env['device']}")
    print(f"{'checkpointing':<14}{'median s/step':>14}{'min s/step':>12}{'peak GiB':>10}")
    for r in rows:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['checkpointing']:<14}{r['step_s_median']:>14.3f}{r['step_s_min']:>12.3f}{mem:>10}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
