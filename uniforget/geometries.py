"""UNet geometries as plain configs: tiny SD1.x / SD2.x / SDXL-like ones for tests, full SD1.5 for benchmarks.

Every pruning and export test runs over `TINY` so a change that only works for one family fails loudly.
The full-size config reproduces SD1.5's UNet shapes for random-weight GPU benchmarks (no hub download).
"""

from __future__ import annotations

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


def example_inputs(unet, batch: int = 2, height: int | None = None, width: int | None = None,
                   seq_len: int = 7, seed: int = 0) -> dict[str, Any]:
    """Random UNet inputs matching the UNet's config (adds SDXL's added_cond_kwargs when needed)."""
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
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": torch.rand(batch, 6, generator=g) * 64,
        }
    return inputs
