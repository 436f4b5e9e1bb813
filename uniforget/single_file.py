"""Single-file Stable Diffusion checkpoints offline: tell the family from keys and shapes, load with shipped configs.

Why: users hold `v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.safetensors` or
`sd_xl_base_1.0.safetensors` on machines that cannot reach a model hub, and diffusers' `from_single_file`
fetches the matching diffusers configs from the hub unless given a folder. The package ships those configs
(`data/configs/<name>/`: model index, scheduler, UNet, VAE, text encoders) and CLIP's tokenizer
(`data/clip_tokenizer/`, one BPE for all three families), and this module picks the folder from the file.

Detection reads only the safetensors header (names, shapes, dtypes), so a wrong file is refused in
milliseconds with one line naming what it looks like (a LoRA, a VAE alone, a FLUX transformer, ...).

SD2.x files do not say whether they predict epsilon (512-base) or v (768); like diffusers we default to
v-prediction (SD 2.1 768), unless told otherwise by, in order: the caller's `prediction_type`, a sidecar
`<file>.yaml` beside the checkpoint (the original inference config: `parameterization: "v"` means v,
its absence epsilon), or a '512' / '768' in the file name.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .ldm_layout import SD1_TEXT, SD2_TEXT, SDXL_TEXT_1, SDXL_TEXT_2, UNET
from .safetensors_header import read_safetensors_header

log = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data"
CONFIGS = DATA / "configs"
CLIP_TOKENIZER = DATA / "clip_tokenizer"
PREDICTION_TYPES = ("epsilon", "v_prediction")
# SD2.x and SDXL's second tokenizer pad with "!" (OpenCLIP pads with id 0); CLIP-L pads with its end token
_OPEN_CLIP_PAD = "!"
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint is, and which shipped config loads it (and why that one)."""

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    config: str  # shipped config folder under data/configs: sd1, sd2-base, sd2-v, sdxl
    prediction_type: str
    prediction_source: str  # "override" | "sidecar yaml" | "file name" | "default" | "family"
    dtype: str  # the UNet's weight dtype in the file
    has_raw_and_ema: bool  # a training checkpoint holding both copies; the EMA copy is loaded
    context_dim: int  # cross-attention width the UNet expects
    tensors: int

    def describe(self) -> str:
        ema = ", EMA copy of a raw+EMA checkpoint" if self.has_raw_and_ema else ""
        return (f"{self.path.name}: {self.family} ({self.config}, {self.prediction_type} from {self.prediction_source}), "
                f"{self.dtype}{ema}, {self.tensors} tensors")


# ---------------------------------------------------------------------------------------------- reading

def _read_pickle_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes of a trusted pickle checkpoint (the caller passed allow_pickle); weights-only unpickling."""
    import torch

    try:
        sd = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ModelLoadError(f"{path} could not be read as a torch checkpoint: {type(e).__name__}: {e}") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return {k: tuple(v.shape) for k, v in tensors.items()}, {k: str(v.dtype).removeprefix("torch.") for k, v in
                                                           tensors.items()}


# ---------------------------------------------------------------------------------------------- detection

def _has(keys: Any, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _not_a_checkpoint(path: Path, what: str, hint: str) -> ModelLoadError:
    return ModelLoadError(f"{path.name} looks like {what}, not a whole Stable Diffusion checkpoint; {hint}")


def _other_kind(shapes: Shapes, path: Path) -> ModelLoadError:
    """The one-line error for a file that holds no SD UNet + text encoder: name what it looks like."""
    keys = list(shapes)
    need = "uniforget needs a full SD1.x/SD2.x/SDXL checkpoint (UNet, VAE and text encoder in one file)"
    lora = sum(1 for k in keys if re.search(r"lora[._](up|down|a|b)\b|\.lora_[AB]\.|lora_unet_|lora_te", k, re.I))
    if lora:
        return _not_a_checkpoint(path, f"a LoRA ({lora} low-rank adapter tensors)",
                                 "a LoRA is applied on top of a base model; " + need)
    if _has(keys, "double_blocks.") or _has(keys, "single_blocks.") or _has(keys, UNET + "double_blocks."):
        return _not_a_checkpoint(path, "a FLUX transformer", "uniforget prunes UNets, not diffusion transformers")
    if _has(keys, "joint_blocks.") or _has(keys, UNET + "joint_blocks."):
        return _not_a_checkpoint(path, "a Stable Diffusion 3 transformer",
                                 "uniforget prunes UNets, not diffusion transformers")
    if _has(keys, "control_model.") or _has(keys, "controlnet_cond_embedding."):
        return _not_a_checkpoint(path, "a ControlNet", need)
    vae_keys = ("encoder.conv_in.weight", "decoder.conv_in.weight")
    if all(k in shapes for k in vae_keys) or all("first_stage_model." + k in shapes for k in vae_keys):
        if not _has(keys, UNET):
            return _not_a_checkpoint(path, "a VAE alone (encoder/decoder weights only)", need)
    if "conv_in.weight" in shapes and _has(keys, "down_blocks."):
        return _not_a_checkpoint(path, "a diffusers-format UNet weights file",
                                 "give the whole diffusers pipeline folder (model_index.json) instead")
    if _has(keys, "text_model.") or _has(keys, "transformer.resblocks."):
        return _not_a_checkpoint(path, "a CLIP text encoder alone", need)
    if _has(keys, "emb_params") or _has(keys, "string_to_param"):
        return _not_a_checkpoint(path, "a textual-inversion embedding", need)
    first = ", ".join(sorted(keys)[:3]) or "no tensors"
    return ModelLoadError(f"{path.name} does not look like a Stable Diffusion checkpoint (first tensors: {first}); "
                          + need)


def _first_context_dim(shapes: Shapes) -> int | None:
    """Cross-attention width: the key projection of the first cross-attention layer reads the text states."""
    for k in sorted(shapes):
        if k.startswith(UNET) and k.endswith("attn2.to_k.weight"):
            return shapes[k][1]
    return None


def detect_family(shapes: Shapes, path: str | os.PathLike = "checkpoint") -> tuple[str, int]:
    """('sd1' | 'sd2' | 'sdxl', UNet context width) from names and shapes, or a ModelLoadError naming the kind."""
    path = Path(path)
    keys = list(shapes)
    if not _has(keys, UNET + "input_blocks."):
        raise _other_kind(shapes, path)
    in_ch = shapes.get(UNET + "input_blocks.0.0.weight", (0, 0))[1]
    if in_ch != 4:
        kind = {9: "an inpainting", 8: "an InstructPix2Pix"}.get(in_ch, f"a {in_ch}-channel")
        raise ModelLoadError(f"{path.name} looks like {kind} UNet ({in_ch} input channels); single-file loading "
                             "ships text-to-image configs only (4 channels): pass config=<a matching diffusers folder>")
    ctx = _first_context_dim(shapes)
    if ctx is None:
        raise ModelLoadError(f"{path.name}: the UNet has no cross-attention layer, so it is not a text-to-image "
                             "Stable Diffusion UNet")
    if _has(keys, SDXL_TEXT_2):
        family = "sdxl"
        widths = [shapes[SDXL_TEXT_1 + "text_model.embeddings.token_embedding.weight"][1]
                  if SDXL_TEXT_1 + "text_model.embeddings.token_embedding.weight" in shapes else 0,
                  shapes.get(SDXL_TEXT_2 + "token_embedding.weight", (0, 0))[1]]
        text_width = sum(widths)  # the UNet attends to both encoders' states side by side
        if not _has(keys, UNET + "label_emb."):
            raise ModelLoadError(f"{path.name} has SDXL's two text encoders but its UNet has no added conditioning "
                                 "(label_emb); not an SDXL base checkpoint")
    elif _has(keys, "conditioner.embedders.0.model."):
        raise ModelLoadError(f"{path.name} looks like an SDXL refiner (one OpenCLIP encoder in conditioner.embedders.0); "
                             "only SDXL base is shipped: pass config=<the refiner's diffusers folder>")
    elif _has(keys, SD2_TEXT):
        family, text_width = "sd2", shapes.get(SD2_TEXT + "token_embedding.weight", (0, 0))[1]
    elif _has(keys, SD1_TEXT):
        family = "sd1"
        text_width = next((s[1] for k, s in shapes.items()
                           if k.startswith(SD1_TEXT) and k.endswith("embeddings.token_embedding.weight")), 0)
    else:
        raise ModelLoadError(f"{path.name} holds a Stable Diffusion UNet but no text encoder (no cond_stage_model or "
                             "conditioner tensors); uniforget needs a full checkpoint")
    if text_width != ctx:
        raise ModelLoadError(f"{path.name}: the UNet's cross-attention reads width {ctx} but the {family} text "
                             f"encoder(s) in the file give {text_width}; the file mixes parts of different models")
    return family, ctx


def _sd2_prediction(path: Path) -> tuple[str, str]:
    """(prediction type, why) for an SD2.x file that does not say: sidecar yaml, then file name, then v."""
    for side in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if side.is_file():
            text = side.read_text(errors="replace")
            v = re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.M)
            return ("v_prediction" if v else "epsilon"), "sidecar yaml"
    name = path.name.lower()
    if "768" in name and "512" not in name:
        return "v_prediction", "file name"
    if "512" in name and "768" not in name:
        return "epsilon", "file name"
    return "v_prediction", "default"


def inspect_checkpoint(path: str | os.PathLike, *, prediction_type: str | None = None,
                       allow_pickle: bool = False) -> CheckpointInfo:
    """Family, config and prediction type of a single-file checkpoint, reading only its header."""
    p = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if p.suffix.lower() == ".safetensors":
        shapes, dtypes = read_safetensors_header(p)
    elif allow_pickle:
        shapes, dtypes = _read_pickle_shapes(p)
    else:
        raise ModelLoadError(f"{p} is not a .safetensors file")
    family, ctx = detect_family(shapes, p)
    unet_dtypes = Counter(d for k, d in dtypes.items() if k.startswith(UNET))
    dtype = unet_dtypes.most_common(1)[0][0] if unet_dtypes else "unknown"
    both = sum(1 for k in shapes if k.startswith("model_ema.")) > 100
    if family == "sd2":
        pred, why = (prediction_type, "override") if prediction_type else _sd2_prediction(p)
        config = "sd2-v" if pred == "v_prediction" else "sd2-base"
        if why == "default":
            log.warning("%s: an SD2.x file does not say its prediction type; assuming v-prediction at 768 px "
                        "(SD 2.1); pass prediction_type='epsilon' (or put the original .yaml beside it) for "
                        "512-base models", p.name)
    else:
        pred, why = (prediction_type, "override") if prediction_type else ("epsilon", "family")
        config = family
    return CheckpointInfo(p, family, config, pred, why, dtype, both, ctx, len(shapes))


# ---------------------------------------------------------------------------------------------- loading

def shipped_tokenizers(config_dir: Path, family: str) -> dict[str, Any]:
    """Tokenizers to hand to diffusers: the config folder's own if it has them, else the shipped CLIP BPE."""
    from transformers import CLIPTokenizer

    names = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
    out: dict[str, Any] = {}
    for name in names:
        if (config_dir / name).is_dir():
            continue  # diffusers loads it from the folder
        pad = _OPEN_CLIP_PAD if (family == "sd2" or name == "tokenizer_2") else "<|endoftext|>"
        out[name] = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER), pad_token=pad)
    return out


def _check_config_fits(info: CheckpointInfo, config_dir: Path) -> None:
    """Name the mismatch before diffusers fails on the first wrong tensor shape."""
    f = config_dir / "unet" / "config.json"
    if not f.is_file():
        raise ModelLoadError(f"config folder {config_dir} has no unet/config.json (give a diffusers pipeline folder)")
    cfg = json.loads(f.read_text())
    want = cfg.get("cross_attention_dim")
    want = want[0] if isinstance(want, list) else want
    if want != info.context_dim:
        raise ModelLoadError(f"{info.path.name} is {info.family} with cross-attention width {info.context_dim}, but the "
                             f"config at {config_dir} expects {want}: pass config=<the diffusers folder it came from>")


def load_single_file(path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                     prediction_type: str | None = None, torch_dtype: Any = None, allow_pickle: bool = False,
                     configs_root: str | os.PathLike | None = None) -> Any:
    """A diffusers pipeline from one checkpoint file, offline.

    `config` (a diffusers pipeline folder) overrides the shipped configs; `prediction_type` overrides the
    scheduler's (and for SD2.x picks 768-v or 512-base). Weights load as `torch_dtype` (float32 by default, so an
    fp16 file gives the same modules as a float32 one). `configs_root` (default: the shipped `CONFIGS`) holds one
    folder per config name.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    info = inspect_checkpoint(path, prediction_type=prediction_type, allow_pickle=allow_pickle)
    config_dir = Path(config) if config is not None else Path(configs_root or CONFIGS) / info.config
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(f"config {config_dir} is not a diffusers pipeline folder (no model_index.json)")
    _check_config_fits(info, config_dir)
    log.info("loading %s with config %s", info.describe(), config_dir)
    cls = StableDiffusionXLPipeline if info.family == "sdxl" else StableDiffusionPipeline
    kwargs: dict[str, Any] = dict(config=str(config_dir), local_files_only=True,
                                  torch_dtype=torch_dtype if torch_dtype is not None else torch.float32,
                                  **shipped_tokenizers(config_dir, info.family))
    if info.has_raw_and_ema:
        kwargs["extract_ema"] = True  # EMA weights are the ones meant for sampling
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(str(info.path), **kwargs)
    except Exception as e:  # diffusers raises many types; the user needs one line
        msg = str(e).strip().splitlines()
        raise ModelLoadError(f"could not load {info.path.name} as {info.family} with config {config_dir}: "
                             f"{type(e).__name__}: {msg[0] if msg else ''}") from e
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe
