"""Parameter and FLOP counts of a dense or slim UNet at a stated reference shape, without touching weights.

FLOPs come from torch.utils.flop_counter.FlopCounterMode run on a meta-device copy: shapes only, so an
SD1.5-size UNet is counted in about a second on any machine. On meta, scaled-dot-product attention runs
through its math path, so the attention matmuls (QK^T and AV) are counted too (on CPU torch's fused
attention kernel is not counted at all). Convention: 2 FLOPs per multiply-accumulate, forward only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .configs import ReferenceShape as ReferenceShape  # re-exported

log = logging.getLogger(__name__)


def meta_copy(unet: nn.Module) -> nn.Module:
    """A dense UNet of the same config with every tensor on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return type(unet).from_config(unet.config).eval()


def param_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _to(x: Any, device: str) -> Any:
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def reference_inputs(unet: nn.Module, ref: ReferenceShape, device: str | torch.device = "cpu",
                     seed: int = 0) -> dict[str, Any]:
    """Random UNet inputs of the reference shape (SDXL's added conditioning included when the config asks)."""
    from .geometries import example_inputs

    inputs = example_inputs(unet, batch=ref.batch, height=ref.height, width=ref.width, seq_len=ref.seq_len,
                            seed=seed)
    return _to(inputs, str(device))


def count_flops(meta_model: nn.Module, ref: ReferenceShape) -> int | None:
    """Forward FLOPs of a meta-device UNet at `ref`; None (with a warning) if the forward cannot run on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = reference_inputs(meta_model, ref, device="meta")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            meta_model(**inputs)
    except Exception as e:  # a UNet variant whose forward needs real values; counts are informative only
        log.warning("could not count FLOPs on the meta device (%s: %s); FLOPs left out", type(e).__name__, e)
        return None
    return int(fc.get_total_flops())
