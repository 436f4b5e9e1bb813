"""Physical structured pruning: turn a PruningPlan into a UNet whose removed heads, neurons and channels are gone.

The slim UNet computes what the gated model `attach_gates(unet, plan.effective_gates())` computes:
removed units are sliced out of the weights, and kept units' fractional gate values are folded in.

- heads: Q/K/V output rows and `to_out[0]` input columns of each removed head go; the kept heads' gates
  scale their `to_out[0]` columns. `heads`, `inner_dim`, `inner_kv_dim`, `sliceable_head_dim` are updated
  (the attention processor reshapes by `attn.heads`; a stale value would reshape silently into garbage).
- ffn: the input projection's rows of each removed hidden neuron go (for GEGLU/SwiGLU its value row *and*
  its gate row), and the output linear's columns; kept neurons' gates scale the output linear's columns.
- norm: the LayerNorm still normalizes over the full width (mean and variance need every channel), then
  `SlimLayerNorm` selects the kept channels (only where a channel goes: a norm that keeps every channel, as
  aligned widths often make it, stays a plain LayerNorm with no gather); consumers (norm1 -> attn1 q/k/v, k/v only for self-attention;
  norm2 -> attn2 q (+k/v if self-attention); norm3 -> ff input projection) lose the removed input columns.
  Kept channels' gates are folded into the norm's affine weight and bias.

The same surgery runs on meta-device models (shape only), which is how `slim_io` rebuilds a slim UNet
before loading its tensors and how `flops` counts the slim model's FLOPs without touching real weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PlanError
from .targets import ffn_hidden_size, iter_transformer_blocks

if TYPE_CHECKING:
    from .plan import PruningPlan

log = logging.getLogger(__name__)


class SlimLayerNorm(nn.Module):
    """LayerNorm statistics over all `full_width` channels, output only for the kept ones.

    Removing a channel must not change the mean/variance the other channels are normalized with, so the
    normalization keeps the full width and a fixed index (a buffer, saved with the weights) selects after it.
    `weight`/`bias` are the kept channels' affine parameters with their gate values folded in.
    """

    def __init__(self, full_width: int, kept: torch.Tensor, eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if kept.ndim != 1 or kept.numel() == 0 or kept.numel() > full_width:
            raise ValueError(f"kept index must be 1-D with 1..{full_width} entries, got {tuple(kept.shape)}")
        self.full_width = int(full_width)
        self.eps = float(eps)
        self.register_buffer("kept", kept.to(device=device, dtype=torch.long).clone(), persistent=True)
        n = kept.numel()
        self.weight = nn.Parameter(torch.ones(n, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))

    @property
    def normalized_shape(self) -> tuple[int]:
        """The kept width (what consumers see), mirroring nn.LayerNorm's attribute."""
        return (int(self.kept.numel()),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, (self.full_width,), None, None, self.eps)  # (..., full_width)
        y = y.index_select(-1, self.kept)  # (..., kept)
        return y * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"full_width={self.full_width}, kept={self.kept.numel()}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------------------
# Layout: which Linear rows/columns each gate target owns. Shared by surgery and by plan's parameter count.


@dataclass(frozen=True)
class Sel:
    """The rows (or columns) of a Linear that belong to the units of one target.

    Unit u owns `width` consecutive entries in each of `copies` equal sections: heads own head_dim rows,
    a GEGLU neuron owns one row in the value half and one in the gate half (copies=2).
    """

    key: str
    size: int
    width: int = 1
    copies: int = 1

    def index(self, kept: torch.Tensor) -> torch.Tensor:
        """Row/column indices of the kept units, in order: (copies * len(kept) * width,)."""
        base = (kept.to(torch.long)[:, None] * self.width + torch.arange(self.width)).reshape(-1)  # (k*width,)
        return torch.cat([base + c * self.size * self.width for c in range(self.copies)])

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit values -> per-entry values over the full width: (copies * size * width,)."""
        return values.repeat_interleave(self.width).repeat(self.copies)

    def count(self, n_kept: int) -> int:
        return n_kept * self.width * self.copies


@dataclass(frozen=True)
class LinearSpec:
    """One prunable Linear: rows follow `rows`' kept units, columns follow `cols`' kept units.

    `fold_cols`: the column target's gates (heads, ffn) scale this Linear's input columns (folding).
    """

    path: str
    out_features: int
    in_features: int
    bias: bool
    rows: Sel | None = None
    cols: Sel | None = None
    fold_cols: bool = False

    def count(self, kept_counts: Mapping[str, int]) -> int:
        """Parameters of this Linear once the kept counts are applied."""
        r = self.rows.count(kept_counts[self.rows.key]) if self.rows else self.out_features
        c = self.cols.count(kept_counts[self.cols.key]) if self.cols else self.in_features
        return r * c + (r if self.bias else 0)


@dataclass(frozen=True)
class NormSpec:
    path: str
    key: str
    size: int
    affine: bool

    def count(self, n_kept: int, slim: bool) -> int:
        return 2 * n_kept if (self.affine or slim) else 0


@dataclass(frozen=True)
class AttnSpec:
    path: str
    key: str | None
    heads: int
    head_dim: int
    self_attention: bool


@dataclass(frozen=True)
class Layout:
    """Every prunable Linear, norm and attention of the UNet for a given set of gated keys."""

    linears: tuple[LinearSpec, ...]
    norms: tuple[NormSpec, ...]
    attns: tuple[AttnSpec, ...]
    ffns: tuple[tuple[str, str, Sel], ...]  # (ff path, key, rows Sel of its input projection)


def _check_attention(path: str, attn: nn.Module) -> None:
    unsupported = [a for a in ("group_norm", "spatial_norm", "norm_cross", "norm_q", "norm_k", "add_k_proj",
                               "add_q_proj", "to_add_out") if getattr(attn, a, None) is not None]
    if getattr(attn, "to_qkv", None) is not None or getattr(attn, "to_kv", None) is not None:
        unsupported.append("fused projections (call unfuse_qkv_projections first)")
    if getattr(attn, "to_k", None) is None or getattr(attn, "to_v", None) is None:
        unsupported.append("missing to_k/to_v")
    if unsupported:
        raise PlanError(f"{path}: unsupported attention variant for pruning ({', '.join(unsupported)})")
    inner = attn.to_q.out_features
    if attn.to_k.out_features != inner or attn.to_v.out_features != inner or inner % attn.heads:
        raise PlanError(f"{path}: q/k/v widths {attn.to_q.out_features}/{attn.to_k.out_features}/"
                        f"{attn.to_v.out_features} with {attn.heads} heads cannot be pruned per head")


def _lin(unet: nn.Module, path: str, rows: Sel | None = None, cols: Sel | None = None,
         fold_cols: bool = False) -> LinearSpec:
    m = unet.get_submodule(path)
    if not isinstance(m, nn.Linear):
        raise PlanError(f"{path}: expected a Linear layer, found {type(m).__name__}")
    return LinearSpec(path, m.out_features, m.in_features, m.bias is not None, rows, cols, fold_cols)


def build_layout(unet: nn.Module, keys: set[str] | frozenset[str]) -> Layout:
    """Map gated keys to the Linear rows/columns and norms they own, refusing block variants we cannot prune."""
    linears: list[LinearSpec] = []
    norms: list[NormSpec] = []
    attns: list[AttnSpec] = []
    ffns: list[tuple[str, str, Sel]] = []
    for path, block in iter_transformer_blocks(unet):
        norm_keys = {n: f"{path}.{n}/norm" for n in ("norm1", "norm2", "norm3")}
        gated_norms = {n for n, k in norm_keys.items() if k in keys}
        if gated_norms and (getattr(block, "norm_type", "layer_norm") != "layer_norm"
                            or getattr(block, "pos_embed", None) is not None):
            raise PlanError(f"{path}: norm channels can be pruned only in plain LayerNorm blocks without "
                            "positional embeddings")
        norm_sel: dict[str, Sel] = {}
        for n in sorted(gated_norms):
            ln = getattr(block, n)
            size = int(ln.normalized_shape[0])
            norms.append(NormSpec(f"{path}.{n}", norm_keys[n], size, ln.weight is not None))
            norm_sel[n] = Sel(norm_keys[n], size)
        for a_name, n_name in (("attn1", "norm1"), ("attn2", "norm2")):
            attn = getattr(block, a_name, None)
            if attn is None:
                continue
            a_path = f"{path}.{a_name}"
            hkey = f"{a_path}/heads"
            self_attn = not attn.is_cross_attention
            if hkey in keys or n_name in gated_norms:
                _check_attention(a_path, attn)
            head_dim = attn.to_q.out_features // attn.heads
            rows = Sel(hkey, int(attn.heads), head_dim) if hkey in keys else None
            attns.append(AttnSpec(a_path, hkey if rows else None, int(attn.heads), head_dim, self_attn))
            nsel = norm_sel.get(n_name)
            linears.append(_lin(unet, f"{a_path}.to_q", rows, nsel))
            for kv in ("to_k", "to_v"):
                linears.append(_lin(unet, f"{a_path}.{kv}", rows, nsel if self_attn else None))
            linears.append(_lin(unet, f"{a_path}.to_out.0", None, rows, fold_cols=rows is not None))
        ff = getattr(block, "ff", None)
        if ff is None:
            continue
        f_path = f"{path}.ff"
        fkey = f"{f_path}/ffn"
        hidden = ffn_hidden_size(ff)
        proj = getattr(ff.net[0], "proj", None)
        out_idx = len(ff.net) - 1 if isinstance(ff.net[-1], nn.Linear) else 2
        if not isinstance(proj, nn.Linear):
            raise PlanError(f"{f_path}: feed-forward activation {type(ff.net[0]).__name__} has no input projection")
        if proj.out_features == 2 * hidden:
            copies = 2  # GEGLU / SwiGLU: value half then gate half
        elif proj.out_features == hidden:
            copies = 1  # GELU / ApproximateGELU
        else:
            raise PlanError(f"{f_path}: input projection width {proj.out_features} is neither {hidden} nor "
                            f"2 x {hidden}; unsupported feed-forward")
        rows = Sel(fkey, hidden, 1, copies) if fkey in keys else None
        if rows:
            ffns.append((f_path, fkey, rows))
        linears.append(_lin(unet, f"{f_path}.net.0.proj", rows, norm_sel.get("norm3")))
        linears.append(_lin(unet, f"{f_path}.net.{out_idx}", None,
                            Sel(fkey, hidden) if rows else None, fold_cols=rows is not None))
    # keep only Linears something actually prunes or folds
    linears = [s for s in linears if s.rows or s.cols]
    return Layout(tuple(linears), tuple(norms), tuple(attns), tuple(ffns))


# ---------------------------------------------------------------------------------------------------------
# Surgery


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=old.weight.dtype)
    new.weight = nn.Parameter(weight.to(old.weight.dtype), requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(old.weight.dtype), requires_grad=old.bias.requires_grad)
    return new


def _needs_slim_norm(spec: NormSpec, n_kept: int, gates: torch.Tensor) -> bool:
    """A new norm module when channels go (SlimLayerNorm), or when a norm without affine params must carry
    folded gates (then a plain affine LayerNorm: with every channel kept there is nothing to gather)."""
    return n_kept < spec.size or (not spec.affine and bool((gates != 1).any()))


def _kept_and_gates(plan: PruningPlan) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    kept = {t.key: torch.tensor(t.kept, dtype=torch.long) for t in plan.targets}
    gates = plan.effective_gates()
    return kept, gates


def validate_plan_for(unet: nn.Module, plan: PruningPlan) -> None:
    """Every plan target must exist in this UNet with the size the plan was made for."""
    from .targets import discover_targets

    sizes = {t.key: t.size for t in discover_targets(unet)}
    for t in plan.targets:
        if t.key not in sizes:
            raise PlanError(f"plan target {t.key} does not exist in this UNet (plan made for another model?)")
        if sizes[t.key] != t.size:
            raise PlanError(f"plan target {t.key} has {t.size} units but this UNet has {sizes[t.key]}")


def prune_unet(unet: nn.Module, plan: PruningPlan, *, inplace: bool = False,
               check_fingerprint: bool = True) -> nn.Module:
    """Physically remove the plan's units and fold kept gates; returns the slim UNet (a copy unless inplace).

    Works on real and on meta-device weights (then only shapes are produced; pass check_fingerprint=False,
    since a meta model has no weights to fingerprint).
    """
    if check_fingerprint:
        from .fingerprint import model_fingerprint

        fp = model_fingerprint(unet)
        if fp != plan.model_fingerprint:
            raise PlanError(f"plan was made for model {plan.model_fingerprint} but this UNet is {fp}")
    validate_plan_for(unet, plan)
    if not inplace:
        unet = copy.deepcopy(unet)
    kept, gates = _kept_and_gates(plan)
    layout = build_layout(unet, frozenset(kept))
    with torch.no_grad():
        for spec in layout.linears:
            _prune_linear(unet, spec, kept, gates)
        for spec in layout.norms:
            _prune_norm(unet, spec, kept[spec.key], gates[spec.key])
        for a in layout.attns:
            _update_attention(unet, a, kept)
        for f_path, key, rows in layout.ffns:
            proj = unet.get_submodule(f"{f_path}.net.0.proj")
            assert proj.out_features == rows.count(len(kept[key])), f"{f_path}: proj rows {proj.out_features}"
    n_removed = sum(t.size - len(t.kept) for t in plan.targets)
    log.debug("pruned %d units over %d targets", n_removed, len(plan.targets))
    return unet


def _prune_linear(unet: nn.Module, spec: LinearSpec, kept: Mapping[str, torch.Tensor],
                  gates: Mapping[str, torch.Tensor]) -> None:
    lin = unet.get_submodule(spec.path)
    assert (lin.out_features, lin.in_features) == (spec.out_features, spec.in_features), spec.path
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    dev = w.device
    if spec.cols is not None and spec.fold_cols:
        g = spec.cols.expand(gates[spec.cols.key].to(torch.float32)).to(dev)  # (in_features,)
        assert g.shape == (spec.in_features,), f"{spec.path}: gate width {tuple(g.shape)}"
        w = (w.to(torch.float32) * g[None, :]).to(lin.weight.dtype)  # (out, in), input columns scaled
    if spec.rows is not None:
        idx = spec.rows.index(kept[spec.rows.key]).to(dev)
        w = w.index_select(0, idx)  # (rows_kept, in)
        b = b.index_select(0, idx) if b is not None else None
    if spec.cols is not None:
        idx = spec.cols.index(kept[spec.cols.key]).to(dev)
        w = w.index_select(1, idx)  # (rows, cols_kept)
    k = {key: len(v) for key, v in kept.items()}
    want_rows = spec.rows.count(k[spec.rows.key]) if spec.rows else spec.out_features
    want_cols = spec.cols.count(k[spec.cols.key]) if spec.cols else spec.in_features
    assert tuple(w.shape) == (want_rows, want_cols), f"{spec.path}: made {tuple(w.shape)}"
    unet.set_submodule(spec.path, _new_linear(lin, w.contiguous(), None if b is None else b.contiguous()))


def _prune_norm(unet: nn.Module, spec: NormSpec, kept: torch.Tensor, gates: torch.Tensor) -> None:
    ln = unet.get_submodule(spec.path)
    assert isinstance(ln, nn.LayerNorm) and int(ln.normalized_shape[0]) == spec.size, spec.path
    dev = ln.weight.device if ln.weight is not None else torch.device("cpu")
    dtype = ln.weight.dtype if ln.weight is not None else torch.float32
    g = gates.to(device=dev, dtype=torch.float32)  # (size,)
    w = ln.weight.detach().to(torch.float32) if ln.weight is not None else torch.ones(spec.size, device=dev)
    b = ln.bias.detach().to(torch.float32) if ln.bias is not None else torch.zeros(spec.size, device=dev)
    w, b = w * g, b * g  # fold gates into the affine: (x_hat * w + b) * g
    if len(kept) == spec.size:  # no channel removed: a plain LayerNorm, no gather in the graph
        if ln.weight is not None:
            ln.weight.copy_(w.to(dtype))
            if ln.bias is not None:
                ln.bias.copy_(b.to(dtype))
        elif _needs_slim_norm(spec, len(kept), gates):  # no affine to fold the gates into: give it one
            full = nn.LayerNorm(spec.size, eps=ln.eps, elementwise_affine=True, device=dev, dtype=dtype)
            full.weight.copy_(w.to(dtype))
            full.bias.copy_(b.to(dtype))
            unet.set_submodule(spec.path, full)
        return
    idx = kept.to(dev)
    slim = SlimLayerNorm(spec.size, kept, eps=ln.eps, device=dev, dtype=dtype)
    slim.weight.copy_(w.index_select(0, idx).to(dtype))
    slim.bias.copy_(b.index_select(0, idx).to(dtype))
    assert slim.weight.shape == (len(kept),) and slim.kept.shape == (len(kept),), spec.path
    unet.set_submodule(spec.path, slim)


def _update_attention(unet: nn.Module, spec: AttnSpec, kept: Mapping[str, torch.Tensor]) -> None:
    attn = unet.get_submodule(spec.path)
    heads = len(kept[spec.key]) if spec.key else spec.heads
    inner = heads * spec.head_dim
    attn.heads = heads
    attn.sliceable_head_dim = heads
    attn.inner_dim = inner
    attn.inner_kv_dim = inner
    attn.query_dim = attn.to_q.in_features
    if spec.self_attention:
        attn.cross_attention_dim = attn.query_dim
    assert attn.to_q.out_features == inner, f"{spec.path}: to_q rows {attn.to_q.out_features} != {inner}"
    assert attn.to_k.out_features == inner and attn.to_v.out_features == inner, f"{spec.path}: k/v rows"
    assert attn.to_out[0].in_features == inner, f"{spec.path}: to_out cols {attn.to_out[0].in_features}"
    kv_in = attn.query_dim if spec.self_attention else attn.cross_attention_dim
    assert attn.to_k.in_features == kv_in and attn.to_v.in_features == kv_in, f"{spec.path}: k/v input width"


# ---------------------------------------------------------------------------------------------------------
# Parity: slim vs gated


@dataclass(frozen=True)
class ParityResult:
    """Max abs difference of slim vs gated UNet outputs at one input; truthy when within `atol`."""

    shape: tuple[int, ...]
    max_abs: float
    max_ref: float
    atol: float

    def __bool__(self) -> bool:
        return bool(self.max_abs <= self.atol)


def gated_reference(unet: nn.Module, plan: PruningPlan, inputs: Mapping) -> torch.Tensor:
    """Output of the dense UNet with the plan's effective gates attached (the model the slim one must equal)."""
    from .gating import attach_gates

    with torch.no_grad(), attach_gates(unet, plan.effective_gates()):
        return unet(**inputs).sample


def check_parity(dense: nn.Module, slim: nn.Module, plan: PruningPlan, inputs: Mapping,
                 atol: float = 1e-5) -> ParityResult:
    """Compare slim vs gated dense at one input; returns data (raise on it with `require_parity`)."""
    ref = gated_reference(dense, plan, inputs)
    with torch.no_grad():
        out = slim(**inputs).sample
    diff = (out.float() - ref.float()).abs()
    max_abs = float("inf") if not torch.isfinite(diff).all() else float(diff.max())
    return ParityResult(tuple(out.shape), max_abs, float(ref.abs().max()), atol)


def require_parity(result: ParityResult) -> ParityResult:
    from .errors import ParityError

    if not result:
        raise ParityError(f"slim UNet differs from the gated UNet by max abs {result.max_abs:.3g} at output "
                          f"shape {result.shape} (tolerance {result.atol:g}); the pruned model is not saved")
    return result
