"""Apply gate values to a UNet without changing its weights: the "masked" (gated) model.

Each gate multiplies one unit's signal at a single point, through forward hooks on existing Linear /
LayerNorm modules (no weight is touched, and removing the hooks restores the original exactly):

- `heads`: the input of `attn.to_out[0]`, viewed as (B, T, heads, head_dim), is scaled per head;
  a closed head contributes nothing to the output projection (= its Q/K/V slice removed).
- `ffn`: the input of the feed-forward's output linear (B, T, hidden) is scaled per hidden neuron;
  for GEGLU that is value * gelu(gate) of that neuron (= its value and gate rows removed).
- `norm`: the output of the LayerNorm (B, T, C) is scaled per channel; a closed channel is a zero
  input column of every consumer linear.

At gate value exactly 1.0 the product `x * 1.0` is bit-identical to `x`, so a fresh gate set leaves the
model's outputs bit-identical (tested). Values may be fixed tensors or callables (learnable gates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .targets import GateTarget, discover_targets

GateSource = torch.Tensor | Callable[[], torch.Tensor]


def _value(src: GateSource) -> torch.Tensor:
    return src() if callable(src) else src


def gate_module(unet: nn.Module, target: GateTarget) -> nn.Module:
    """The module whose input (heads, ffn) or output (norm) a target's gates scale."""
    m = unet.get_submodule(target.path)
    if target.kind == "heads":
        return m.to_out[0]
    if target.kind == "ffn":
        return m.net[-1] if isinstance(m.net[-1], nn.Linear) else m.net[2]
    if target.kind == "norm":
        return m
    raise ValueError(f"unknown gate kind {target.kind!r}")


@dataclass
class GateHandles:
    """Hooks attached by `attach_gates`; call `remove()` (or use as a context manager) to restore the model."""

    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> GateHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _scale_last(x: torch.Tensor, g: torch.Tensor, repeat: int) -> torch.Tensor:
    g = g.to(dtype=x.dtype, device=x.device)
    if repeat > 1:
        g = g.repeat_interleave(repeat)  # (heads,) -> (heads * head_dim,)
    return x * g


def attach_gates(unet: nn.Module, gates: Mapping[str, GateSource],
                 targets: list[GateTarget] | None = None) -> GateHandles:
    """Hook every target named in `gates` (key `<path>/<kind>`) so its units are scaled by the gate values."""
    by_key = {t.key: t for t in (targets or discover_targets(unet))}
    unknown = [k for k in gates if k not in by_key]
    if unknown:
        raise KeyError(f"gate keys not found in this UNet: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    handles = GateHandles()
    for key, src in gates.items():
        t = by_key[key]
        mod = gate_module(unet, t)
        if t.kind == "norm":
            def post(_m, _inp, out, src=src):
                return _scale_last(out, _value(src), 1)

            handles.handles.append(mod.register_forward_hook(post))
        else:
            repeat = 1
            if t.kind == "heads":
                if mod.in_features % t.size:
                    raise ValueError(f"{t.path}: to_out width {mod.in_features} not divisible by {t.size} heads")
                repeat = mod.in_features // t.size

            def pre(_m, args, src=src, repeat=repeat):
                return (_scale_last(args[0], _value(src), repeat), *args[1:])

            handles.handles.append(mod.register_forward_pre_hook(pre))
    return handles
