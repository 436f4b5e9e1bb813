"""Load the Stable Diffusion pipeline a user points at: a diffusers folder, a single-file checkpoint, or `toy`.

Single files are recognized and loaded offline by `uniforget.single_file` (shipped configs, no hub).
The embedded toy goes through exactly the same folder loader as a user's model. Every failure is a
`ModelLoadError` with one line saying what was expected; pickle checkpoints are refused unless the
caller passes `allow_pickle=True` (they can run arbitrary code when loaded).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)

TOY_DIR = Path(__file__).parent / "toy" / "pipeline"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def resolve_model_path(model: str | os.PathLike | None) -> Path | str:
    """'toy' (or None) -> the embedded pipeline folder; anything else is returned as a Path."""
    if model is None or str(model) == "toy":
        return TOY_DIR
    return Path(model)


def _check_unet(pipe: Any, source: str) -> Any:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise ModelLoadError(
            f"{source}: pipeline has no UNet2DConditionModel (found {type(unet).__name__}); "
            "uniforget prunes Stable Diffusion 1.x/2.x/XL UNets"
        )
    return pipe


_SINGLE_FILE_DEFAULTS: dict[str, Any] = {}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def set_single_file_defaults(config: str | os.PathLike | None = None, prediction_type: str | None = None) -> None:
    """What the CLIs' `--model-config DIR` / `--prediction-type` set for every single-file load of the run
    (every stage loads the model itself, so one option reaches them all). Checked here, before heavy work."""
    if config is not None:
        c = Path(config)
        if not (c / "model_index.json").is_file() and not (c / "unet" / "config.json").is_file():
            raise ModelLoadError(f"--model-config {config}: not a diffusers pipeline folder (no model_index.json)")
        _SINGLE_FILE_DEFAULTS["config"] = c
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"--prediction-type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        _SINGLE_FILE_DEFAULTS["prediction_type"] = prediction_type


def load_pipeline(model: str | os.PathLike | None = "toy", *, allow_pickle: bool = False,
                  config: str | os.PathLike | None = None, torch_dtype: Any = None,
                  prediction_type: str | None = None) -> Any:
    """Load a diffusers pipeline from `toy`, a pipeline folder, or a single-file checkpoint.

    A single file (SD1.x, SD2.x, SDXL base) loads offline with the configs the package ships
    (`uniforget.single_file`); `config` (a diffusers folder) overrides them, `prediction_type` the scheduler's.
    """
    path = resolve_model_path(model)
    if not isinstance(path, Path) or not path.exists():
        raise ModelLoadError(f"model not found: {model} (give a diffusers pipeline folder, a .safetensors "
                             "checkpoint, or 'toy')")
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    config = config if config is not None else _SINGLE_FILE_DEFAULTS.get("config")
    prediction_type = prediction_type or _SINGLE_FILE_DEFAULTS.get("prediction_type")
    return _load_single_file(path, allow_pickle=allow_pickle, config=config, torch_dtype=torch_dtype,
                             prediction_type=prediction_type)


def _load_folder(path: Path, torch_dtype: Any) -> Any:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index} is not valid JSON: {e}") from e
    if "unet" not in meta:
        raise ModelLoadError(f"{path}: pipeline has no 'unet' component (model_index.json lists {sorted(meta)})")
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    except Exception as e:  # diffusers raises many types; the user needs one line
        raise ModelLoadError(f"could not load pipeline folder {path}: {type(e).__name__}: {_first_line(e)}") from e
    pipe.set_progress_bar_config(disable=True)
    return _check_unet(pipe, str(path))


def _load_single_file(path: Path, *, allow_pickle: bool, config: Any, torch_dtype: Any,
                      prediction_type: str | None) -> Any:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(f"{path} is a pickle checkpoint ({suffix}), which can run arbitrary code when loaded; "
                             "convert it to .safetensors or pass --allow-pickle if you trust it")
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ModelLoadError(f"{path}: unsupported model file type '{suffix}' (want a diffusers folder, "
                             ".safetensors, or with --allow-pickle .ckpt)")
    from .single_file import load_single_file

    pipe = load_single_file(path, config=config, prediction_type=prediction_type, torch_dtype=torch_dtype,
                            allow_pickle=allow_pickle)
    return _check_unet(pipe, str(path))


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""
