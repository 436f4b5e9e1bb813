"""The options of learning, planning and retraining, as frozen dataclasses that import no torch.

Each stage's module (`learn`, `plan`, `retrain`, `sampler`, `gates`, `targets`, `flops`) re-exports what it owns
from here. They live apart so that `uniforget learn|plan|prune|retrain` can build and check every option, and
refuse a bad one in a fraction of a second, before torch (2-3 s) is imported.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .errors import PlanError, UniforgetError

if TYPE_CHECKING:
    from torch import nn

KINDS = ("heads", "ffn", "norm")  # the gate kinds (targets.discover_targets)

# ----------------------------------------------------------------------------------------------------
# Sampling and gates

CHECKPOINTING = ("none", "step", "unet")


@dataclass(frozen=True)
class SamplerConfig:
    """How F(z0, N, c) is run. N=6 (not 2) is what targeted memorization in METHOD.md's trial."""

    steps: int = 6                 # N: scheduler steps from pure noise to the final latent
    guidance_scale: float = 7.5    # classifier-free guidance; <= 1 disables the unconditional branch
    checkpointing: str = "none"    # "none" | "step" | "unet"
    eta: float = 0.0               # DDIM eta (0 = deterministic), passed only to schedulers that take it

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class GateConfig:
    """Relaxation constants (stored in every MaskSet's metadata so gate values can be recomputed)."""

    lam: float = 0.0
    alpha: float = 1.0 / 3.0
    low: float = -0.1
    high: float = 1.1
    init: float = 1.0
    l1_scale: float = 0.4
    l1_shift: float = 1.0

    def to_meta(self) -> dict[str, str]:
        return {k: repr(v) for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> GateConfig:
        fields = cls.__dataclass_fields__
        return cls(**{k: float(meta[k]) for k in fields if k in meta})

# ----------------------------------------------------------------------------------------------------
# Mask learning

BETA_PRESETS = {"weak": 1.0, "medium": 2.0, "strong": 5.0}
OPTIMIZERS = ("adamw", "adam")
RECONS = ("relative", "absolute")
LEARN_PRECISIONS = ("fp32", "bf16", "fp16")  # learn.PRECISIONS maps them to autocast dtypes


class LearnError(UniforgetError):
    """Mask learning cannot start or resume with the given options, prompts or checkpoint."""


def parse_beta(value: str | float) -> float:
    """'weak' | 'medium' | 'strong' (1, 2, 5 as in the paper) or a non-negative number."""
    if isinstance(value, str) and value.lower() in BETA_PRESETS:
        return BETA_PRESETS[value.lower()]
    try:
        beta = float(value)
    except ValueError:
        raise LearnError(f"--beta must be auto, weak, medium, strong or a number >= 0, got {value!r}") from None
    if not math.isfinite(beta) or beta < 0:
        raise LearnError(f"--beta must be a finite number >= 0, got {value!r}")
    return beta


@dataclass(frozen=True)
class LearnConfig:
    """Everything that determines the learned MaskSet (a resumed run must use the same values)."""

    beta: float = 2.0
    steps: int = 300
    lr: float = 0.05              # METHOD.md: 0.5 prunes massively, 0.05 + cosine gave graded results
    lr_min: float = 0.0           # cosine annealing floor
    optimizer: str = "adamw"      # "adamw" = decoupled decay (default); "adam" = the paper's coupled decay
    weight_decay: float = 0.0
    batch: int = 8                # global batch (split across processes under accelerate)
    kinds: tuple[str, ...] = KINDS
    sampler: SamplerConfig = SamplerConfig()
    seed: int = 0
    precision: str = "fp32"       # autocast dtype for the UNet: fp32 | bf16 | fp16
    height: int | None = None     # latent size; None = the UNet's sample_size
    width: int | None = None
    gate_config: GateConfig = GateConfig()
    recon: str = "relative"       # reconstruction term / var(original latents) ("absolute": the paper's raw MSE)
    weight_lr: float = 0.0        # 0 = the paper's recipe (weights frozen); > 0 = also fine-tune a copy of the UNet's
    # weights at this rate against the frozen original, jointly with the gates (docs/dememorization.md, 0h)

    def __post_init__(self) -> None:
        problems = []
        if self.recon not in RECONS:
            problems.append(f"recon must be one of {RECONS} (got {self.recon!r})")
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch < 1:
            problems.append(f"batch must be >= 1 (got {self.batch})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be > 0 (got {self.lr})")
        if not (self.weight_lr >= 0 and math.isfinite(self.weight_lr)):
            problems.append(f"weight lr must be a finite number >= 0 (got {self.weight_lr})")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0 (got {self.weight_decay})")
        if self.beta < 0:
            problems.append(f"beta must be >= 0 (got {self.beta})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        if self.precision not in LEARN_PRECISIONS:
            problems.append(f"precision must be one of {LEARN_PRECISIONS} (got {self.precision!r})")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            problems.append(f"targets must be a non-empty subset of {KINDS} (got {list(self.kinds)})")
        if problems:
            raise LearnError("; ".join(problems))

    def to_json(self) -> str:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        if not self.weight_lr:  # the paper's recipe keeps the identity (and MaskSets) of runs made before the option
            del d["weight_lr"]
        return json.dumps(d, sort_keys=True)

# ----------------------------------------------------------------------------------------------------
# Planning

Ratio = float | str
DEFAULT_ALIGN = 8


@dataclass(frozen=True)
class ReferenceShape:
    """The UNet input the FLOP counts refer to: batch, latent height/width, text sequence length."""

    batch: int = 1
    height: int = 64
    width: int = 64
    seq_len: int = 77

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def for_unet(cls, unet: nn.Module, batch: int = 1, seq_len: int = 77) -> ReferenceShape:
        """Batch 1 (by default) at the UNet's native latent size."""
        s = int(unet.config.sample_size)
        return cls(batch=batch, height=s, width=s, seq_len=seq_len)

    def describe(self) -> str:
        return f"batch {self.batch}, latent {self.height}x{self.width}, {self.seq_len} text tokens"


def parse_ratio(ratio: Any) -> Ratio:
    """'auto' or a float in [0, 1); anything else (NaN, 1, -0.1, 'abc', True) is a PlanError."""
    if isinstance(ratio, str):
        if ratio.strip().lower() == "auto":
            return "auto"
        try:
            ratio = float(ratio)
        except ValueError:
            raise PlanError(f"--ratio must be 'auto' or a number in [0, 1), got {ratio!r}") from None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise PlanError(f"--ratio must be 'auto' or a number in [0, 1), got {ratio!r}")
    r = float(ratio)
    if math.isnan(r) or not 0.0 <= r < 1.0:
        raise PlanError(f"--ratio must be 'auto' or a number in [0, 1) (a fraction of UNet parameters to remove), "
                        f"got {ratio!r}")
    return r

# ----------------------------------------------------------------------------------------------------
# The brief neutral retrain

OBJECTIVES = ("noise", "trajectory")
RETRAIN_PRECISIONS = ("fp32", "bf16")  # retrain.PRECISIONS maps them to autocast dtypes


class RetrainError(UniforgetError):
    """The retrain cannot start or resume with the given options, models, prompts or checkpoint."""


@dataclass(frozen=True)
class RetrainConfig:
    """Everything that determines the retrained weights (a resumed run must use the same values)."""

    steps: int = 200              # "brief"; 0 = return the slim model unchanged
    lr: float = 1e-5              # fine-tuning rate for pretrained weights (not the masks' 0.05); chosen on
    # held-out neutral drift: at 1e-5 it fell in every run, at 1e-4 / 3e-5 it rose or stayed (docs, section 0g)
    lr_min: float = 0.0           # cosine annealing floor
    weight_decay: float = 0.0     # AdamW's decoupled decay; 0: nothing pulls weights away from the teacher's fit
    batch: int = 8                # global batch of trajectories (split across processes under accelerate)
    sampler_steps: int = 6        # N of the sampler run (trajectory) or walked for training states (noise)
    guidance_scale: float = 7.5   # CFG of the teacher trajectory (run_retrain uses the model's own by default)
    seed: int = 0
    precision: str = "fp32"       # autocast dtype for both UNets: fp32 | bf16 (weights stay fp32)
    objective: str = "trajectory"  # trajectory: N-step final latents | noise: predictions on teacher states
    # (trajectory is the default because on the toy only it lowered held-out neutral drift: docs/dememorization.md)
    height: int | None = None     # latent size; None = the UNet's sample_size
    width: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 0:
            problems.append(f"steps must be >= 0 (got {self.steps})")
        if self.batch < 1:
            problems.append(f"batch must be >= 1 (got {self.batch})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a finite number > 0 (got {self.lr})")
        if not (0 <= self.lr_min <= self.lr):
            problems.append(f"lr floor must be in [0, lr] (got {self.lr_min})")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            problems.append(f"weight decay must be >= 0 (got {self.weight_decay})")
        if self.sampler_steps < 1:
            problems.append(f"sampler steps must be >= 1 (got {self.sampler_steps})")
        if not (self.guidance_scale >= 0 and math.isfinite(self.guidance_scale)):
            problems.append(f"guidance scale must be a finite number >= 0 (got {self.guidance_scale})")
        if self.precision not in RETRAIN_PRECISIONS:
            problems.append(f"precision must be one of {RETRAIN_PRECISIONS} (got {self.precision!r})")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {OBJECTIVES} (got {self.objective!r})")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and v < 1:
                problems.append(f"{name} must be >= 1 (got {v})")
        if problems:
            raise RetrainError("; ".join(problems))

    @property
    def sampler(self) -> SamplerConfig:
        """The teacher trajectory's sampler (deterministic DDIM-style, eta 0)."""
        return SamplerConfig(steps=self.sampler_steps, guidance_scale=self.guidance_scale)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
