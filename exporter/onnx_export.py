"""Export a (slim or dense) diffusers UNet, or a whole Stable Diffusion pipeline, to ONNX and gate it on parity.

Exporter choice: torch's TorchScript-based exporter (`dynamo=False`, opset 17, `dynamic_axes`). On these
UNets it exports in under a second where the dynamo exporter takes ~15 s, needs opset >= 18 and
`Dim`-based shapes, and both match torch on ONNX Runtime to ~2e-6; after Polygraphy's constant
folding the graphs are equally clean. Clean-up is Polygraphy's `fold_constants` (onnx-graphsurgeon
plus ONNX Runtime) followed by graphsurgeon's `cleanup().toposort()`; fp16 uses ONNX Runtime's own
float16 converter with fp32 inputs/outputs kept, so every consumer feeds the same arrays.

UNet interface: inputs `sample` (B,C,H,W), `timestep` (1 or B,) float32, `encoder_hidden_states`
(B,S,D), plus whatever the config switches on: `timestep_cond` (B,P) for LCM-style UNets
(time_cond_proj_dim), `class_labels` for a class embedding, `text_embeds`/`time_ids` for SDXL-like UNets;
output `out_sample`; B, H, W and S dynamic. An export whose inputs leave a conditioning branch unfed fails.
Every file is written to a temporary sibling and moved into place only after `onnx.checker`'s full check.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError, MissingDependencyError
from .onnx_pipeline import guidance_scale_embedding
from .parity import ParityReport, Tolerance, check_parity
from .publish import publish_dir
from .runners import OnnxRuntimeRunner, TorchRunner

log = logging.getLogger(__name__)

MIN_OPSET = 17
TWO_GB = 2**31
# external data above this many weight bytes: the protobuf limit is 2 GiB for the whole file
EXTERNAL_DATA_THRESHOLD = TWO_GB - 64 * 2**20


@dataclass(frozen=True)
class OnnxExportOptions:
    """How to export. `external_data=None` decides by size (> ~2 GB); True forces it (e.g. to test it)."""

    opset: int = MIN_OPSET
    fp16: bool = False
    external_data: bool | None = None
    fold_constants: bool = True
    # ONNX Runtime's symbolic shape inference between folding passes folds ~10% more shape arithmetic
    # (961 vs 1073 nodes on the TINY sd1 UNet) but costs ~3x the export time; False uses onnx's own
    symbolic_shapes: bool = True
    dummy_batch: int = 2
    dummy_seq_len: int = 77  # any value works (the axis is dynamic); 77 is CLIP's

    def __post_init__(self) -> None:
        if self.opset < MIN_OPSET:
            raise ExportError(f"opset {self.opset} is too old: uniforget exports with opset >= {MIN_OPSET} "
                              "(LayerNormalization, GroupNorm-friendly ops); pass --opset 17 or newer")


@dataclass(frozen=True)
class OnnxModelSpec:
    """Plain-data interface of one exported model: names and dynamic axes (optimum's style)."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(hash=False)


@dataclass(frozen=True)
class OnnxExportResult:
    """What an export produced and what it cost."""

    path: Path
    external_data_path: Path | None
    spec: OnnxModelSpec
    opset: int
    precision: str
    export_seconds: float  # torch -> ONNX only
    total_seconds: float  # export + folding + fp16 + save + checker
    nodes_exported: int
    nodes_folded: int
    file_bytes: int  # model file plus external data

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "external_data_path": str(self.external_data_path or "") or None,
                "inputs": list(self.spec.input_names), "outputs": list(self.spec.output_names),
                "opset": self.opset, "precision": self.precision, "export_seconds": self.export_seconds,
                "total_seconds": self.total_seconds, "nodes_exported": self.nodes_exported,
                "nodes_folded": self.nodes_folded, "file_bytes": self.file_bytes}


# ---------------------------------------------------------------------------------------------- loading

def load_unet(source: Any) -> Any:
    """A UNet from an nn.Module, a slim UNet folder (uniforget_plan.json) or a diffusers UNet folder."""
    import torch

    if isinstance(source, torch.nn.Module):
        return source
    path = Path(source)
    if not path.is_dir():
        raise ExportError(f"UNet not found: {path} is not a folder (give a slim UNet folder with uniforget_plan.json "
                          "or a diffusers UNet folder with config.json + diffusion_pytorch_model.safetensors)")
    if (path / "uniforget_plan.json").is_file():
        try:
            from uniforget.slim_io import load_slim_unet
        except ImportError as e:
            raise ExportError(f"{path} is a slim UNet folder but this install cannot load slim UNets "
                              f"(uniforget.slim_io missing: {e})") from e
        return load_slim_unet(path).eval()
    cfg_file, weights = path / "config.json", path / "diffusion_pytorch_model.safetensors"
    if not (cfg_file.is_file() and weights.is_file()):
        hint = f" (it has a unet/ subfolder: try {path / 'unet'})" if (path / "unet").is_dir() else ""
        raise ExportError(f"{path} is neither a slim UNet folder (uniforget_plan.json) nor a diffusers UNet folder "
                          f"(config.json + diffusion_pytorch_model.safetensors){hint}")
    try:
        cls = json.loads(cfg_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ExportError(f"{cfg_file} is not valid JSON: {e}") from e
    if cls != "UNet2DConditionModel":
        raise ExportError(f"{path}: config.json describes a {cls!r}, not a UNet2DConditionModel")
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True).eval()
    except Exception as e:  # diffusers raises many types
        raise ExportError(f"could not load UNet folder {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


# ---------------------------------------------------------------------------------------------- UNet

# What each UNet config switch adds to the ONNX interface (the forward argument that feeds it), after
# sample, timestep and encoder_hidden_states. Anything else a config can switch on is refused by name.
TEXT_TIME_INPUTS = ("text_embeds", "time_ids")  # SDXL: added_cond_kwargs
_NO_EXTRA_INPUT = {"addition_embed_type": (None, "text"), "encoder_hid_dim_type": (None, "text_proj")}


def unet_conditioning(unet: Any) -> tuple[str, ...]:
    """Extra UNet inputs its config requires: `timestep_cond` (LCM's guidance embedding, time_cond_proj_dim),
    `class_labels` (class_embed_type / num_class_embeds), `text_embeds` + `time_ids` (SDXL's text_time)."""
    cfg = unet.config
    extra: list[str] = []
    if cfg.get("time_cond_proj_dim") is not None:
        extra.append("timestep_cond")
    if getattr(unet, "class_embedding", None) is not None:
        extra.append("class_labels")
    add, hid = cfg.get("addition_embed_type"), cfg.get("encoder_hid_dim_type")
    if add == "text_time":
        extra += TEXT_TIME_INPUTS
    elif add not in _NO_EXTRA_INPUT["addition_embed_type"]:
        raise ExportError(f"UNet addition_embed_type={add!r} is not supported (supported: none, text, text_time)")
    if hid not in _NO_EXTRA_INPUT["encoder_hid_dim_type"]:
        raise ExportError(f"UNet encoder_hid_dim_type={hid!r} is not supported (supported: none, text_proj)")
    return tuple(extra)


def unet_spec(unet: Any) -> OnnxModelSpec:
    """Names and dynamic axes from the UNet's config: the three base inputs plus `unet_conditioning`'s."""
    names = ["sample", "timestep", "encoder_hidden_states", *unet_conditioning(unet)]
    axes: dict[str, dict[int, str]] = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "timestep": {0: "timestep_batch"},  # 1 (broadcast, as pipelines pass it) or batch
        "encoder_hidden_states": {0: "batch", 1: "sequence"},
        "out_sample": {0: "batch", 2: "height", 3: "width"},
    }
    axes.update({n: {0: "batch"} for n in names[3:]})
    return OnnxModelSpec(tuple(names), ("out_sample",), axes)


def unet_for_onnx(unet: Any, input_names: Sequence[str] | None = None) -> Any:
    """nn.Module called positionally with `input_names` (default: `unet_spec`'s), returning one tensor."""
    import torch

    names = tuple(input_names or unet_spec(unet).input_names)

    class UNetForOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, *args):
            kw = dict(zip(names, args, strict=False))  # a caller may leave trailing optional inputs out
            added = {k: kw.pop(k) for k in TEXT_TIME_INPUTS if k in kw}
            sample, t, ctx = kw.pop("sample"), kw.pop("timestep"), kw.pop("encoder_hidden_states")
            return self.unet(sample, t, ctx, added_cond_kwargs=added or None, return_dict=False, **kw)[0]

    return UNetForOnnx().eval()


def check_unet_inputs(unet: Any, input_names: Sequence[str], feed: dict[str, np.ndarray] | None = None) -> None:
    """Fail when the forward the export traces leaves out an input the UNet needs for its config.

    Independent of `unet_conditioning`'s table: one call with exactly `input_names` must run every UNet
    submodule that holds weights. A conditioning branch fed by a missing argument (LCM's
    `time_embedding.cond_proj` without `timestep_cond`, a class embedding without `class_labels`) never
    runs, and the ONNX graph would silently compute without it.
    """
    import torch

    if feed is None:
        m = spatial_multiple(unet)
        feed = unet_inputs(unet, 1, m, m, seq_len=2)
    ran: set[str] = set()
    hooks = [mod.register_forward_hook(lambda mod, a, o, name=name: ran.add(name))
             for name, mod in unet.named_modules()
             if name and (any(True for _ in mod.parameters(recurse=False)) or name == "class_embedding")]
    try:
        with torch.inference_mode():
            unet_for_onnx(unet, input_names)(*[torch.from_numpy(feed[n]) for n in input_names if n in feed])
    except (ValueError, TypeError, KeyError) as e:  # diffusers refuses some missing conditioning itself
        raise ExportError(f"ONNX inputs {list(input_names)} miss an argument this UNet's forward needs: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    finally:
        for h in hooks:
            h.remove()
    idle = sorted({n for n, mod in unet.named_modules() if n and (any(True for _ in mod.parameters(recurse=False))
                                                                 or n == "class_embedding")} - ran)
    if idle:
        raise ExportError(f"ONNX inputs {list(input_names)} miss an argument this UNet's forward needs: "
                          f"{', '.join(idle[:4])}{' ...' if len(idle) > 4 else ''} never run(s) without it "
                          f"(config asks for {', '.join(unet_conditioning(unet)) or 'no extra inputs'})")


def check_onnx_inputs(onnx_path: str | os.PathLike, spec: OnnxModelSpec) -> None:
    """The exported graph must take every spec input: the exporter silently drops an input the trace never used."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    got = [i.name for i in model.graph.input]
    missing = [n for n in spec.input_names if n not in got]
    if missing:
        raise ExportError(f"{Path(onnx_path).name} lacks inputs {missing} (graph inputs {got}): the traced forward "
                          "ignored them, so the ONNX model would compute without them")


def spatial_multiple(unet: Any) -> int:
    """H and W must be multiples of this (each down block but the last halves the resolution)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def unet_inputs(unet: Any, batch: int, height: int, width: int, seq_len: int = 7, seed: int = 0,
                timestep: float | None = None) -> dict[str, np.ndarray]:
    """Fresh random NumPy inputs for one UNet call (named like the ONNX inputs)."""
    cfg = unet.config
    rng = np.random.default_rng(seed)
    ctx = cfg.cross_attention_dim
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    t = rng.integers(1, 1000) if timestep is None else timestep
    feed = {
        "sample": rng.standard_normal((batch, cfg.in_channels, height, width), dtype=np.float32),
        "timestep": np.full((batch,), t, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, seq_len, ctx), dtype=np.float32),
    }
    extra = unet_conditioning(unet)
    if "timestep_cond" in extra:
        # a guidance-scale embedding, as LCM pipelines feed it (w in [1, 9])
        w = rng.uniform(1.0, 9.0, batch).astype(np.float32)
        feed["timestep_cond"] = guidance_scale_embedding(w - 1.0, int(cfg.time_cond_proj_dim))
    if "class_labels" in extra:
        feed["class_labels"] = _class_labels(unet, batch, rng)
    if "text_embeds" in extra:
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        feed["text_embeds"] = rng.standard_normal((batch, text_dim), dtype=np.float32)
        feed["time_ids"] = (rng.random((batch, 6)) * 64).astype(np.float32)
    return feed


def _class_labels(unet: Any, batch: int, rng: np.random.Generator) -> np.ndarray:
    """class_labels as the UNet's class embedding reads them: ids, a timestep, or a vector."""
    cfg = unet.config
    kind = cfg.get("class_embed_type")
    if kind is None:  # nn.Embedding over num_class_embeds ids (e.g. the x4 upscaler's noise level)
        return rng.integers(0, int(cfg.num_class_embeds), batch).astype(np.int64)
    if kind == "timestep":
        return rng.integers(0, 1000, batch).astype(np.float32)
    width = (int(cfg.projection_class_embeddings_input_dim) if kind in ("projection", "simple_projection")
             else int(cfg.get("time_embedding_dim") or cfg.block_out_channels[0] * 4))
    return rng.standard_normal((batch, width), dtype=np.float32)


def export_unet(source: Any, out_path: str | os.PathLike, options: OnnxExportOptions = OnnxExportOptions(),
                height: int | None = None, width: int | None = None) -> OnnxExportResult:
    """Export a UNet (module, slim folder or diffusers folder) to `out_path` (e.g. engines/x/onnx/unet.onnx).

    Before tracing, `check_unet_inputs` proves the inputs feed every conditioning branch; after, the graph
    must still take each of them (`check_onnx_inputs`).
    """
    import torch

    unet = load_unet(source)
    spec = unet_spec(unet)
    m = spatial_multiple(unet)
    h = height or max(unet.config.sample_size or 8, m)
    w = width or h
    feed = unet_inputs(unet, options.dummy_batch, h, w, seq_len=options.dummy_seq_len)
    check_unet_inputs(unet, spec.input_names)
    args = tuple(torch.from_numpy(feed[n]) for n in spec.input_names)
    res = _export_module(unet_for_onnx(unet, spec.input_names), args, spec, Path(out_path), options)
    check_onnx_inputs(res.path, spec)
    return res


# ---------------------------------------------------------------------------------------------- generic

def _weight_bytes(model: Any) -> int:
    import onnx

    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def _export_module(module: Any, args: tuple, spec: OnnxModelSpec, out_path: Path,
                   options: OnnxExportOptions) -> OnnxExportResult:
    """torch -> ONNX (temp dir) -> fold/cleanup -> fp16 -> save -> full check -> move into place."""
    import onnx
    import torch

    out_path = out_path.resolve()
    _check_writable(out_path.parent)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        raw = tmp / "exported.onnx"
        t0 = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.no_grad():
                torch.onnx.export(module, args, str(raw), input_names=list(spec.input_names),
                                  output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes,
                                  opset_version=options.opset, do_constant_folding=True, dynamo=False)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {out_path.name}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        export_s = time.perf_counter() - t0
        # > 2 GB, torch writes one external file per weight next to `raw`. Fold with those weights left on
        # disk (read on demand by the folding sessions), then pull them in to save: the peak stays near one
        # copy of the weights instead of four for an SD1.5-size UNet.
        model = onnx.load(str(raw), load_external_data=False)
        nodes_exported = len(model.graph.node)
        model = _clean(model, options.fold_constants, options.symbolic_shapes, data_dir=tmp)
        nodes_folded = len(model.graph.node)
        if any(p.name != raw.name for p in tmp.iterdir()):
            onnx.external_data_helper.load_external_data_for_model(model, str(tmp))
        if options.fp16:
            model = _to_fp16(model)
        external = options.external_data if options.external_data is not None else (
            _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD)
        final_tmp = tmp / "out"
        final_tmp.mkdir()
        model_file = final_tmp / out_path.name
        data_name = f"{out_path.name}_data"
        if external:
            onnx.save_model(model, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(model_file))
        del model
        try:
            onnx.checker.check_model(str(model_file), full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported {out_path.name}: {str(e).splitlines()[0]}") from e
        # move into place: data first, the model file last (its presence means the export completed)
        data_path = out_path.parent / data_name if external else None
        if data_path is not None:
            # onnx creates the data file 0600; a server running as another user (Triton's container) could
            # not read the weights its model file points at: give it the model file's (umask) permissions
            os.chmod(final_tmp / data_name, model_file.stat().st_mode & 0o777)
            os.replace(final_tmp / data_name, data_path)
        elif (out_path.parent / data_name).exists():
            (out_path.parent / data_name).unlink()  # stale data from an earlier external export
        os.replace(model_file, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = out_path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    res = OnnxExportResult(out_path, data_path, spec, options.opset, "fp16" if options.fp16 else "fp32",
                           export_s, time.perf_counter() - t_start, nodes_exported, nodes_folded, size)
    log.info("exported %s: %d -> %d nodes, %.1f MB, %.2f s export (%.2f s total)%s", out_path.name,
             nodes_exported, nodes_folded, size / 1e6, export_s, res.total_seconds,
             " [external data]" if data_path else "")
    return res


def _clean(model: Any, fold: bool, symbolic_shapes: bool = True, data_dir: Path | None = None) -> Any:
    """Polygraphy constant folding + graphsurgeon cleanup/toposort (no hand-written passes).

    `data_dir` holds the model's external weight files, if any: ONNX Runtime resolves external data of a
    model given as bytes against the working directory, so folding runs from there.
    """
    import contextlib

    import onnx_graphsurgeon as gs

    if fold:
        import onnxruntime
        from polygraphy.backend.onnx import fold_constants
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR  # a subgraph that cannot fold stays as it is; not an error
        onnxruntime.set_default_logger_severity(3)  # folding runs many small sessions; their warnings are noise
        with contextlib.chdir(data_dir) if data_dir is not None else contextlib.nullcontext():
            model = fold_constants(model, error_ok=True, allow_onnxruntime_shape_inference=symbolic_shapes)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def _to_fp16(model: Any) -> Any:
    """fp16 weights and compute, fp32 graph inputs/outputs (casts at the edges)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise MissingDependencyError("fp16 export needs onnxruntime's float16 converter: pip install onnxruntime") from e
    import onnx_graphsurgeon as gs

    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()  # the converter appends its input casts at the end of the node list
    return gs.export_onnx(graph)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create output folder {folder}: {e.strerror}") from e
    if not os.access(folder, os.W_OK):
        raise ExportError(f"output folder {folder} is not writable")


# ---------------------------------------------------------------------------------------------- parity

DEFAULT_CASES: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 1, 1), (3, 2, 1))  # (batch, h mult, w mult)


def validate_unet(unet: Any, onnx_path: str | os.PathLike, tol: Tolerance | None = None,
                  cases: Sequence[tuple[int, int, int]] | None = None, seq_len: int = 7, seed: int = 1234,
                  providers: Sequence[str] = ("CPUExecutionProvider",), raise_on_failure: bool = True) -> ParityReport:
    """torch UNet vs ONNX Runtime on fresh random inputs at several (batch, height, width); raises on failure.

    `cases` are (batch, height, width) in latent pixels; default: batch 1, 2, 3 at the UNet's sample size,
    and a non-square one at twice the height.
    """
    unet = load_unet(unet)
    spec = unet_spec(unet)
    base = max(unet.config.sample_size or 8, spatial_multiple(unet))
    cases = list(cases) if cases is not None else [(b, base * hm, base * wm) for b, hm, wm in DEFAULT_CASES]
    m = spatial_multiple(unet)
    bad = [c for c in cases if c[1] % m or c[2] % m]
    if bad:
        raise ExportError(f"parity resolutions {bad} are not multiples of {m} (the UNet's down-sampling factor)")
    feeds = [(f"batch={b} {h}x{w}", unet_inputs(unet, b, h, w, seq_len=seq_len, seed=seed + i))
             for i, (b, h, w) in enumerate(cases)]
    reference = TorchRunner(unet_for_onnx(unet), spec.input_names, spec.output_names, name="torch")
    candidate = OnnxRuntimeRunner(onnx_path, providers=providers, name="onnxruntime")
    report = check_parity(reference, candidate, feeds, tol or Tolerance())
    return report.raise_on_failure() if raise_on_failure else report


# ---------------------------------------------------------------------------------------------- pipeline

@dataclass(frozen=True)
class PipelineExportResult:
    """An exported ONNX pipeline folder (optimum's layout) and each component's export and parity."""

    folder: Path
    components: dict[str, OnnxExportResult] = field(hash=False)
    parity: dict[str, ParityReport] = field(hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "components": {k: v.to_dict() for k, v in self.components.items()},
                "parity": {k: v.to_dict() for k, v in self.parity.items()}}


def _text_encoder_wrapper(text_encoder: Any, penultimate: bool = False) -> Any:
    """(last_hidden_state, pooled) — the pooled output is `text_embeds` for a model with projection — plus,
    with `penultimate`, the second-to-last layer's hidden states (what SDXL's UNet attends to)."""
    import torch

    class TextEncoderForOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.te = text_encoder

        def forward(self, input_ids):
            out = self.te(input_ids=input_ids, output_hidden_states=penultimate, return_dict=True)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            if penultimate:
                return out.last_hidden_state, pooled, out.hidden_states[-2]
            return out.last_hidden_state, pooled

    return TextEncoderForOnnx().eval()


def _text_encoder_spec(text_encoder: Any, penultimate: bool) -> OnnxModelSpec:
    """optimum's output names: `pooler_output` for CLIPTextModel, `text_embeds` with a projection."""
    pooled = "text_embeds" if hasattr(text_encoder, "text_projection") else "pooler_output"
    names = ("last_hidden_state", pooled) + (("penultimate_hidden_state",) if penultimate else ())
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
            pooled: {0: "batch"}}
    if penultimate:
        axes["penultimate_hidden_state"] = {0: "batch", 1: "sequence"}
    return OnnxModelSpec(("input_ids",), names, axes)


def _vae_decoder_wrapper(vae: Any) -> Any:
    import torch

    class VaeDecoderForOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    return VaeDecoderForOnnx().eval()


def _save_tokenizer(tok: Any, folder: Path) -> None:
    """save_pretrained, plus vocab.json/merges.txt when only tokenizer.json was written.

    transformers 5 saves the fast tokenizer alone; transformers 4's slow CLIPTokenizer (what serving
    environments and optimum's environment load) needs the two vocabulary files.
    """
    tok.save_pretrained(str(folder))
    tj = folder / "tokenizer.json"
    if not (folder / "vocab.json").is_file() and tj.is_file():
        model = json.loads(tj.read_text())["model"]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))


def _save_config(obj: Any, folder: Path) -> None:
    cfg = obj.config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str))


def export_pipeline(pipeline: Any, out_dir: str | os.PathLike, unet: Any = None,
                    options: OnnxExportOptions = OnnxExportOptions(), tol: Tolerance | None = None,
                    validate: bool = True) -> PipelineExportResult:
    """Text encoder, UNet (the slim one when `unet` is given) and VAE decoder -> `out_dir` in optimum's layout.

    `pipeline` is a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, or anything
    `uniforget.models.load_pipeline` takes. SDXL adds text_encoder_2/ and tokenizer_2/; both text encoders
    also output their penultimate hidden states, and the VAE decoder stays fp32 (SDXL's VAE overflows in fp16).
    Each component is parity-checked against torch (fp32) before the folder is moved into place.
    """
    import torch

    if not hasattr(pipeline, "text_encoder"):
        from uniforget.models import load_pipeline

        pipeline = load_pipeline(pipeline)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        if getattr(pipeline, part, None) is None:
            raise ExportError(f"pipeline has no {part}: only Stable Diffusion 1.x/2.x-style pipelines are exported")
    unet_mod = load_unet(unet) if unet is not None else pipeline.unet
    sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    if sdxl and (unet_mod.config.addition_embed_type != "text_time" or getattr(pipeline, "tokenizer_2", None) is None):
        raise ExportError("an SDXL pipeline needs tokenizer_2 and a UNet with text_time added conditioning")
    if not sdxl and unet_mod.config.addition_embed_type is not None:
        raise ExportError(f"UNet addition_embed_type={unet_mod.config.addition_embed_type!r} in a pipeline without "
                          "text_encoder_2: whole-pipeline export supports SD1.x/2.x and SDXL pipelines")
    encoders = [("text_encoder", "tokenizer")] + ([("text_encoder_2", "tokenizer_2")] if sdxl else [])
    out = Path(out_dir).resolve()
    _check_writable(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    user_tol, tol = tol, tol or Tolerance()
    comps: dict[str, OnnxExportResult] = {}
    parity: dict[str, ParityReport] = {}
    try:
        te_opts = OnnxExportOptions(opset=options.opset, fp16=False, external_data=None,
                                    fold_constants=options.fold_constants, symbolic_shapes=options.symbolic_shapes)
        for te_name, tok_name in encoders:
            te, tok = getattr(pipeline, te_name).eval(), getattr(pipeline, tok_name)
            ids = torch.from_numpy(tok(["a photo", "an image of a thing"], padding="max_length",
                                       max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids)
            (tmp / te_name).mkdir()
            comps[te_name] = _export_module(_text_encoder_wrapper(te, sdxl), (ids.long(),),
                                            _text_encoder_spec(te, sdxl), tmp / te_name / "model.onnx", te_opts)
            _save_config(te, tmp / te_name)

        (tmp / "unet").mkdir()
        comps["unet"] = export_unet(unet_mod, tmp / "unet" / "model.onnx", options)
        _save_config(unet_mod, tmp / "unet")

        vae = pipeline.vae.eval()
        lat_ch = vae.config.latent_channels
        s = max(unet_mod.config.sample_size or 8, spatial_multiple(unet_mod))
        z = torch.randn(2, lat_ch, s, s, generator=torch.Generator().manual_seed(0))
        vae_spec = OnnxModelSpec(("latent_sample",), ("sample",),
                                 {"latent_sample": {0: "batch", 2: "height", 3: "width"},
                                  "sample": {0: "batch", 2: "image_height", 3: "image_width"}})
        (tmp / "vae_decoder").mkdir()
        comps["vae_decoder"] = _export_module(_vae_decoder_wrapper(vae), (z,), vae_spec,
                                              tmp / "vae_decoder" / "model.onnx", te_opts)
        _save_config(vae, tmp / "vae_decoder")

        for _, tok_name in encoders:
            _save_tokenizer(getattr(pipeline, tok_name), tmp / tok_name)
        pipeline.scheduler.save_pretrained(str(tmp / "scheduler"))
        import diffusers

        index = {
            "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "text_encoder": ["optimum", "ORTModelTextEncoder"],
            "unet": ["optimum", "ORTModelUnet"],
            "vae_decoder": ["optimum", "ORTModelVaeDecoder"],
            "tokenizer": ["transformers", type(pipeline.tokenizer).__name__],
            "scheduler": ["diffusers", type(pipeline.scheduler).__name__],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        if sdxl:
            for k in ("safety_checker", "feature_extractor", "requires_safety_checker"):
                del index[k]
            index.update(text_encoder_2=["optimum", "ORTModelTextEncoder"],
                         tokenizer_2=["transformers", type(pipeline.tokenizer_2).__name__],
                         force_zeros_for_empty_prompt=bool(pipeline.config.get("force_zeros_for_empty_prompt", True)))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

        if validate:
            rng = np.random.default_rng(7)
            for te_name, tok_name in encoders:
                te, tok = getattr(pipeline, te_name), getattr(pipeline, tok_name)
                te_spec = _text_encoder_spec(te, sdxl)
                te_feeds = [(f"batch={b}", {"input_ids": rng.integers(0, tok.vocab_size, (b, tok.model_max_length))})
                            for b in (1, 3)]
                parity[te_name] = check_parity(
                    TorchRunner(_text_encoder_wrapper(te, sdxl), te_spec.input_names, te_spec.output_names,
                                name="torch"),
                    OnnxRuntimeRunner(tmp / te_name / "model.onnx", name="onnxruntime"), te_feeds, tol)
            unet_tol = user_tol or (FP16_TOLERANCE if options.fp16 else Tolerance())
            parity["unet"] = validate_unet(unet_mod, tmp / "unet" / "model.onnx", unet_tol, raise_on_failure=False)
            vae_feeds = [(f"batch={b} {h}x{h}", {"latent_sample": rng.standard_normal((b, lat_ch, h, h), dtype=np.float32)})
                         for b, h in ((1, s), (2, 2 * s))]
            parity["vae_decoder"] = check_parity(
                TorchRunner(_vae_decoder_wrapper(vae), vae_spec.input_names, vae_spec.output_names, name="torch"),
                OnnxRuntimeRunner(tmp / "vae_decoder" / "model.onnx", name="onnxruntime"), vae_feeds, tol)
            failures = [f"{k}: {f}" for k, rep in parity.items() for f in rep.failures()]
            if failures:
                from .errors import ValidationError

                raise ValidationError("ONNX pipeline parity failed: " + "; ".join(failures), failures)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    comps = {k: _relocate(v, tmp, out) for k, v in comps.items()}
    log.info("exported ONNX pipeline to %s", out)
    return PipelineExportResult(out, comps, parity)


def _relocate(res: OnnxExportResult, old: Path, new: Path) -> OnnxExportResult:
    """Result paths after the temp folder was renamed into place."""
    from dataclasses import replace

    def move(p: Path | None) -> Path | None:
        return None if p is None else new / p.relative_to(old)

    return replace(res, path=move(res.path), external_data_path=move(res.external_data_path))


# ---------------------------------------------------------------------------------------------- stage entry

FP16_TOLERANCE = Tolerance(atol=5e-2, rtol=5e-2)  # fp16 ONNX vs fp32 torch; the measured maxima are reported


def export_unet_validated(source: Any, out_path: str | os.PathLike,
                          options: OnnxExportOptions = OnnxExportOptions(), tol: Tolerance | None = None,
                          cases: Sequence[tuple[int, int, int]] | None = None) -> tuple[OnnxExportResult, ParityReport]:
    """Export, gate on ONNX Runtime parity, and only then move the files to `out_path`.

    Over tolerance (or NaN/Inf) raises `ValidationError` listing every failure, and nothing is left at `out_path`.
    """
    unet = load_unet(source)
    out_path = Path(out_path).resolve()
    _check_writable(out_path.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.staging-", dir=out_path.parent))
    try:
        res = export_unet(unet, staging / out_path.name, options)
        tol = tol or (FP16_TOLERANCE if options.fp16 else Tolerance())
        report = validate_unet(unet, res.path, tol, cases=cases)
        if res.external_data_path is not None:
            os.replace(res.external_data_path, out_path.parent / res.external_data_path.name)
        os.replace(res.path, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _relocate(res, staging, out_path.parent), report


@dataclass(frozen=True)
class ExportRequest:
    """`uniforget export`: what to export and where (the CLI's parsed arguments)."""

    unet: Path
    out: Path
    options: OnnxExportOptions = OnnxExportOptions()
    tolerance: Tolerance | None = None
    pipeline: str | None = None  # a diffusers pipeline folder or 'toy': also write out/pipeline/
    overwrite: bool = False  # replace an existing `out`


@dataclass(frozen=True)
class ExportSummary:
    unet: OnnxExportResult
    unet_parity: ParityReport
    pipeline: PipelineExportResult | None
    summary_path: Path


def run_export(req: ExportRequest) -> ExportSummary:
    """The export stage: unet.onnx (+ pipeline/) under `req.out`, each gated; export.json written last.

    Everything is written into a temporary sibling folder that is renamed to `out` only when every gate passed,
    so a failure leaves nothing behind that looks like an export."""
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not req.overwrite:
        raise ExportError(f"--out {out} already exists; pass --overwrite to replace it")
    unet = load_unet(req.unet)  # bad input fails before anything is created
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_writable(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        res, report = export_unet_validated(unet, tmp / "unet.onnx", req.options, req.tolerance)
        res = _relocate(res, tmp, out)  # the paths it will have once published
        pipe_res = None
        if req.pipeline is not None:
            pipe_res = export_pipeline(req.pipeline, tmp / "pipeline", unet=unet, options=req.options,
                                       tol=req.tolerance)
            pipe_res = PipelineExportResult(out / "pipeline", {k: _relocate(v, tmp, out) for k, v in
                                                               pipe_res.components.items()}, pipe_res.parity)
        summary = {"unet": res.to_dict(), "unet_parity": report.to_dict(),
                   "pipeline": pipe_res.to_dict() if pipe_res else None}
        (tmp / "export.json").write_text(json.dumps(summary, indent=2))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(res, report, pipe_res, out / "export.json")
