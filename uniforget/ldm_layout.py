"""Write a diffusers Stable Diffusion pipeline as one file in the original (LDM / SGM) key layout.

Why: users hold `v1-5-pruned-emaonly.safetensors`-style files, not diffusers folders. Tests and the
full-size load check need such files with known weights and no download, so this is the inverse of
diffusers' single-file conversion: loading the written file must give back the same tensors.

Layouts (prefixes of the original repositories):
    UNet          model.diffusion_model.{input_blocks,middle_block,output_blocks,time_embed,label_emb,out}
    VAE           first_stage_model.{encoder,decoder}.{down,mid,up}...
    SD1 text      cond_stage_model.transformer.text_model...          (HF CLIP, as is)
    SD2 text      cond_stage_model.model.transformer.resblocks...     (OpenCLIP: fused q/k/v)
    SDXL text     conditioner.embedders.0.transformer.text_model...   (CLIP-L)
                  conditioner.embedders.1.model.transformer.resblocks (OpenCLIP bigG + text_projection)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT_1 = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, pairs: Iterable[tuple[str, str]]) -> str:
    """Rename the first dotted component of `rest` (e.g. 'norm1.weight' -> 'in_layers.0.weight')."""
    for new, old in pairs:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    per = int(config["layers_per_block"]) + 1  # resnets per down block plus its downsampler slot
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        p = key.split(".")
        if p[0] == "down_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * per}.0.op.{'.'.join(p[5:])}"
            else:
                j, rest = int(p[3]), ".".join(p[4:])
                slot = f"input_blocks.{i * per + j + 1}"
                new = f"{slot}.0.{_sub(rest, _UNET_RESNET)}" if kind == "resnets" else f"{slot}.1.{rest}"
        elif p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
                new = f"output_blocks.{i * per + per - 1}.{2 if has_attn else 1}.{'.'.join(p[4:])}"
            else:
                j, rest = int(p[3]), ".".join(p[4:])
                slot = f"output_blocks.{i * per + j}"
                new = f"{slot}.0.{_sub(rest, _UNET_RESNET)}" if kind == "resnets" else f"{slot}.1.{rest}"
        elif p[0] == "mid_block":
            j, rest = int(p[2]), ".".join(p[3:])
            new = (f"middle_block.{2 * j}.{_sub(rest, _UNET_RESNET)}" if p[1] == "resnets"
                   else f"middle_block.1.{rest}")
        else:
            new = _sub(key, _UNET_TOP.items())
            if new == key:
                raise ValueError(f"UNet key {key!r} has no original-layout name here")
        out[UNET + new] = t
    return out


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` keys (mid attention as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        p = key.split(".")
        if len(p) > 2 and p[1] in ("down_blocks", "up_blocks"):
            side, i, kind = p[0], int(p[1 + 1]), p[3]
            level = i if p[1] == "down_blocks" else n_up - 1 - i  # the decoder counts its levels upwards
            name = "down" if p[1] == "down_blocks" else "up"
            if kind in ("downsamplers", "upsamplers"):
                new = f"{side}.{name}.{level}.{name}sample.{'.'.join(p[5:])}"
            else:
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{name}.{level}.block.{p[4]}.{rest}"
        elif len(p) > 2 and p[1] == "mid_block":
            side, j = p[0], int(p[3])
            if p[2] == "resnets":
                new = f"{side}.mid.block_{j + 1}.{'.'.join(p[4:]).replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{side}.mid.attn_1.{_sub('.'.join(p[4:]), _VAE_ATTN.items())}"
                if t.ndim == 2:
                    t = t[:, :, None, None]  # (out, in) linear -> (out, in, 1, 1) conv
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out[VAE + new] = t
    return out


def clip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> `<prefix>text_model.*` (the SD1 and SDXL-first-encoder layout)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): t for k, t in state.items()
            if not k.endswith("position_ids")}


def open_clip_to_original(state: Mapping[str, torch.Tensor], prefix: str, *, extra_layer: bool = False,
                          projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP's layout under `prefix` (fused in_proj, resblocks, text_projection (D, P)).

    `extra_layer` appends a copy of the last block as one more resblock: SD2 files hold all 24 OpenCLIP layers
    while diffusers keeps 23 (SD2 conditions on the penultimate layer) and drops the last one when loading.
    `projection` is the text_projection to write when the model has none (SD2's is unused but present).
    """
    s = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": s["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": s["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": s["final_layer_norm.weight"],
        prefix + "ln_final.bias": s["final_layer_norm.bias"],
    }
    proj = s.get("text_projection.weight")
    if proj is not None:
        out[prefix + "text_projection"] = proj.T.contiguous()  # OpenCLIP multiplies x @ P, (D, P)
    elif projection is not None:
        out[prefix + "text_projection"] = projection
    n = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.layers."))
    for i in range(n + (1 if extra_layer else 0)):
        src, dst = f"encoder.layers.{min(i, n - 1)}.", f"{prefix}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{w}"] = torch.cat([s[f"{src}self_attn.{q}_proj.{w}"] for q in "qkv"])
            out[f"{dst}attn.out_proj.{w}"] = s[f"{src}self_attn.out_proj.{w}"]
            out[f"{dst}ln_1.{w}"] = s[f"{src}layer_norm1.{w}"]
            out[f"{dst}ln_2.{w}"] = s[f"{src}layer_norm2.{w}"]
            out[f"{dst}mlp.c_fc.{w}"] = s[f"{src}mlp.fc1.{w}"]
            out[f"{dst}mlp.c_proj.{w}"] = s[f"{src}mlp.fc2.{w}"]
    return out


def pipeline_to_original(pipe: Any, family: str) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights in the original layout of `family` ('sd1', 'sd2' or 'sdxl')."""
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    te = pipe.text_encoder.state_dict()
    if family == "sd1":
        sd.update(clip_to_original(te, SD1_TEXT))
    elif family == "sd2":
        width = pipe.text_encoder.config.hidden_size
        sd.update(open_clip_to_original(te, SD2_TEXT, extra_layer=pipe.text_encoder.config.num_hidden_layers == 23,
                                        projection=torch.eye(width, dtype=next(iter(te.values())).dtype)))
    elif family == "sdxl":
        sd.update(clip_to_original(te, SDXL_TEXT_1))
        sd.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), SDXL_TEXT_2))
    else:
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', got {family!r}")
    return sd


def save_original(pipe: Any, family: str, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                  ema_only: bool = True) -> Path:
    """Write `pipe` as one original-layout .safetensors file (fp16 with `dtype=torch.float16`).

    `ema_only=False` writes a training checkpoint's pair instead: the pipeline's UNet as the EMA copy under
    `model_ema.*` (flattened names) and stand-in raw weights (EMA + 1) under `model.diffusion_model.*`, so a
    loader that picks the wrong copy is caught.
    """
    from safetensors.torch import save_file

    sd = pipeline_to_original(pipe, family)
    if not ema_only:
        unet = [k for k in sd if k.startswith(UNET)]
        sd.update({"model_ema." + k[len("model."):].replace(".", ""): sd[k] for k in unet})
        sd.update({k: sd[k] + 1 if sd[k].is_floating_point() else sd[k] for k in unet})
    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    # tensors that share storage (a copied layer) must be written once each
    seen: set[int] = set()
    for k, v in out.items():
        if v.data_ptr() in seen:
            out[k] = v.clone()
        seen.add(out[k].data_ptr())
    save_file(out, str(path))
    return Path(path)
