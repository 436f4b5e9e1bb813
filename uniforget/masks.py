"""MaskSet: learned gate parameters for one UNet, saved as `masks.safetensors` (ARCHITECTURE.md).

One 1-D float32 tensor per gate target, keyed `<module path>/<kind>`; the header metadata records the
model fingerprint, the learning settings and the relaxation constants needed to turn parameters into gate
values. Loading against another model is refused with both fingerprints in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .checkpoint import load_with_header
from .errors import MaskSetError
from .gates import GateConfig, hard_concrete
from .targets import GateTarget


@dataclass(frozen=True)
class MaskSet:
    """Gate parameters (`logits`, the paper's M) per target key, plus provenance metadata."""

    logits: dict[str, torch.Tensor]
    model_fingerprint: str
    gate_config: GateConfig = GateConfig()
    meta: dict[str, str] = field(default_factory=dict)  # beta, steps, sampler_steps, prompts_sha256, ...

    def gate_values(self) -> dict[str, torch.Tensor]:
        """Hard-concrete gate values in [0, 1] per key (what the gated model multiplies by)."""
        return {k: hard_concrete(v.float(), self.gate_config) for k, v in self.logits.items()}

    def targets(self) -> list[GateTarget]:
        out = []
        for key, v in self.logits.items():
            path, kind = key.rsplit("/", 1)
            out.append(GateTarget(path, kind, int(v.numel())))
        return out

    def check_model(self, fingerprint: str) -> None:
        """Refuse to use these masks on another model."""
        if fingerprint != self.model_fingerprint:
            raise MaskSetError(
                f"MaskSet was learned for model {self.model_fingerprint} but this model is {fingerprint}; "
                "learn masks for this model (uniforget learn) or pass the model they were made for"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "uniforget.maskset/1",
            "model_fingerprint": self.model_fingerprint,
            "library_version": __version__,
            "gate_config": json.dumps(self.gate_config.to_meta()),
            **{k: str(v) for k, v in self.meta.items()},
        }
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.logits.items()}
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, expect_fingerprint: str | None = None) -> MaskSet:
        path = Path(path)
        if not path.is_file():
            raise MaskSetError(f"MaskSet file not found: {path}")
        logits, meta = load_with_header(path, MaskSetError, "safetensors MaskSet")
        if meta.get("format") != "uniforget.maskset/1" or "model_fingerprint" not in meta:
            raise MaskSetError(f"{path} is a safetensors file but not a uniforget MaskSet (no format/fingerprint)")
        bad = [k for k, v in logits.items() if v.ndim != 1 or "/" not in k]
        if bad:
            raise MaskSetError(f"{path}: malformed MaskSet entries {bad[:3]} (want 1-D tensors keyed path/kind)")
        gate_cfg = GateConfig.from_meta(json.loads(meta.pop("gate_config", "{}")))
        fp = meta.pop("model_fingerprint")
        for k in ("format", "library_version"):
            meta.pop(k, None)
        ms = cls(logits=logits, model_fingerprint=fp, gate_config=gate_cfg, meta=meta)
        if expect_fingerprint is not None:
            ms.check_model(expect_fingerprint)
        return ms


def mixed_maskset(unet: torch.nn.Module, seed: int = 0) -> MaskSet:
    """Gate parameters M ~ U(-0.45, 1.45) per unit, unit 0 of every target at -0.3 (closed).

    Why: exactness checks (plan, prune, slim save/load, retrain) need closed, fractional and open gates in every
    module at once; one definition keeps those tests on the same masks.
    """
    from .fingerprint import model_fingerprint
    from .targets import discover_targets

    g = torch.Generator().manual_seed(seed)
    logits = {}
    for t in discover_targets(unet):
        m = torch.rand(t.size, generator=g) * 1.9 - 0.45
        m[0] = -0.3
        logits[t.key] = m
    return MaskSet(logits, model_fingerprint(unet))


def random_maskset(unet: torch.nn.Module, seed: int = 0, kinds: tuple[str, ...] | None = None) -> MaskSet:
    """Gate parameters drawn i.i.d. from N(0, 1) per unit (`kinds`: which targets; None = all).

    Why: speed checks on random-weight geometries have no learned MaskSet, and latency does not depend on which
    units go, only on how many per module; `make_plan(unet, random_maskset(unet), ratio)` then removes the most
    negative draws first, spread over every module.
    """
    from .fingerprint import model_fingerprint
    from .targets import discover_targets

    g = torch.Generator().manual_seed(seed)
    logits = {t.key: torch.randn(t.size, generator=g) for t in discover_targets(unet)
              if kinds is None or t.kind in kinds}
    return MaskSet(logits=logits, model_fingerprint=model_fingerprint(unet),
                   meta={"source": f"random N(0,1) seed {seed}" + (f", kinds {','.join(kinds)}" if kinds else "")})
