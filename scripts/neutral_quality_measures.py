"""Candidate neutral-only quality budgets, scored against the toy's judge on the same gated models.

    python scripts/neutral_quality_measures.py --candidates runs/q/cands.json --out runs/q/measures.json

Why: `--beta auto` budgets the per-seed relative latent drift on held-out neutral prompts. Once the weights are
tuned (`--tune-weights`), per-seed trajectories move more than image quality does (docs/dememorization.md, 0h),
so a budget that scores neutral *quality* without an outside model could let auto keep stronger rungs. This
script computes, for each candidate (a MaskSet, optionally with the tuned UNet it gates), on the 24 neutral
prompts `--beta auto` holds out (calibrate.split_prompts), with no memorized caption, planted image or
evaluation prompt read:

- `drift`: the budgeted measure, relative RMS final-latent difference to the original, same seed;
- `teacher_loss`: the original's denoising loss on the candidate's samples, relative to its loss on its own
  samples (a likelihood proxy: does the original find the candidate's images plausible?);
- `cand_loss`: the candidate's denoising loss on the original's samples, relative (does it still model them?);
- `classifier_acc`: the original as a zero-shot diffusion classifier (lowest denoising loss over the held-out
  prompts) assigning each candidate sample to its own prompt (text alignment, `--classifier-seeds` seeds);
- `mmd`: per-prompt RBF MMD^2 between `--set-seeds` candidate samples and as many original samples drawn at
  other seeds (set level: the same distribution, not the same image), and `feature_shift`, the shift of the
  pooled per-channel mean/std, in units of the original's spread.

It also prints the drift the original itself shows under harmless sampler changes (N and guidance), the scale
the drift budget is compared with. Each candidate's `judge` (from `uniforget validate`) is copied through for
the comparison; it is never computed or used here.

Candidates JSON: [{"name": ..., "masks": PATH (optional), "unet": DIR (optional, a tuned copy), "judge": 95.1}].
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    from diffusers import UNet2DConditionModel

    from uniforget.calibrate import CalibrationConfig, split_prompts
    from uniforget.evaluate import model_guidance
    from uniforget.gating import attach_gates
    from uniforget.masks import MaskSet
    from uniforget.models import load_pipeline
    from uniforget.prompts import load_prompts
    from uniforget.sampler import SamplerConfig, encode_prompts, latent_shape, sample

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--candidates", type=Path, required=True)
    ap.add_argument("--classifier-seeds", type=int, default=2)
    ap.add_argument("--set-seeds", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cands = json.loads(args.candidates.read_text())
    for c in cands:
        for key in ("masks", "unet"):
            if c.get(key) and not Path(c[key]).exists():
                raise SystemExit(f"error: candidate {c['name']!r}: {key} {c[key]} does not exist")

    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    _, held = split_prompts(load_prompts(None, model=args.model), CalibrationConfig().holdout)
    cond = encode_prompts(pipe, held)
    n_prompts = len(held)
    scfg = SamplerConfig(steps=6, guidance_scale=model_guidance(args.model) or 7.5)
    acp = pipe.scheduler.alphas_cumprod
    loss_ts = torch.linspace(20, len(acp) - 20, 10).long()
    clf_ts = torch.linspace(100, len(acp) - 100, 8).long()
    orig = pipe.unet
    shape = latent_shape(orig, n_prompts)

    @torch.no_grad()
    def draw(unet, seed: int, cfg: SamplerConfig = scfg) -> torch.Tensor:
        z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        return sample(unet, pipe.scheduler, z, cond, cfg)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.sqrt(float((a - b).pow(2).sum()) / float(b.pow(2).sum()))

    @torch.no_grad()
    def denoise_loss(unet, x: torch.Tensor) -> float:
        g = torch.Generator().manual_seed(99)
        total = 0.0
        for t in loss_ts:
            e = torch.randn(x.shape, generator=g)
            xt = acp[t].sqrt() * x + (1 - acp[t]).sqrt() * e
            total += float((unet(xt, t, encoder_hidden_states=cond.cond, return_dict=False)[0] - e).pow(2).mean())
        return total / len(loss_ts)

    @torch.no_grad()
    def classifier_acc(xs: list[torch.Tensor]) -> float:
        g, hits, n = torch.Generator().manual_seed(7), 0, 0
        for x in xs:
            for i in range(n_prompts):
                losses = torch.zeros(n_prompts)
                for t in clf_ts:
                    e = torch.randn((1, *x.shape[1:]), generator=g)
                    xt = (acp[t].sqrt() * x[i:i + 1] + (1 - acp[t]).sqrt() * e).expand(n_prompts, -1, -1, -1)
                    pred = orig(xt, t, encoder_hidden_states=cond.cond, return_dict=False)[0]
                    losses += (pred - e).pow(2).flatten(1).mean(1)
                hits += int(int(losses.argmin()) == i)
                n += 1
        return hits / n

    def sample_set(unet, base_seed: int) -> torch.Tensor:  # (P, S, C, h, w)
        return torch.stack([draw(unet, base_seed + s) for s in range(args.set_seeds)], 1)

    def mmd2(a: torch.Tensor, b: torch.Tensor, bw: float) -> float:
        def k(x, y):
            return torch.exp(-torch.cdist(x, y).pow(2) / (2 * bw * bw))
        n, m = len(a), len(b)
        kaa, kbb = k(a, a), k(b, b)
        return float((kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1))
                     - 2 * k(a, b).mean())

    ref = draw(orig, 1235)
    ref_loss = denoise_loss(orig, ref)
    ref_clf = [draw(orig, 1235 + s) for s in range(args.classifier_seeds)]
    ref_set = sample_set(orig, 5000)  # other seeds than the candidates' sets (1000 + s)
    flat = ref_set.flatten(0, 1).flatten(1)
    bw = float(torch.cdist(flat, flat).median())

    def set_measures(x: torch.Tensor) -> dict[str, float]:
        mmd = sum(mmd2(x[i].flatten(1), ref_set[i].flatten(1), bw) for i in range(n_prompts)) / n_prompts
        f = torch.cat([x.mean((-1, -2)), x.std((-1, -2))], -1)
        fr = torch.cat([ref_set.mean((-1, -2)), ref_set.std((-1, -2))], -1)
        shift = ((f.mean(1) - fr.mean(1)).pow(2).sum(-1) / fr.var(1).sum(-1).clamp_min(1e-8)).mean()
        return {"mmd": mmd, "feature_shift": float(shift)}

    sampler_refs = {f"N={n}": rel(draw(orig, 1235, SamplerConfig(steps=n, guidance_scale=scfg.guidance_scale)), ref)
                    for n in (8, 12, 25, 50)}
    sampler_refs.update({f"guidance {g:g}": rel(draw(orig, 1235, SamplerConfig(steps=scfg.steps, guidance_scale=g)),
                                                ref) for g in (scfg.guidance_scale - 0.5, scfg.guidance_scale + 2)})
    changes = ", ".join(f"{k} {v:.3f}" for k, v in sampler_refs.items())
    print(f"drift of the original itself under sampler changes (vs N={scfg.steps}, guidance "
          f"{scfg.guidance_scale:g}): {changes}", flush=True)

    rows = []
    for c in cands:
        t0 = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(c["unet"]).eval() if c.get("unet") else orig
        gates = MaskSet.load(c["masks"]).gate_values() if c.get("masks") else {}
        with attach_gates(unet, gates):
            x = draw(unet, 1235)
            cand_loss = denoise_loss(unet, ref) / ref_loss - 1
            clf_x = [draw(unet, 1235 + s) for s in range(args.classifier_seeds)]
            sets = set_measures(sample_set(unet, 1000))
        row = {"name": c["name"], "judge": c.get("judge"), "drift": rel(x, ref),
               "teacher_loss": denoise_loss(orig, x) / ref_loss - 1, "cand_loss": cand_loss,
               "classifier_acc": classifier_acc(clf_x), **sets, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    out = {"model": args.model, "heldout_prompts": n_prompts, "sampler": {"steps": scfg.steps,
           "guidance": scfg.guidance_scale}, "original_classifier_acc": classifier_acc(ref_clf),
           "sampler_drift": sampler_refs, "candidates": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"original's own classifier accuracy {out['original_classifier_acc']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
