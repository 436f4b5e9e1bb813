"""Gate targets: which units of a UNet can be gated, addressed by diffusers module path plus kind.

Discovery walks the module tree for BasicTransformerBlock-like blocks (anything holding `attn1`,
`ff` and `norm1`), so SD1.x, SD2.x and SDXL geometries need no per-model code (ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .configs import KINDS as KINDS  # re-exported


@dataclass(frozen=True)
class GateTarget:
    """One gated module: `path` is the diffusers module path, `size` the number of gates."""

    path: str
    kind: str  # "heads" | "ffn" | "norm"
    size: int

    @property
    def key(self) -> str:
        """The MaskSet key: `<module path>/<kind>`."""
        return f"{self.path}/{self.kind}"


def ffn_hidden_size(ff: nn.Module) -> int:
    """Hidden width of a diffusers FeedForward (GEGLU/GELU/ApproximateGELU): the output linear's input width."""
    out = ff.net[-1] if isinstance(ff.net[-1], nn.Linear) else ff.net[2]
    return int(out.in_features)


def _is_transformer_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("attn1", "ff", "norm1")) and isinstance(m.norm1, nn.LayerNorm)


def iter_transformer_blocks(unet: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Yield (path, block) for every transformer block in the UNet, in module order."""
    for name, m in unet.named_modules():
        if _is_transformer_block(m):
            yield name, m


def discover_targets(unet: nn.Module, kinds: Iterable[str] = KINDS) -> list[GateTarget]:
    """All gate targets of the requested kinds, in a stable order (module order, then attn1/attn2/ff/norms)."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown target kind(s) {bad}; choose from {list(KINDS)}")
    out: list[GateTarget] = []
    for path, block in iter_transformer_blocks(unet):
        if "heads" in kinds:
            for attn_name in ("attn1", "attn2"):
                attn = getattr(block, attn_name, None)
                if attn is not None:
                    out.append(GateTarget(f"{path}.{attn_name}", "heads", int(attn.heads)))
        if "ffn" in kinds and block.ff is not None:
            out.append(GateTarget(f"{path}.ff", "ffn", ffn_hidden_size(block.ff)))
        if "norm" in kinds:
            for norm_name in ("norm1", "norm2", "norm3"):
                norm = getattr(block, norm_name, None)
                if isinstance(norm, nn.LayerNorm):
                    out.append(GateTarget(f"{path}.{norm_name}", "norm", int(norm.normalized_shape[0])))
    return out
