"""Build a TensorRT engine from the exported UNet ONNX, check it against ONNX Runtime fp32, record how it was built.

The only module that imports `tensorrt`, and only inside functions: `import exporter.tensorrt_build` works on a
machine without it, and the first real use raises MissingDependencyError naming what to install. The build goes
through Polygraphy's lazy loaders (network from ONNX -> config -> engine -> save), as NVIDIA's diffusion demo does;
parity goes through Polygraphy's Comparator with stated rtol/atol plus a NaN/Inf check. Everything is written to a
temporary sibling of the output folder and renamed into place only after parity passed, so a failed or interrupted
build never leaves a plan that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError, MissingDependencyError, ValidationError
from .publish import publish_dir
from .runners import Feed, Runner

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "uniforget[gpu]" (or: pip install tensorrt-cu12) on a machine with an NVIDIA GPU'
PLAN_NAME = "unet.plan"
BUILD_JSON = "build.json"


def import_tensorrt():
    """Import TensorRT on first use; one clear error where it is missing (never a fake stand-in)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as e:  # ModuleNotFoundError, or a broken CUDA/driver install raising ImportError
        raise MissingDependencyError(f"TensorRT is not importable ({e}); install it: {INSTALL_HINT}") from e
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) where `import tensorrt` works, else (False, the reason) for skips and messages."""
    try:
        trt = import_tensorrt()
    except MissingDependencyError as e:
        return False, str(e)
    return True, str(trt.__version__)


# --------------------------------------------------------------------------------------------- shapes / profiles

@dataclass(frozen=True)
class DimRange:
    """min <= opt <= max for one dynamic dimension (batch, latent height/width, text length)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ExportError(f"shape range must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @classmethod
    def fixed(cls, n: int) -> DimRange:
        return cls(n, n, n)


@dataclass(frozen=True)
class ShapeRanges:
    """The dynamic axes of a UNet: batch (already doubled for classifier-free guidance), latent H/W, text length.

    `static=True` collapses every range to its opt value: one shape, the fastest engine, no flexibility.
    """

    batch: DimRange = DimRange(1, 2, 4)
    height: DimRange = DimRange(8, 16, 32)
    width: DimRange = DimRange(8, 16, 32)
    seq_len: DimRange = DimRange(77, 77, 77)
    static: bool = False

    def resolved(self) -> ShapeRanges:
        if not self.static:
            return self
        return ShapeRanges(*(DimRange.fixed(r.opt) for r in (self.batch, self.height, self.width, self.seq_len)),
                           static=True)


@dataclass(frozen=True)
class InputSpec:
    """One ONNX graph input or output: name, numpy dtype name, dims (int when fixed, str/None when dynamic)."""

    name: str
    dtype: str
    dims: tuple[int | str | None, ...]


_ONNX_TO_NP = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}


@dataclass(frozen=True)
class OnnxGraphFacts:
    """What an engine build needs from the ONNX graph, read in one parse: a graph with inline weights (under
    2 GB) costs its full size to parse, so the build reads it once, not once per question."""

    inputs: list[InputSpec]
    outputs: list[InputSpec]
    fp16: bool


def onnx_graph_facts(onnx_path: Path) -> OnnxGraphFacts:
    """Graph inputs (skipping initializers), outputs, and whether it is fp16, without loading external weights."""
    import onnx  # noqa: PLC0415

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / OSError / google.protobuf errors
        raise ExportError(f"cannot read ONNX model {onnx_path}: {e}") from e
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> InputSpec:
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        return InputSpec(v.name, _ONNX_TO_NP.get(tt.elem_type, f"onnx:{tt.elem_type}"), dims)

    # an fp16 ONNX (fp16 inputs or weights) is built strongly typed: TensorRT then keeps the graph's own types
    fp16 = onnx.TensorProto.FLOAT16
    is_fp16 = (any(i.type.tensor_type.elem_type == fp16 for i in model.graph.input)
               or any(t.data_type == fp16 for t in model.graph.initializer))
    return OnnxGraphFacts([spec(i) for i in model.graph.input if i.name not in inits],
                          [spec(o) for o in model.graph.output], is_fp16)


def onnx_io(onnx_path: Path) -> tuple[list[InputSpec], list[InputSpec]]:
    """Graph inputs (skipping initializers) and outputs."""
    facts = onnx_graph_facts(onnx_path)
    return facts.inputs, facts.outputs


def onnx_inputs(onnx_path: Path) -> list[InputSpec]:
    """Graph inputs only (what an optimization profile must cover)."""
    return onnx_graph_facts(onnx_path).inputs


def onnx_is_fp16(onnx_path: Path) -> bool:
    """fp16 inputs or weights (such a graph is built strongly typed)."""
    return onnx_graph_facts(onnx_path).fp16


def profile_shapes(inputs: Sequence[InputSpec], ranges: ShapeRanges) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shape per input, by axis role: dim 0 = batch, dims 2/3 of a 4-D input = latent H/W,
    dim 1 of a 3-D input = text length. Fixed dims stay as exported. SDXL's text_embeds/time_ids only vary in batch.
    """
    r = ranges.resolved()
    out: dict[str, tuple[tuple[int, ...], ...]] = {}
    for spec in inputs:
        mins, opts, maxs = [], [], []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int) and d > 0:
                rng = DimRange.fixed(d)
            elif axis == 0:
                rng = r.batch
            elif len(spec.dims) == 4 and axis == 2:
                rng = r.height
            elif len(spec.dims) == 4 and axis == 3:
                rng = r.width
            elif len(spec.dims) == 3 and axis == 1:
                rng = r.seq_len
            else:
                raise ExportError(f"input {spec.name!r} has a dynamic axis {axis} ({d!r}) with no known role; "
                                  "export it with a fixed size or as batch / latent H,W / text length")
            mins.append(rng.min)
            opts.append(rng.opt)
            maxs.append(rng.max)
        out[spec.name] = (tuple(mins), tuple(opts), tuple(maxs))
    return out


def make_feeds(inputs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]], seed: int = 0,
               dtype_override: str | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs in the value ranges a UNet sees (timesteps in [0, 1000), latents/embeddings ~ N(0,1)).

    LCM's `timestep_cond` is a sin/cos embedding (N(0,1) is its range); integer inputs (class ids) are 0, the
    one id every class embedding has.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = shapes[spec.name]
        if spec.dtype.startswith("int"):
            arr = np.zeros(shape)
        elif "time" in spec.name and "ids" not in spec.name and "cond" not in spec.name:
            arr = rng.uniform(0, 999, size=shape)
        elif "time_ids" in spec.name:
            arr = rng.uniform(0, 64, size=shape)
        else:
            arr = rng.standard_normal(size=shape)
        dt = spec.dtype if spec.dtype.startswith(("int", "bool")) else (dtype_override or spec.dtype)
        feeds[spec.name] = np.asarray(arr).astype(dt)
    return feeds


# ----------------------------------------------------------------------------------------------------- parity

@dataclass(frozen=True)
class OutputParity:
    """Measured error of one output, so the report can state the maxima, not only pass/fail."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    nonfinite: int
    passed: bool


@dataclass(frozen=True)
class ParityResult:
    """ONNX Runtime fp32 vs the engine at the stated tolerances over every feed (one per profile shape)."""

    rtol: float
    atol: float
    passed: bool
    outputs: tuple[OutputParity, ...]
    feeds: int
    failures: tuple[str, ...] = ()


def compare_runners(reference, candidate, ref_feeds: Iterable[dict[str, np.ndarray]],
                    cand_feeds: Iterable[dict[str, np.ndarray]], rtol: float, atol: float) -> ParityResult:
    """Run both Polygraphy runners, compare with Comparator.compare_accuracy(CompareFunc.simple(rtol, atol)) and
    check the candidate for NaN/Inf. Feeds are given per runner since an fp16 engine takes fp16 inputs.
    """
    from polygraphy.comparator import Comparator, RunResults  # noqa: PLC0415

    try:  # Polygraphy >= 0.53; CompareFunc.simple before (deprecated since)
        from polygraphy.comparator import SimpleCompareFunc  # noqa: PLC0415
    except ImportError:
        from polygraphy.comparator import CompareFunc  # noqa: PLC0415

        SimpleCompareFunc = CompareFunc.simple  # noqa: N806

    ref_feeds, cand_feeds = list(ref_feeds), list(cand_feeds)
    results = RunResults()
    for runner, feeds in ((reference, ref_feeds), (candidate, cand_feeds)):
        for name, iters in Comparator.run([runner], data_loader=feeds).items():
            for it in iters:  # compare in fp32: an fp16 engine's outputs vs the fp32 reference
                for k in list(it.keys()):
                    it[k] = np.asarray(it[k]).astype(np.float32)
            results.append((name, iters))
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(rtol=rtol, atol=atol))
    passed = bool(accuracy)

    (ref_name, ref_iters), (cand_name, cand_iters) = results[0], results[1]
    stats: dict[str, list[float]] = {}
    failures: list[str] = []
    for ref_it, cand_it in zip(ref_iters, cand_iters, strict=True):
        for k, ref_out in ref_it.items():
            cand_out = np.asarray(cand_it[k], dtype=np.float64)
            ref64 = np.asarray(ref_out, dtype=np.float64)
            finite = np.isfinite(cand_out) & np.isfinite(ref64)
            nonfinite = int((~np.isfinite(cand_out)).sum())
            diff = np.abs(cand_out - ref64)[finite]  # error stats over finite pairs; NaN/Inf counted apart
            s = stats.setdefault(k, [0.0, 0.0, 0.0, 0.0])
            if diff.size:
                s[0] = max(s[0], float(diff.max()))
                s[1] = max(s[1], float((diff / (np.abs(ref64[finite]) + 1e-12)).max()))
                s[2] = max(s[2], float(diff.mean()))
            s[3] += nonfinite
    outputs = []
    pair_ok = accuracy[0][(ref_name, cand_name)] if accuracy else None
    for k, (mx, mr, mean, nonfinite) in stats.items():
        ok_cmp = all(bool(it[k]) for it in pair_ok) if pair_ok is not None else passed
        ok = ok_cmp and nonfinite == 0
        if nonfinite:
            failures.append(f"{k}: {nonfinite} NaN/Inf values in the engine output")
        if not ok_cmp:
            failures.append(f"{k}: max abs {mx:.3g} / max rel {mr:.3g} beyond rtol={rtol} atol={atol}")
        outputs.append(OutputParity(k, mx, mr, mean, nonfinite, ok))
    all_ok = passed and all(o.passed for o in outputs)
    return ParityResult(rtol, atol, all_ok, tuple(outputs), len(ref_feeds), tuple(failures))


def onnxrt_runner(onnx_path: Path, name: str = "onnxrt-fp32"):
    """Polygraphy's ONNX Runtime runner on CPU: the fp32 reference every engine is held to."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx  # noqa: PLC0415

    return OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name=name)


# ------------------------------------------------------------------------------------------------------- build

@dataclass(frozen=True)
class BuildOptions:
    """Everything `uniforget build` needs; defaults follow NVIDIA's diffusion demo (fp16, opt level 3)."""

    onnx: Path
    out_dir: Path
    fp16: bool = True
    strongly_typed: bool | None = None  # None: on exactly when the ONNX itself is fp16
    ranges: ShapeRanges = field(default_factory=ShapeRanges)
    workspace_gib: float = 8.0
    builder_optimization_level: int = 3
    timing_cache: Path | None = None  # loaded when present, saved (appended) after the build
    reference_onnx: Path | None = None  # fp32 ONNX for parity; default: `onnx` itself
    rtol: float = 1e-2
    atol: float = 5e-3
    parity: bool = True
    seed: int = 0
    overwrite: bool = False


@dataclass(frozen=True)
class BuildResult:
    plan: Path
    build_json: Path
    parity: ParityResult | None
    seconds: float


def gpu_info() -> dict[str, Any]:
    """GPU name and compute capability for build.json (engines are specific to both)."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(i)
            return {"name": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}"}
    except Exception as e:  # a CPU torch or a broken CUDA runtime: fall back to nvidia-smi
        log.debug("torch.cuda unavailable for GPU info: %s", e)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
        name, cap = (s.strip() for s in out[0].split(","))
        return {"name": name, "compute_capability": cap}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as e:
        log.debug("nvidia-smi unavailable: %s", e)
        return {"name": "unknown", "compute_capability": "unknown"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_options(opts: BuildOptions) -> None:
    if not opts.onnx.is_file():
        raise ExportError(f"ONNX model not found: {opts.onnx}")
    if opts.reference_onnx is not None and not opts.reference_onnx.is_file():
        raise ExportError(f"reference ONNX model not found: {opts.reference_onnx}")
    if opts.out_dir.exists() and any(opts.out_dir.iterdir()) and not opts.overwrite:
        raise ExportError(f"output folder {opts.out_dir} is not empty; pass --overwrite to replace it")
    if opts.workspace_gib <= 0:
        raise ExportError(f"workspace must be > 0 GiB, got {opts.workspace_gib}")
    if not 0 <= opts.builder_optimization_level <= 5:
        raise ExportError(f"builder optimization level must be 0..5, got {opts.builder_optimization_level}")


def build_engine(opts: BuildOptions, progress: Callable[[str], None] | None = None,
                 facts: OnnxGraphFacts | None = None) -> BuildResult:
    """ONNX -> TensorRT plan + build.json in `opts.out_dir`, published only after parity passed.

    `facts` is `onnx_graph_facts(opts.onnx)` where the caller already read it (the CLI does, to refuse an
    unreadable file before the build), so the graph is parsed once.
    """
    _check_options(opts)
    trt = import_tensorrt()
    from polygraphy.backend.trt import (  # noqa: PLC0415
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
        TrtRunner,
    )

    say = progress or (lambda s: log.info("%s", s))
    facts = facts or onnx_graph_facts(opts.onnx)  # one parse of the graph for inputs and precision
    inputs = facts.inputs
    shapes = profile_shapes(inputs, opts.ranges)
    profile = Profile()
    for name, (mn, op, mx) in shapes.items():
        profile.add(name, min=mn, opt=op, max=mx)

    fp16_onnx = facts.fp16
    strongly_typed = fp16_onnx if opts.strongly_typed is None else opts.strongly_typed
    # a strongly typed network takes its precisions from the graph; builder precision flags are rejected there
    use_fp16_flag = opts.fp16 and not strongly_typed
    precision = "fp16" if (opts.fp16 or fp16_onnx) else "fp32"

    cache = opts.timing_cache
    config = CreateConfig(
        fp16=use_fp16_flag,
        profiles=[profile],
        load_timing_cache=str(cache) if cache and cache.is_file() else None,
        builder_optimization_level=opts.builder_optimization_level,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(opts.workspace_gib * (1 << 30))},
    )
    network = NetworkFromOnnxPath(str(opts.onnx), strongly_typed=strongly_typed)

    out_dir = opts.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        say(f"building TensorRT {trt.__version__} engine ({precision}, strongly typed={strongly_typed}, "
            f"opt level {opts.builder_optimization_level}) from {opts.onnx}")
        engine = EngineFromNetwork(network, config=config, save_timing_cache=str(cache) if cache else None)
        engine = SaveEngine(engine, path=str(tmp / PLAN_NAME))()
        seconds = time.perf_counter() - t0
        say(f"engine built in {seconds:.1f} s")

        parity = None
        if opts.parity:
            parity = check_engine_parity(engine, opts, inputs, shapes, TrtRunner)
            if not parity.passed:
                raise ValidationError(
                    f"TensorRT engine misses ONNX Runtime fp32 parity (rtol={opts.rtol}, atol={opts.atol}): "
                    + "; ".join(parity.failures), list(parity.failures))
            worst = max((o.max_abs for o in parity.outputs), default=0.0)
            say(f"parity vs ONNX Runtime fp32 passed: max abs {worst:.3g} (rtol={opts.rtol}, atol={opts.atol})")

        record = {
            "tensorrt_version": str(trt.__version__),
            "gpu": gpu_info(),
            "precision": precision,
            "strongly_typed": strongly_typed,
            "static_shapes": opts.ranges.static,
            "profiles": [{k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in shapes.items()}],
            "builder_optimization_level": opts.builder_optimization_level,
            "workspace_bytes": int(opts.workspace_gib * (1 << 30)),
            "timing_cache": str(cache) if cache else None,
            "onnx": {"path": str(opts.onnx), "sha256": _sha256(opts.onnx)},
            "reference_onnx": str(opts.reference_onnx or opts.onnx),
            "build_seconds": round(seconds, 3),
            "parity": asdict(parity) if parity else None,
        }
        (tmp / BUILD_JSON).write_text(json.dumps(record, indent=2) + "\n")
        _publish(tmp, out_dir, opts.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out_dir / PLAN_NAME, out_dir / BUILD_JSON, parity, seconds)


def check_engine_parity(engine, opts: BuildOptions, inputs: Sequence[InputSpec],
                        shapes: dict[str, tuple[tuple[int, ...], ...]], trt_runner_cls) -> ParityResult:
    """Engine vs ONNX Runtime fp32 at every distinct profile shape (min, opt, max)."""
    ref_path = opts.reference_onnx or opts.onnx
    # the reference is a second parse only when it is another file than the one built
    ref_inputs = {s.name: s for s in (onnx_inputs(ref_path) if opts.reference_onnx else inputs)}
    ref_feeds, cand_feeds = [], []
    seen = set()
    for which in range(3):
        at = {name: shp[which] for name, shp in shapes.items()}
        key = tuple(sorted(at.items()))
        if key in seen:
            continue
        seen.add(key)
        base = make_feeds(inputs, at, seed=opts.seed + which, dtype_override="float32")
        cand_feeds.append({s.name: base[s.name].astype(s.dtype) for s in inputs})
        ref_feeds.append({k: v.astype(ref_inputs[k].dtype) if k in ref_inputs else v for k, v in base.items()})
    return compare_runners(onnxrt_runner(ref_path), trt_runner_cls(engine, name="tensorrt"),
                           ref_feeds, cand_feeds, opts.rtol, opts.atol)


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder into place (replacing an old one only when asked)."""
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise ExportError(f"output folder {out_dir} appeared during the build; not replacing it")
    publish_dir(tmp, out_dir)


def load_build_record(out_dir: Path) -> dict[str, Any]:
    """build.json of a finished build (the Triton repository reads precision and profiles from it)."""
    p = Path(out_dir) / BUILD_JSON
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {p}: {e}") from e


class TensorRTRunner(Runner):
    """The project's runner protocol (activate / infer / deactivate) over a serialized plan, via Polygraphy's
    TrtRunner; inputs are cast to the engine's declared dtypes, outputs come back as host NumPy arrays."""

    def __init__(self, plan: str | os.PathLike | bytes, name: str = "tensorrt") -> None:
        super().__init__()
        self.plan = plan if isinstance(plan, bytes) else Path(plan)
        self.name = name
        self._runner: Any = None
        self.input_dtypes: dict[str, Any] = {}

    def _activate(self) -> None:
        import_tensorrt()
        from polygraphy.backend.common import BytesFromPath  # noqa: PLC0415
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner  # noqa: PLC0415

        if not isinstance(self.plan, bytes) and not self.plan.is_file():
            raise ExportError(f"{self.name}: TensorRT plan not found: {self.plan}")
        data = self.plan if isinstance(self.plan, bytes) else BytesFromPath(str(self.plan))
        self._runner = TrtRunner(EngineFromBytes(data), name=self.name)
        self._runner.activate()
        from polygraphy.datatype import DataType  # noqa: PLC0415

        meta = self._runner.get_input_metadata()
        self.input_dtypes = {n: DataType.to_dtype(meta[n].dtype, "numpy") for n in meta}

    def _infer(self, feed: Feed) -> dict[str, np.ndarray]:
        missing = set(self.input_dtypes) - set(feed)
        if missing:
            raise ExportError(f"{self.name}: missing inputs {sorted(missing)}")
        cast = {}
        for n, a in feed.items():
            cast[n] = np.ascontiguousarray(np.asarray(a, dtype=self.input_dtypes.get(n)))
        outs = self._runner.infer(cast, copy_outputs_to_host=True)
        return {k: np.array(v) for k, v in outs.items()}

    def _deactivate(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None
