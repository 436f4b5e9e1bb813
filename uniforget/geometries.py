"""UNet geometries as plain configs: tiny SD1.x / SD2.x / SDXL-like ones for tests, full SD1.5 for benchmarks.

Every pruning and export test runs over `TINY` so a change that only works for one family fails loudly.
The full-size config reproduces SD1.5's UNet shapes for random-weight GPU benchmarks (no hub download).
`tiny_pipeline` wraps a tiny UNet into a whole random-weight Stable Diffusion pipeline (tests, benchmarks).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY: dict[str, dict[str, Any]] = {
    # SD1.x: attention_head_dim means the number of heads; conv projection in/out of the transformer
    "sd1": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=48,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    # SD2.x: linear projection, per-level head counts
    "sd2": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=40,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    # SDXL: several transformer layers per block, added text/time conditioning
    "sdxl": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8,
    ),
}

# UNets whose config switches on an extra forward input (kept out of TINY so the pruning suite stays small):
# LCM's guidance embedding (`timestep_cond`), a class-id embedding and a projected class vector (`class_labels`)
CONDITIONED: dict[str, dict[str, Any]] = {
    "lcm": dict(TINY["sd1"], time_cond_proj_dim=16),
    "class_ids": dict(TINY["sd1"], num_class_embeds=10),
    "class_projection": dict(TINY["sd1"], class_embed_type="projection", projection_class_embeddings_input_dim=12),
}

# SDXL-like geometry: pooled text embedding width that `projection_class_embeddings_input_dim` implies
SDXL_TEXT_EMBED_DIM = 32

SD15: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def build_unet(config: dict[str, Any], seed: int = 0):
    """A random-init UNet2DConditionModel from a geometry config (eval mode, fp32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


# Stable Diffusion's own noise schedule; the DDIM extras are those of SD's scheduler_config.json
SD_SCHEDULE: dict[str, Any] = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)


def _byte_level_vocab() -> tuple[dict[str, int], str]:
    """(vocab.json, merges.txt) of a tiny CLIP BPE: every byte symbol with and without the word end, two merges."""
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, "#version: 0.2\nt h\nth e</w>\n"


def tiny_pipeline(geometry: str = "sd1", *, seed: int = 0, image_size: int = 16, text_len: int = 77,
                  scheduler: str = "ddim", unet=None):
    """A whole random-weight Stable Diffusion pipeline, no download: byte-level CLIP tokenizer, tiny CLIP text
    encoder(s), `TINY[geometry]` UNet (or the given `unet`), a VAE whose depth maps the UNet's latents to
    `image_size` pixels, and SD's noise schedule with DDIM or Euler. `geometry="sdxl"` builds an SDXL pipeline
    (two text encoders, pooled embeddings); `geometry="lcm"` a LatentConsistencyModelPipeline with the
    `CONDITIONED["lcm"]` UNet and LCMScheduler. Weights are drawn from `seed` (text encoders, VAE, then UNet)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if scheduler not in ("ddim", "euler"):
        raise ValueError(f"scheduler must be 'ddim' or 'euler', got {scheduler!r}")
    config = unet.config if unet is not None else {**TINY, **CONDITIONED}[geometry]
    sample_size, cross_dim = config["sample_size"], config["cross_attention_dim"]
    levels = (image_size // sample_size).bit_length()  # VAE downsamples 2x between levels
    if image_size != sample_size * 2 ** (levels - 1):
        raise ValueError(f"image_size {image_size} is not the UNet's sample size {sample_size} times a power of 2")

    vocab, merges = _byte_level_vocab()
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab))
        Path(d, "merges.txt").write_text(merges)
        tokenizer = CLIPTokenizer.from_pretrained(d, model_max_length=text_len)
    text_cfg = dict(vocab_size=len(vocab), intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=text_len, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if geometry == "sdxl":
        # the UNet attends to both encoders' hidden states side by side; the second's projection is the pooled input
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=cross_dim - SDXL_TEXT_EMBED_DIM, **text_cfg)).eval()
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=SDXL_TEXT_EMBED_DIM, projection_dim=SDXL_TEXT_EMBED_DIM, **text_cfg)).eval()
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=cross_dim, **text_cfg)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                        latent_channels=config["in_channels"], norm_num_groups=4, sample_size=image_size).eval()
    if unet is None:
        unet = build_unet(config, seed)
    sched = (DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False) if scheduler == "ddim"
             else EulerDiscreteScheduler(**SD_SCHEDULE))
    if geometry == "lcm":  # LCM-Dreamshaper's scheduler options on SD's schedule
        sched = LCMScheduler(**SD_SCHEDULE, original_inference_steps=50, set_alpha_to_one=True, clip_sample=False)
        pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                              scheduler=sched, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    elif geometry == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def example_inputs(unet, batch: int = 2, height: int | None = None, width: int | None = None,
                   seq_len: int = 7, seed: int = 0) -> dict[str, Any]:
    """Random UNet inputs matching the UNet's config (adds timestep_cond, class_labels and SDXL's
    added_cond_kwargs when the config asks for them)."""
    cfg = unet.config
    h = height or cfg.sample_size
    w = width or cfg.sample_size
    g = torch.Generator().manual_seed(seed)
    ctx_dim = cfg.cross_attention_dim
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, cfg.in_channels, h, w, generator=g),
        "timestep": torch.tensor(500.0).expand(batch).contiguous(),
        "encoder_hidden_states": torch.randn(batch, seq_len, ctx_dim, generator=g),
    }
    if cfg.get("time_cond_proj_dim") is not None:
        inputs["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=g)
    if cfg.get("num_class_embeds") is not None and cfg.get("class_embed_type") is None:
        inputs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (batch,), generator=g)
    elif cfg.get("class_embed_type") in ("projection", "simple_projection"):
        inputs["class_labels"] = torch.randn(batch, cfg.projection_class_embeddings_input_dim, generator=g)
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.rand(batch, 6, generator=g) * 64,
        }
    return inputs
