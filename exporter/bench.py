"""Latency of a dense vs a slim UNet across runtimes, with the FLOP ratio beside the latency ratio.

Why its own module: a pruning claim is only worth what the deployed runtime makes of it. Eager PyTorch on a
GPU is launch-bound and hides any pruning gain, so the same pair of UNets is timed under every runtime a user
might deploy with: torch eager, torch with CUDA-graph replay (GPU), torch.compile (whose compile time is
reported too), ONNX Runtime, and TensorRT where an engine is given. Each timing is p50/p95 over `runs`
calls after `warmup` calls, on fixed random inputs; on a GPU every call is bracketed by synchronization.

Only torch, diffusers and NumPy are imported at module level; ONNX export/Runtime load on first use, so
`scripts/gpu_check.py` runs with nothing beyond torch, diffusers and onnxruntime installed.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "cuda_graph", "compile", "onnxruntime", "tensorrt")
CPU_DEFAULT = ("eager", "onnxruntime")
GPU_DEFAULT = ("eager", "cuda_graph", "compile", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BenchOptions:
    """What to time. `height`/`width` are latent pixels (image size / 8 for SD); None = the UNet's sample_size."""

    runtimes: tuple[str, ...] = CPU_DEFAULT
    batch: int = 2
    height: int | None = None
    width: int | None = None
    seq_len: int = 77
    runs: int = 20
    warmup: int = 3
    device: str = "cpu"  # cpu | cuda
    fp16: bool = False  # torch runtimes in half precision (GPU); ONNX Runtime stays fp32
    compile_mode: str | None = None  # None: "reduce-overhead" on cuda, "default" on cpu
    threads: int | None = None  # ONNX Runtime intra-op threads (None: OMP_NUM_THREADS or ORT's default)
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad:
            raise ExportError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
        if self.runs < 20:
            raise ExportError(f"runs must be >= 20 for a stable p95 (got {self.runs})")
        if self.warmup < 1 or self.batch < 1:
            raise ExportError("warmup and batch must be >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ExportError(f"device must be cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class Timing:
    """One model under one runtime; `status` is 'ok' or why it was skipped/failed (then times are None)."""

    model: str
    runtime: str
    status: str
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0
    setup_s: float | None = None  # compile / capture / session creation / export time before the first timed run

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class BenchResult:
    """Dense and slim timings per runtime at one shape, plus parameter/FLOP counts of both."""

    label: str
    options: BenchOptions
    device_name: str
    shape: dict[str, int]
    params: dict[str, int]
    flops: dict[str, int | None]
    timings: tuple[Timing, ...] = field(default_factory=tuple)

    @property
    def flop_ratio(self) -> float | None:
        d, s = self.flops.get("dense"), self.flops.get("slim")
        return s / d if d and s is not None else None

    def get(self, model: str, runtime: str) -> Timing | None:
        return next((t for t in self.timings if t.model == model and t.runtime == runtime), None)

    def ratio(self, runtime: str) -> float | None:
        """slim p50 / dense p50 under one runtime (None when either did not run)."""
        d, s = self.get("dense", runtime), self.get("slim", runtime)
        if d is None or s is None or not d.ok or not s.ok:
            return None
        return s.p50_ms / d.p50_ms

    def rows(self) -> list[dict[str, Any]]:
        """One row per runtime: dense and slim p50/p95, latency ratio, FLOP ratio, speed-up vs eager."""
        out = []
        eager = {m: self.get(m, "eager") for m in ("dense", "slim")}
        for rt in self.options.runtimes:
            d, s = self.get("dense", rt), self.get("slim", rt)
            row: dict[str, Any] = {"runtime": rt, "dense_p50_ms": d.p50_ms if d else None,
                                   "dense_p95_ms": d.p95_ms if d else None, "slim_p50_ms": s.p50_ms if s else None,
                                   "slim_p95_ms": s.p95_ms if s else None, "latency_ratio": self.ratio(rt),
                                   "flop_ratio": self.flop_ratio,
                                   "dense_setup_s": d.setup_s if d else None, "slim_setup_s": s.setup_s if s else None,
                                   "status": "ok" if d and s and d.ok and s.ok else
                                   "; ".join(sorted({t.status for t in (d, s) if t is not None and not t.ok}))}
            e = eager["dense"]
            row["dense_vs_eager"] = (d.p50_ms / e.p50_ms) if d and d.ok and e and e.ok else None
            out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": "uniforget.bench/1", "label": self.label, "options": asdict(self.options),
                "device": self.device_name, "shape": self.shape, "params": self.params, "flops": self.flops,
                "flop_ratio": self.flop_ratio, "timings": [asdict(t) for t in self.timings], "rows": self.rows()}


# ------------------------------------------------------------------------------------------------ timing


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (NumPy's default rule) of a non-empty sequence."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def time_calls(fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of `runs` calls after `warmup` untimed calls; `sync` (CUDA) brackets each timed call."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _timing(model: str, runtime: str, ms: list[float], setup_s: float | None) -> Timing:
    return Timing(model, runtime, "ok", percentile(ms, 50), percentile(ms, 95), statistics.fmean(ms), len(ms),
                  setup_s)


def torch_inputs(unet: Any, opts: BenchOptions) -> dict[str, Any]:
    """Fixed random inputs on the bench device (SDXL's added conditioning when the config asks for it)."""
    import torch

    from uniforget.geometries import example_inputs

    inputs = example_inputs(unet, batch=opts.batch, height=opts.height, width=opts.width, seq_len=opts.seq_len,
                            seed=opts.seed)
    dtype = torch.float16 if opts.fp16 else torch.float32

    def move(x: Any) -> Any:
        if torch.is_tensor(x):
            return x.to(opts.device, dtype if x.is_floating_point() else x.dtype)
        return {k: move(v) for k, v in x.items()} if isinstance(x, dict) else x

    return move(inputs)


def _sync(device: str) -> Callable[[], None] | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


def _eager(unet: Any, inputs: dict[str, Any], opts: BenchOptions, name: str) -> Timing:
    import torch

    with torch.inference_mode():
        ms = time_calls(lambda: unet(**inputs, return_dict=False), opts.runs, opts.warmup, _sync(opts.device))
    return _timing(name, "eager", ms, None)


def _cuda_graph(unet: Any, inputs: dict[str, Any], opts: BenchOptions, name: str) -> Timing:
    """Capture one forward into a CUDA graph (static inputs) and time its replay: no launch overhead."""
    import torch

    if opts.device != "cuda":
        return Timing(name, "cuda_graph", "skipped: needs a CUDA device")
    t0 = time.perf_counter()
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up on a side stream before capture, as torch's docs require
                unet(**inputs, return_dict=False)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            unet(**inputs, return_dict=False)
        torch.cuda.synchronize()
        setup = time.perf_counter() - t0
        ms = time_calls(graph.replay, opts.runs, opts.warmup, torch.cuda.synchronize)
    del graph
    return _timing(name, "cuda_graph", ms, setup)


def _compile(unet: Any, inputs: dict[str, Any], opts: BenchOptions, name: str) -> Timing:
    """torch.compile: the peer a GPU user would reach for; the first call's time is reported as setup."""
    import torch

    mode = opts.compile_mode or ("reduce-overhead" if opts.device == "cuda" else "default")
    try:
        compiled = torch.compile(unet, mode=mode, fullgraph=False)
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled(**inputs, return_dict=False)
            sync = _sync(opts.device)
            if sync:
                sync()
            setup = time.perf_counter() - t0
            ms = time_calls(lambda: compiled(**inputs, return_dict=False), opts.runs, opts.warmup, sync)
    except Exception as e:  # inductor needs a C++ compiler / Triton; report why rather than abort the sweep
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return Timing(name, "compile", f"failed: {type(e).__name__}: {msg}")
    finally:
        torch._dynamo.reset()
    return _timing(name, "compile", ms, setup)


def export_onnx_plain(unet: Any, path: Path, opts: BenchOptions) -> Path:
    """torch -> ONNX with torch alone (no graph clean-up): what gpu_check uses where only onnxruntime is installed."""
    import torch

    from .onnx_export import unet_for_onnx, unet_inputs, unet_spec

    spec = unet_spec(unet)
    h, w = opts.height or unet.config.sample_size, opts.width or unet.config.sample_size
    feed = unet_inputs(unet, opts.batch, h, w, seq_len=opts.seq_len)
    args = tuple(torch.from_numpy(feed[n]) for n in spec.input_names)
    cpu = unet_for_onnx(unet).to("cpu", torch.float32)
    with torch.no_grad():
        torch.onnx.export(cpu, args, str(path), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes, opset_version=17,
                          do_constant_folding=True, dynamo=False)
    return path


def _onnxruntime(unet: Any, onnx_path: Path | None, opts: BenchOptions, name: str) -> Timing:
    try:
        import onnxruntime as ort
    except ImportError:
        return Timing(name, "onnxruntime", "skipped: onnxruntime is not installed")
    from .onnx_export import unet_inputs

    providers = ["CPUExecutionProvider"]
    if opts.device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return Timing(name, "onnxruntime", "skipped: onnxruntime has no CUDAExecutionProvider "
                                               "(pip install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="uniforget-bench-") as d:
        try:
            path = onnx_path or _export_for_bench(unet, Path(d) / "unet.onnx", opts)
        except Exception as e:  # export problems are reported in the row, the sweep goes on
            return Timing(name, "onnxruntime", f"failed: export: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        so = ort.SessionOptions()
        threads = opts.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit()
                                   else 0)
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        setup = time.perf_counter() - t0
        h, w = opts.height or unet.config.sample_size, opts.width or unet.config.sample_size
        feed = unet_inputs(unet, opts.batch, h, w, seq_len=opts.seq_len, seed=opts.seed, timestep=500.0)
        want = {i.name for i in sess.get_inputs()}
        feed = {k: v for k, v in feed.items() if k in want}
        ms = time_calls(lambda: sess.run(None, feed), opts.runs, opts.warmup)
    return _timing(name, "onnxruntime", ms, setup)


def _export_for_bench(unet: Any, path: Path, opts: BenchOptions) -> Path:
    """The project's exporter (folded graph) when its dependencies are present, else a plain torch export."""
    try:
        import onnx_graphsurgeon  # noqa: F401
        import polygraphy  # noqa: F401
    except ImportError:
        return export_onnx_plain(unet, path, opts)
    import torch

    from .onnx_export import OnnxExportOptions, export_unet

    cpu = unet if opts.device == "cpu" and not opts.fp16 else _cpu_fp32_copy(unet)
    h = opts.height or cpu.config.sample_size
    with torch.no_grad():
        return export_unet(cpu, path, OnnxExportOptions(dummy_batch=opts.batch, dummy_seq_len=opts.seq_len),
                           height=h, width=opts.width or h).path


def _cpu_fp32_copy(unet: Any) -> Any:
    import copy

    import torch

    return copy.deepcopy(unet).to("cpu", torch.float32)


def _tensorrt(plan: Path | None, unet: Any, opts: BenchOptions, name: str) -> Timing:
    if plan is None:
        return Timing(name, "tensorrt", "skipped: no engine given (build one with --trt / uniforget build)")
    from .errors import MissingDependencyError
    from .onnx_export import unet_inputs
    from .tensorrt_build import TensorRTRunner

    h, w = opts.height or unet.config.sample_size, opts.width or unet.config.sample_size
    feed = unet_inputs(unet, opts.batch, h, w, seq_len=opts.seq_len, seed=opts.seed, timestep=500.0)
    try:
        t0 = time.perf_counter()
        with TensorRTRunner(plan, name=name) as runner:
            setup = time.perf_counter() - t0
            ms = time_calls(lambda: runner.infer(feed), opts.runs, opts.warmup)
    except MissingDependencyError as e:
        return Timing(name, "tensorrt", f"skipped: {e}")
    return _timing(name, "tensorrt", ms, setup)


# ------------------------------------------------------------------------------------------------ entry points


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, torch threads " \
           f"{__import__('torch').get_num_threads()})"


def flops_at(unet: Any, opts: BenchOptions) -> int | None:
    """Forward FLOPs of this (possibly pruned) UNet at the bench shape, traced on a weightless meta copy."""
    import copy

    from uniforget.flops import ReferenceShape, count_flops

    meta = copy.deepcopy(unet).to("meta")
    h = opts.height or int(unet.config.sample_size)
    return count_flops(meta, ReferenceShape(opts.batch, h, opts.width or h, opts.seq_len))


def bench_one(unet: Any, name: str, opts: BenchOptions, onnx_path: Path | None = None,
              trt_plan: Path | None = None, progress: Callable[[str], None] | None = None) -> list[Timing]:
    """Time one UNet under every requested runtime (its weights are moved to the bench device and dtype)."""
    import torch

    say = progress or (lambda s: log.info("%s", s))
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("device cuda requested but torch sees no CUDA device")
    dev_unet = unet.to(opts.device, torch.float16 if opts.fp16 else torch.float32).eval()
    inputs = torch_inputs(dev_unet, opts)
    out = []
    for rt in opts.runtimes:
        say(f"{name}: {rt}")
        if rt == "eager":
            t = _eager(dev_unet, inputs, opts, name)
        elif rt == "cuda_graph":
            t = _cuda_graph(dev_unet, inputs, opts, name)
        elif rt == "compile":
            t = _compile(dev_unet, inputs, opts, name)
        elif rt == "onnxruntime":
            t = _onnxruntime(dev_unet if opts.device == "cpu" and not opts.fp16 else _cpu_fp32_copy(dev_unet),
                             onnx_path, opts, name)
        else:
            t = _tensorrt(trt_plan, dev_unet, opts, name)
        if t.ok:
            say(f"{name}: {rt}: p50 {t.p50_ms:.2f} ms, p95 {t.p95_ms:.2f} ms")
        else:
            say(f"{name}: {rt}: {t.status}")
        out.append(t)
    return out


def bench_pair(dense: Any, slim: Any, opts: BenchOptions, label: str = "unet",
               onnx: dict[str, Path] | None = None, trt: dict[str, Path] | None = None,
               progress: Callable[[str], None] | None = None) -> BenchResult:
    """Time dense and slim under the same runtimes and inputs; counts parameters and FLOPs of both."""
    onnx, trt = onnx or {}, trt or {}
    h = opts.height or int(dense.config.sample_size)
    opts = replace(opts, height=h, width=opts.width or h)
    shape = {"batch": opts.batch, "height": h, "width": opts.width, "seq_len": opts.seq_len}
    params = {"dense": sum(p.numel() for p in dense.parameters()), "slim": sum(p.numel() for p in slim.parameters())}
    flops = {"dense": flops_at(dense, opts), "slim": flops_at(slim, opts)}
    timings = []
    for name, unet in (("dense", dense), ("slim", slim)):
        timings += bench_one(unet, name, opts, onnx.get(name), trt.get(name), progress)
    return BenchResult(label, opts, device_name(opts.device), shape, params, flops, tuple(timings))


def random_slim(unet: Any, ratio: float, seed: int = 0) -> tuple[Any, Any]:
    """A slim copy of `unet` with `ratio` of its parameters removed by random gate scores (for speed checks on
    random-weight geometries, where no learned MaskSet exists). Returns (slim, plan)."""
    import torch

    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.plan import make_plan
    from uniforget.prune import prune_unet
    from uniforget.targets import discover_targets

    g = torch.Generator().manual_seed(seed)
    logits = {t.key: torch.randn(t.size, generator=g) for t in discover_targets(unet)}
    ms = MaskSet(logits=logits, model_fingerprint=model_fingerprint(unet), meta={"source": f"random seed {seed}"})
    plan = make_plan(unet, ms, ratio, with_flops=False)
    return prune_unet(unet, plan), plan


# ------------------------------------------------------------------------------------------------ output


def format_table(results: Sequence[BenchResult]) -> list[list[str]]:
    """Rows for a printed table: model, runtime, dense/slim p50 (p95), latency ratio, FLOP ratio, setup."""

    def ms(p50: float | None, p95: float | None) -> str:
        return "-" if p50 is None else f"{p50:.2f} ({p95:.2f})"

    def r(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    table = []
    for res in results:
        for row in res.rows():
            setup = row["dense_setup_s"]
            table.append([res.label, f"b{res.shape['batch']} {res.shape['height']}x{res.shape['width']}",
                          row["runtime"], ms(row["dense_p50_ms"], row["dense_p95_ms"]),
                          ms(row["slim_p50_ms"], row["slim_p95_ms"]), r(row["latency_ratio"]), r(row["flop_ratio"]),
                          r(row["dense_vs_eager"]), "-" if setup is None else f"{setup:.1f}",
                          row["status"] if row["status"] != "ok" else ""])
    return table


TABLE_HEADER = ["model", "shape", "runtime", "dense p50 (p95) ms", "slim p50 (p95) ms", "slim/dense latency",
                "slim/dense FLOPs", "vs eager (dense)", "setup s (dense)", "note"]


def write_json(results: Sequence[BenchResult], path: str | os.PathLike) -> Path:
    """All results as one JSON file, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({"format": "uniforget.bench/1", "results": [r.to_json() for r in results]}, indent=2))
    tmp.replace(path)
    return path


def plot(results: Sequence[BenchResult], path: str | os.PathLike, title: str = "UNet latency, dense vs slim") -> Path:
    """Grouped bars of p50 latency (dense vs slim) per model and runtime; the slim/dense ratio is written on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(res, row) for res in results for row in res.rows() if row["dense_p50_ms"] is not None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(groups) + 1.5), 3.6), dpi=120)
    x = np.arange(len(groups))
    dense = [row["dense_p50_ms"] for _, row in groups]
    slim = [row["slim_p50_ms"] or 0.0 for _, row in groups]
    ax.bar(x - 0.2, dense, 0.4, label="dense", color="#8c8c8c")
    ax.bar(x + 0.2, slim, 0.4, label="slim", color="#2b7bba")
    for i, (_, row) in enumerate(groups):
        if row["latency_ratio"] is not None:
            fr = f"\nFLOPs x{row['flop_ratio']:.2f}" if row["flop_ratio"] else ""
            ax.annotate(f"x{row['latency_ratio']:.2f}{fr}", (x[i], max(dense[i], slim[i])), ha="center",
                        va="bottom", fontsize=7)
    multi = len({res.label for res, _ in groups}) > 1
    ax.set_xticks(x, [f"{res.label}\n{row['runtime']}" if multi else row["runtime"] for res, row in groups],
                  fontsize=8)
    ax.set_ylabel("p50 latency per UNet call (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    from .report import save_figure

    return save_figure(fig, path)
