"""The slim-UNet directory: save a pruned UNet, load it back, and the file-level prune entry point.

Layout (ARCHITECTURE.md):

    config.json                           the original (dense) diffusers UNet config
    uniforget_plan.json                   the PruningPlan the weights were cut with
    diffusion_pytorch_model.safetensors   the pruned tensors; header: format + sha256 of the plan

`UNet2DConditionModel.from_pretrained` cannot rebuild a pruned UNet (its config holds one head count per
level), so loading builds the dense module from config on the meta device, applies the plan's shapes with
the same surgery that pruned it, checks every tensor name and shape, and loads strictly. A plan that does not
belong to the weights (edited, truncated, from another run) fails with one PlanError line. No pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import PlanError
from .flops import ReferenceShape, reference_inputs
from .plan import DEFAULT_ALIGN, PlanRequest, PruningPlan, load_source_unet, make_plan
from .prune import ParityResult, check_parity, prune_unet, require_parity

log = logging.getLogger(__name__)

FORMAT = "uniforget.slim_unet/1"
CONFIG_NAME = "config.json"
PLAN_NAME = "uniforget_plan.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def save_slim_unet(unet: nn.Module, plan: PruningPlan, out_dir: str | os.PathLike, *,
                   overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write the slim-UNet directory atomically: a temporary sibling, renamed into place when complete.
    `extra_files` (name -> text) are written into the folder before the rename (e.g. a retrain's record)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PlanError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / CONFIG_NAME).write_text(unet.to_json_string())  # diffusers' own config serialization
        plan.save(tmp / PLAN_NAME)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT, "plan_sha256": plan.digest()})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved slim UNet to %s", out)
    return out


def load_slim_unet(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a slim UNet from its directory (usable as `pipe.unet`); PlanError on any mismatch."""
    from diffusers import UNet2DConditionModel

    d = Path(path)
    for name in (CONFIG_NAME, PLAN_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise PlanError(f"{d} is not a slim UNet directory (missing {name})")
    plan = PruningPlan.load(d / PLAN_NAME)
    try:
        config = json.loads((d / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{d / CONFIG_NAME} is not valid JSON: {e}") from e
    try:
        with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for truncated/garbled files
        raise PlanError(f"{d / WEIGHTS_NAME} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise PlanError(f"{d / WEIGHTS_NAME} was not written by save_slim_unet (format {meta.get('format')!r})")
    if meta.get("plan_sha256") != plan.digest():
        raise PlanError(f"{d / PLAN_NAME} does not match the weights it sits with (plan sha256 "
                        f"{plan.digest()[:12]}, weights cut with {str(meta.get('plan_sha256'))[:12]}); "
                        "the plan was edited or copied from another prune run")
    with torch.device("meta"):
        try:
            model = UNet2DConditionModel.from_config(config).eval()
        except Exception as e:
            raise PlanError(f"{d / CONFIG_NAME}: cannot build a UNet from this config: {e}") from e
    try:
        prune_unet(model, plan, inplace=True, check_fingerprint=False)
    except (AssertionError, RuntimeError, IndexError) as e:
        raise PlanError(f"{d / PLAN_NAME} cannot be applied to the UNet in {CONFIG_NAME}: {e}") from e
    # clone: fresh, aligned allocations (BLAS results can depend on a buffer's alignment; bit-identical reloads)
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        state = {k: f.get_tensor(k).clone() for k in f.keys()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want.keys() != got.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise PlanError(f"{d}: weights and plan disagree on tensor names (missing {missing[:2]}, "
                        f"unexpected {extra[:2]})")
    bad = [k for k in want if want[k] != got[k]]
    if bad:
        raise PlanError(f"{d}: tensor {bad[0]} is {got[bad[0]]} in the weights but the plan makes {want[bad[0]]}"
                        f" ({len(bad)} mismatch(es))")
    model.load_state_dict(state, strict=True, assign=True)
    for name, buf in model.named_buffers():
        if name.endswith(".kept"):
            key = name[: -len(".kept")] + "/norm"
            t = plan.by_key().get(key)
            if t is None or tuple(buf.tolist()) != t.kept:
                raise PlanError(f"{d}: stored channel index {name} does not match the plan")
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise PlanError(f"{d}: no weights for {leftover[:2]}")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)


# ---------------------------------------------------------------------------------------------------------
# File-level prune (the `uniforget prune` command's library call)


@dataclass(frozen=True)
class PruneRequest:
    """`uniforget prune`: where the UNet, masks (or an existing plan) are, ratio, output, parity tolerance."""

    out: Path
    masks: Path | None = None
    ratio: float | str | None = None
    plan: Path | None = None
    model: str | None = "toy"
    unet_dir: Path | None = None
    reference_shape: ReferenceShape | None = None
    atol: float = 1e-5
    overwrite: bool = False
    plan_out: Path | None = None
    align: int = DEFAULT_ALIGN  # kept widths rounded up to a multiple (uniforget.plan); ignored with --plan


@dataclass(frozen=True)
class PruneOutcome:
    plan: PruningPlan
    parity: ParityResult
    out: Path


def prune_to_dir(req: PruneRequest, unet: nn.Module | None = None) -> PruneOutcome:
    """Load, plan (or read a plan), prune, check slim == gated (fp32) at the reference shape, save atomically."""
    if req.plan is None and (req.masks is None or req.ratio is None):
        raise PlanError("give --masks and --ratio, or --plan")
    if req.plan is not None and req.masks is not None:
        raise PlanError("give either --plan or --masks/--ratio, not both")
    if Path(req.out).exists() and not req.overwrite:
        raise PlanError(f"{req.out} already exists; choose another --out or pass --overwrite")
    unet = unet if unet is not None else load_source_unet(req.model, req.unet_dir)
    unet = unet.float().eval()
    if req.plan is not None:
        plan = PruningPlan.load(req.plan)
    else:
        from .masks import MaskSet

        masks = MaskSet.load(req.masks)
        plan = make_plan(unet, masks, req.ratio, req.reference_shape or ReferenceShape.for_unet(unet),
                         align=req.align)
    slim = prune_unet(unet, plan)
    inputs = reference_inputs(unet, req.reference_shape or plan.reference_shape)
    parity = require_parity(check_parity(unet, slim, plan, inputs, atol=req.atol))
    log.info("parity slim vs gated: max abs %.3g (tolerance %g)", parity.max_abs, parity.atol)
    out = save_slim_unet(slim, plan, req.out, overwrite=req.overwrite)
    if req.plan_out is not None:
        plan.save(req.plan_out)
    return PruneOutcome(plan, parity, out)


__all__ = ["save_slim_unet", "load_slim_unet", "PruneRequest", "PruneOutcome", "prune_to_dir", "PlanRequest"]
