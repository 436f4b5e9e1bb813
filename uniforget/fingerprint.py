"""Model fingerprints: tie MaskSets and plans to the exact UNet they were made for.

Hash of the UNet config, every tensor's name and shape, and a digest of a strided sample of each
tensor's values (a full hash of a 3 GB UNet would take too long; a sample catches another checkpoint).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

_SAMPLES_PER_TENSOR = 64


def _config_dict(unet: nn.Module) -> dict:
    cfg = getattr(unet, "config", None)
    if cfg is None:
        return {}
    d = dict(cfg)
    return {k: v for k, v in d.items() if not k.startswith("_")}


def model_fingerprint(unet: nn.Module) -> str:
    """A 16-hex-digit fingerprint of config + tensor shapes + sampled weights (dtype-independent)."""
    h = hashlib.sha256()
    h.update(json.dumps(_config_dict(unet), sort_keys=True, default=str).encode())
    for name, t in sorted(unet.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float32)
        # round so that fp16/bf16 copies of the same weights fingerprint alike
        h.update(sample.mul(1e3).round().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]
