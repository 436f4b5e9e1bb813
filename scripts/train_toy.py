"""Train the embedded toy Stable Diffusion that memorizes planted images on purpose (TESTBED.md).

    python scripts/train_toy.py --spec uniforget/toy/spec.json --out uniforget/toy

Driven by a dataset spec (neutral generator settings + planted items, each an image and a caption), seeded
and reproducible for a fixed thread count. Writes, under --out: pipeline/ (a real diffusers folder: tokenizer,
CLIP text encoder, UNet2DConditionModel, AutoencoderKL, DDIM scheduler) and train_log.json (settings, losses,
wall time per stage). Another spec plants other images with no code change; the judge
(uniforget/toy/judge.py) needs no training, it reads the spec's shapes and colours.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uniforget.toy.data import eval_prompts, load_spec, training_pairs, vocabulary

# ---------------------------------------------------------------- tokenizer


def write_tokenizer(words: list[str], out: Path, max_length: int) -> None:
    """A CLIP BPE tokenizer (vocab.json + merges.txt) learned on the caption words, so each word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=100_000, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        min_frequency=1, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    # the trainer breaks frequency ties in hash-map order, which changes between processes: put merges in a
    # canonical order (shorter results first, so every merge's parts exist before it) and number the vocabulary
    # the same way, so the same spec always gives the same token ids (main() checks each word is one token)
    merges = sorted((tuple(m) for m in model["merges"]), key=lambda m: (len(m[0]) + len(m[1]), m))
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + sorted((t for t in model["vocab"] if t not in specials), key=lambda t: (len(t), t))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}, indent=2))


# ---------------------------------------------------------------- models


def make_models(vocab_size: int, max_length: int, args: argparse.Namespace):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=args.text_dim, intermediate_size=4 * args.text_dim, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=args.text_dim))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=args.latent_channels, norm_num_groups=16, sample_size=args.size)  # 32x32x3 -> 8x8xC
    unet = UNet2DConditionModel(
        sample_size=args.size // 4, in_channels=args.latent_channels, out_channels=args.latent_channels, layers_per_block=1,
        block_out_channels=tuple(args.unet_channels), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=args.text_dim, attention_head_dim=4)  # SD1.x semantics: 4 heads per block
    return text_encoder, vae, unet


def _relative(value):
    """Paths under the repository are recorded relative to it (logs travel with the package)."""
    root = Path(__file__).resolve().parents[1]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(root):
        return str(Path(value).resolve().relative_to(root))
    return value


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def to_chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() * 2 - 1  # (N, 3, H, W) in [-1, 1]


# ---------------------------------------------------------------- stages


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, g: torch.Generator, log: list) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr * cosine_lr(step, steps, 100)
        idx = torch.randint(len(images), (batch,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            mse = float(F.mse_loss(rec.detach(), x))
            log.append({"stage": "vae", "step": step, "mse": mse})
            print(f"vae step {step:5d}  mse {mse:.5f}", flush=True)
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])


def train_denoiser(unet, text_encoder, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
                   droppable: torch.Tensor, args: argparse.Namespace, g: torch.Generator, log: list) -> None:
    """Noise-prediction training; a caption is replaced by the empty one with probability --caption-dropout,
    only where `droppable` is set (all images, or the neutral ones alone: see --caption-dropout-on)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    ema = None
    for step in range(args.unet_steps):
        for pg in opt.param_groups:
            pg["lr"] = args.lr * cosine_lr(step, args.unet_steps, 300)
        idx = torch.randint(len(latents), (args.batch,), generator=g)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = (torch.rand(args.batch, generator=g) < args.caption_dropout) & droppable[idx]
        tok[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        ctx = text_encoder(tok)[0]
        pred = unet(xt, t, ctx).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if step % 100 == 0 or step == args.unet_steps - 1:
            el = time.time() - t0
            log.append({"stage": "unet", "step": step, "loss_ema": ema, "elapsed_s": el})
            print(f"unet step {step:6d}/{args.unet_steps}  loss(ema) {ema:.4f}  {el / 60:.1f} min", flush=True)
    unet.eval()
    text_encoder.eval()


# ---------------------------------------------------------------- main


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(Path(__file__).resolve().parents[1] / "uniforget/toy/spec.json"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "uniforget/toy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--latent-channels", type=int, default=8)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for guidance)")
    ap.add_argument("--caption-dropout-on", choices=("neutral", "all"), default="neutral",
                    help="which images may lose their caption: 'neutral' (default) keeps every planted caption, as in "
                         "a real corpus where duplicates are a vanishing share of what the unconditional model sees; "
                         "'all' (the v1 toy) lets the empty prompt learn the planted images as a global mode")
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--unet-channels", type=int, nargs=2, default=[64, 128])
    ap.add_argument("--guidance-scale", type=float, default=3.0, help="the pipeline's sampling default "
                    "(uniforget_toy.json); chosen on training captions and the signature, never on mask learning")
    ap.add_argument("--sampler-steps", type=int, default=20, help="written to the model card as the default")
    ap.add_argument("--threads", type=int, default=2)
    # a spec may carry its own recipe ("train": {"caption_dropout_on": "all", ...}): it replaces these defaults,
    # and flags given on the command line still win, so `--spec X` alone reproduces what X was shipped with
    pre, _ = ap.parse_known_args()
    recipe = json.loads(Path(pre.spec).read_text()).get("train", {})
    unknown = sorted(set(recipe) - {a.dest for a in ap._actions})
    if unknown:
        raise SystemExit(f"spec {pre.spec}: unknown keys in 'train': {unknown}")
    ap.set_defaults(**recipe)
    args = ap.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    spec = load_spec(args.spec)
    args.size = spec.size
    out = Path(args.out)
    stage_dir = out / "pipeline.partial"
    log: list = []
    times: dict[str, float] = {}
    t_all = time.time()

    words = vocabulary(spec)
    max_length = 32
    write_tokenizer(words, stage_dir / "tokenizer", max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(stage_dir / "tokenizer"))
    split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if len(tokenizer) <= 3 or split:
        raise SystemExit(f"tokenizer check failed: vocab {len(tokenizer)}, words split into pieces: {split}")
    text_encoder, vae, unet = make_models(len(tokenizer), max_length, args)

    images, captions = training_pairs(spec)
    n_neutral = len(images) - sum(m.repeats for m in spec.memorized)  # training_pairs puts neutral scenes first
    droppable = torch.ones(len(images), dtype=torch.bool)
    if args.caption_dropout_on == "neutral":
        droppable[n_neutral:] = False
    x = to_chw(images)
    t0 = time.time()
    train_vae(vae, x, args.vae_steps, 32, 2e-3, g, log)
    times["vae_s"] = time.time() - t0
    latents = encode_latents(vae, x)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    def tok(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids

    ids = tok(captions)
    empty = tok([""])[0]
    t0 = time.time()
    train_denoiser(unet, text_encoder, latents, ids, empty, droppable, args, g, log)
    times["unet_s"] = time.time() - t0

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(stage_dir), safe_serialization=True)
    defaults = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.sampler_steps,
                "height": spec.size, "width": spec.size}
    (stage_dir / "uniforget_toy.json").write_text(json.dumps(defaults, indent=2))
    final = out / "pipeline"
    if final.exists():
        import shutil

        shutil.rmtree(final)
    stage_dir.rename(final)
    times["total_s"] = time.time() - t_all
    (out / "train_log.json").write_text(json.dumps({
        "args": {k: _relative(v) for k, v in vars(args).items()}, "spec": _relative(args.spec), "times": times,
        "torch": torch.__version__, "threads": args.threads, "n_train_images": len(images),
        "n_eval_neutral_prompts": len(eval_prompts(spec)), "log": log}, indent=1))
    print(json.dumps(times))


if __name__ == "__main__":
    main()
