"""A .safetensors file's tensor names, shapes and dtypes from its header alone: no weights read, no torch
imported, so a command can refuse a file that is not one before any heavy import."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import ModelLoadError

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and dtypes (`{name: shape}`, `{name: dtype}`) from the header alone (no weights read)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20 or n > p.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{p} is not a readable .safetensors file: {e}") from e
    header.pop("__metadata__", None)
    shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}
    dtypes = {k: SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"].lower()) for k, v in header.items()}
    return shapes, dtypes
