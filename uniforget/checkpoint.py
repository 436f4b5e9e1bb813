"""Resumable training state: one checkpoint format for every training loop (learn.py, retrain.py), no pickle.

A checkpoint is one safetensors file: the loop's own tensors (gate logits, student weights, ...), the
optimizer's tensors under `opt/<param name>/<state name>`, the data generator's and torch's RNG states under
`rng/data` and `rng/torch`; the optimizer's param groups and non-tensor state, the LR scheduler's state and the
loop's identity (which model, prompts, options) go in the JSON header. Every loop writes and restores it the same
way, so a resumed run is bit-identical to an uninterrupted one; each loop keeps its own format string, identity
checks and errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import UniforgetError


def optimizer_state_tensors(opt: torch.optim.Optimizer, names: list[str]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The optimizer's state, flattened: tensors `opt/<names[i]>/<state>`, non-tensor scalars per name, param groups."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{names[i]}/{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[i], {})[name] = v
    return tensors, scalars, sd["param_groups"]


def write_state(path: Path, fmt: str, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                opt: torch.optim.Optimizer, names: list[str], sched: torch.optim.lr_scheduler.LRScheduler,
                gen: torch.Generator) -> None:
    """Write the loop's `tensors` and header `meta` plus optimizer, scheduler and RNG state to `path`, atomically.

    `names[i]` names the optimizer's i-th parameter. The file appears only once complete (`.partial`, then rename).
    """
    opt_tensors, scalars, param_groups = optimizer_state_tensors(opt, names)
    tensors = {**tensors, **opt_tensors, "rng/data": gen.get_state(), "rng/torch": torch.get_rng_state()}
    meta = {
        "format": fmt, "step": str(step), "library_version": __version__,
        "param_groups": json.dumps(param_groups), "opt_scalars": json.dumps(scalars),
        "lr_scheduler": json.dumps(sched.state_dict()), **meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_with_header(path: Path, error_cls: type[UniforgetError], what: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and string header; `error_cls` ("... is not a readable {what}") if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise error_cls(f"{path} is not a readable {what}: {e}") from e
    return tensors, meta


def read_state(path: Path, fmt: str, error_cls: type[UniforgetError], what: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of the checkpoint at `path`; `error_cls` if unreadable or not of format `fmt`.

    `what` names the kind of checkpoint in the message ("learning" -> "... not a readable learning checkpoint").
    """
    tensors, meta = load_with_header(path, error_cls, f"{what} checkpoint")
    if meta.get("format") != fmt:
        raise error_cls(f"{path} is not a uniforget {what} checkpoint (format {meta.get('format')!r})")
    return tensors, meta


def restore_state(tensors: dict[str, torch.Tensor], meta: dict[str, str], names: list[str],
                  opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                  *, clone: bool = False) -> int:
    """Restore optimizer, LR scheduler, data generator and torch RNG from what `write_state` wrote; return the step.

    `clone=True` copies the optimizer tensors into fresh (aligned) allocations first: results of vectorized
    kernels can depend on a buffer's alignment, and tensors read from a file need not be aligned.
    """
    scalars = json.loads(meta["opt_scalars"])
    state: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(names):
        prefix = f"opt/{name}/"
        st: dict[str, Any] = {k[len(prefix):]: v.clone() if clone else v for k, v in tensors.items()
                              if k.startswith(prefix) and "/" not in k[len(prefix):]}
        st.update(scalars.get(name, {}))
        if st:
            state[i] = st
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    sched.load_state_dict(json.loads(meta["lr_scheduler"]))
    gen.set_state(tensors["rng/data"])
    torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"])
