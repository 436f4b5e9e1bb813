"""Latency of a dense vs a slim UNet across runtimes, interleaved, with the ratio's interval beside the FLOP ratio.

Why its own module: a pruning claim is only worth what the deployed runtime makes of it, and on a shared
machine a dense-then-slim timing measures the neighbours as much as the models (two back-to-back runs gave
x0.72 and x1.10 for the same pair). So both UNets are prepared first (session, graph capture, compile) and
then called alternately, round by round, in ABBA order (dense, slim, slim, dense, ...) so slow drifts hit
both alike. The slim/dense ratio is the median of the per-round ratios; its 95% interval is a bootstrap of
that median over rounds. Rounds are added (up to `max_runs`) until the interval is narrow enough
(`ci_halfwidth`). An interval that contains 1 reads "within noise": no gain or loss is claimed.

Runtimes: torch eager, CUDA-graph replay (GPU), torch.compile (its compile time is reported as setup),
ONNX Runtime, TensorRT where engines are given. The UNets are modules or slim-UNet / diffusers folders
(`onnx_export.load_unet`), as everywhere in exporter/; this module does not plan or prune.

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
from .figures import latency_chart as plot

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "cuda_graph", "compile", "onnxruntime", "tensorrt")
CPU_DEFAULT = ("eager", "onnxruntime")
GPU_DEFAULT = ("eager", "cuda_graph", "compile", "onnxruntime", "tensorrt")
MODELS = ("dense", "slim")


@dataclass(frozen=True)
class BenchOptions:
    """What to time. `height`/`width` are latent pixels (image size / 8 for SD); None = the UNet's sample_size.

    `runs` is the least number of interleaved rounds (one call of each model per round); more rounds are added,
    `runs` at a time up to `max_runs` (None: 3 x runs), until the ratio's 95% interval is within +-`ci_halfwidth`.
    """

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
    max_runs: int | None = None
    ci_halfwidth: float = 0.02
    confidence: float = 0.95

    def __post_init__(self) -> None:
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad:
            raise ExportError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
        if self.runs < 20:
            raise ExportError(f"runs must be >= 20 for a stable p95 and ratio interval (got {self.runs})")
        if self.max_runs is not None and self.max_runs < self.runs:
            raise ExportError(f"max_runs ({self.max_runs}) must be >= runs ({self.runs})")
        if self.warmup < 1 or self.batch < 1:
            raise ExportError("warmup and batch must be >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ExportError(f"device must be cpu or cuda, got {self.device!r}")
        if not 0 < self.confidence < 1 or not self.ci_halfwidth > 0:
            raise ExportError("confidence must be in (0, 1) and ci_halfwidth > 0")

    @property
    def round_limit(self) -> int:
        return self.max_runs if self.max_runs is not None else 3 * self.runs


@dataclass(frozen=True)
class Timing:
    """One model under one runtime; `status` is 'ok' or why it was skipped/failed (then times are None).
    `samples` holds every timed call (ms) in round order, paired with the other model's by index."""

    model: str
    runtime: str
    status: str
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0
    setup_s: float | None = None  # compile / capture / session creation / export time before the first timed run
    samples: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class RatioEstimate:
    """slim/dense latency: median of paired per-round ratios, with a bootstrap interval of that median."""

    ratio: float
    low: float
    high: float
    rounds: int
    confidence: float = 0.95

    @property
    def verdict(self) -> str:
        """'slim faster' / 'slim slower' only when the whole interval says so, else 'within noise'."""
        if self.high < 1.0:
            return "slim faster"
        if self.low > 1.0:
            return "slim slower"
        return "within noise"

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2

    def describe(self) -> str:
        return f"x{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.verdict})"


def ratio_estimate(dense_ms: Sequence[float], slim_ms: Sequence[float], confidence: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> RatioEstimate:
    """Median of slim_i / dense_i over rounds and a percentile-bootstrap interval of it (seeded, reproducible).

    Pairing by round cancels what both calls of a round share (a neighbour's burst, clock changes); the median
    ignores the odd call that a neighbour stalled."""
    d, s = np.asarray(dense_ms, dtype=np.float64), np.asarray(slim_ms, dtype=np.float64)
    if d.shape != s.shape or d.size < 2:
        raise ValueError(f"need >= 2 paired rounds, got {d.size} dense and {s.size} slim")
    r = s / d
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, r.size, (resamples, r.size))], axis=1)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return RatioEstimate(float(np.median(r)), float(lo), float(hi), int(r.size), confidence)


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

    def estimate(self, runtime: str) -> RatioEstimate | None:
        """The paired ratio with its interval; None when either model did not run (or was not interleaved)."""
        d, s = self.get("dense", runtime), self.get("slim", runtime)
        if d is None or s is None or not d.ok or not s.ok or len(d.samples) != len(s.samples) or len(d.samples) < 2:
            return None
        return ratio_estimate(d.samples, s.samples, self.options.confidence, seed=self.options.seed)

    def ratio(self, runtime: str) -> float | None:
        """slim/dense latency under one runtime: the median paired ratio (None when either did not run)."""
        e = self.estimate(runtime)
        return None if e is None else e.ratio

    def rows(self) -> list[dict[str, Any]]:
        """One row per runtime: dense and slim p50/p95, the ratio with its interval and verdict, FLOP ratio."""
        out = []
        eager = self.get("dense", "eager")
        for rt in self.options.runtimes:
            d, s = self.get("dense", rt), self.get("slim", rt)
            e = self.estimate(rt)
            row: dict[str, Any] = {
                "runtime": rt, "dense_p50_ms": d.p50_ms if d else None, "dense_p95_ms": d.p95_ms if d else None,
                "slim_p50_ms": s.p50_ms if s else None, "slim_p95_ms": s.p95_ms if s else None,
                "latency_ratio": e.ratio if e else None, "ratio_low": e.low if e else None,
                "ratio_high": e.high if e else None, "verdict": e.verdict if e else None,
                "rounds": e.rounds if e else None, "flop_ratio": self.flop_ratio,
                "dense_setup_s": d.setup_s if d else None, "slim_setup_s": s.setup_s if s else None,
                "status": "ok" if d and s and d.ok and s.ok else
                "; ".join(sorted({t.status for t in (d, s) if t is not None and not t.ok})) or "not run"}
            row["dense_vs_eager"] = (d.p50_ms / eager.p50_ms) if d and d.ok and eager and eager.ok else None
            out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": "uniforget.bench/2", "label": self.label, "options": asdict(self.options),
                "device": self.device_name, "shape": self.shape, "params": self.params, "flops": self.flops,
                "flop_ratio": self.flop_ratio, "timings": [asdict(t) for t in self.timings], "rows": self.rows()}


def ratio_sentence(row: dict[str, Any], confidence: float = 0.95) -> str:
    """What a report may say about one runtime's row, and nothing more than its interval supports."""
    if row.get("latency_ratio") is None:
        return f"{row['runtime']}: not measured ({row.get('status')})"
    r, lo, hi = row["latency_ratio"], row["ratio_low"], row["ratio_high"]
    span = f"slim/dense x{r:.3f}, {confidence:.0%} interval [{lo:.3f}, {hi:.3f}] over {row['rounds']} rounds"
    if row["verdict"] == "within noise":
        return f"{row['runtime']}: {span}: within noise (no speed difference shown)"
    return f"{row['runtime']}: {span}: {row['verdict']}"


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


def interleaved(fns: dict[str, Callable[[], Any]], opts: BenchOptions,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Milliseconds per call for each of two callables, called alternately in ABBA order, round by round.

    Warm-up calls first (each model `warmup` times); then at least `opts.runs` rounds, adding `opts.runs` more
    while the paired ratio's interval is wider than +-`opts.ci_halfwidth`, up to `opts.round_limit` rounds."""
    sync = sync or (lambda: None)
    names = list(fns)
    for _ in range(opts.warmup):
        for n in names:
            fns[n]()
    sync()
    out: dict[str, list[float]] = {n: [] for n in names}

    def one(n: str) -> None:
        t0 = time.perf_counter()
        fns[n]()
        sync()
        out[n].append((time.perf_counter() - t0) * 1e3)

    rounds = 0
    while True:
        for _ in range(opts.runs if rounds < opts.runs else min(opts.runs, opts.round_limit - rounds)):
            for n in (names if rounds % 2 == 0 else names[::-1]):
                one(n)
            rounds += 1
        if rounds >= opts.round_limit or len(names) != 2:
            break
        e = ratio_estimate(out[names[0]], out[names[1]], opts.confidence, seed=opts.seed)
        if e.halfwidth <= opts.ci_halfwidth:
            break
        log.info("ratio %s after %d rounds: wider than +-%g, adding rounds", e.describe(), rounds,
                 opts.ci_halfwidth)
    return out


def _timing(model: str, runtime: str, ms: list[float], setup_s: float | None) -> Timing:
    return Timing(model, runtime, "ok", percentile(ms, 50), percentile(ms, 95), statistics.fmean(ms), len(ms),
                  setup_s, tuple(ms))


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


class _Skip(Exception):
    """A runtime that cannot run here; its message becomes the Timing status."""


# Each preparer returns (a zero-argument call, setup seconds, a cleanup) or raises _Skip. Preparing both models
# before timing either is what lets the calls interleave.


def eager_call(unet: Any, inputs: dict[str, Any]) -> Callable[[], Any]:
    """The zero-argument eager forward every eager timing here calls (no grad, tuple output)."""
    import torch

    def call() -> Any:
        with torch.inference_mode():
            return unet(**inputs, return_dict=False)

    return call


def _prep_eager(unet: Any, inputs: dict[str, Any], opts: BenchOptions, tmp: Path, name: str) -> tuple:
    return eager_call(unet, inputs), None, None


def _prep_cuda_graph(unet: Any, inputs: dict[str, Any], opts: BenchOptions, tmp: Path, name: str) -> tuple:
    """Capture one forward into a CUDA graph (static inputs) and replay it: no launch overhead."""
    import torch

    if opts.device != "cuda":
        raise _Skip("skipped: needs a CUDA device")
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
    return graph.replay, time.perf_counter() - t0, None


def _prep_compile(unet: Any, inputs: dict[str, Any], opts: BenchOptions, tmp: Path, name: str) -> tuple:
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
    except Exception as e:  # inductor needs a C++ compiler / Triton; report why rather than abort the sweep
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise _Skip(f"failed: {type(e).__name__}: {msg}") from e

    def call() -> Any:
        with torch.inference_mode():
            return compiled(**inputs, return_dict=False)

    return call, setup, None


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


def ort_session(path: str | os.PathLike, opts: BenchOptions) -> Any:
    """An ONNX Runtime session on the bench device with the bench's thread count."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if opts.device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise _Skip("skipped: onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider"]
    so = ort.SessionOptions()
    threads = opts.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit()
                               else 0)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def _prep_onnxruntime(unet: Any, onnx_path: Path | None, opts: BenchOptions, tmp: Path, name: str) -> tuple:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise _Skip("skipped: onnxruntime is not installed") from None
    from .onnx_export import unet_inputs

    cpu = unet if opts.device == "cpu" and not opts.fp16 else _cpu_fp32_copy(unet)
    t0 = time.perf_counter()
    try:
        path = onnx_path or _export_for_bench(cpu, tmp / f"{name}.onnx", opts)
    except Exception as e:  # export problems are reported in the row, the sweep goes on
        raise _Skip(f"failed: export: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from e
    sess = ort_session(path, opts)
    setup = time.perf_counter() - t0
    h, w = opts.height or cpu.config.sample_size, opts.width or cpu.config.sample_size
    feed = unet_inputs(cpu, opts.batch, h, w, seq_len=opts.seq_len, seed=opts.seed, timestep=500.0)
    want = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in want}
    return (lambda: sess.run(None, feed)), setup, None


def _export_for_bench(unet: Any, path: Path, opts: BenchOptions) -> Path:
    """The project's exporter (folded graph) when its dependencies are present, else a plain torch export."""
    try:
        import onnx_graphsurgeon  # noqa: F401
        import polygraphy  # noqa: F401
    except ImportError:
        return export_onnx_plain(unet, path, opts)
    import torch

    from .onnx_export import OnnxExportOptions, export_unet

    h = opts.height or unet.config.sample_size
    with torch.no_grad():
        return export_unet(unet, path, OnnxExportOptions(dummy_batch=opts.batch, dummy_seq_len=opts.seq_len),
                           height=h, width=opts.width or h).path


def _cpu_fp32_copy(unet: Any) -> Any:
    import copy

    import torch

    return copy.deepcopy(unet).to("cpu", torch.float32)


def _prep_tensorrt(unet: Any, plan: Path | None, opts: BenchOptions, tmp: Path, name: str) -> tuple:
    if plan is None:
        raise _Skip("skipped: no engine given (build one with --trt / uniforget build)")
    from .errors import MissingDependencyError
    from .onnx_export import unet_inputs
    from .tensorrt_build import TensorRTRunner

    h, w = opts.height or unet.config.sample_size, opts.width or unet.config.sample_size
    feed = unet_inputs(unet, opts.batch, h, w, seq_len=opts.seq_len, seed=opts.seed, timestep=500.0)
    try:
        t0 = time.perf_counter()
        runner = TensorRTRunner(plan, name=name)
        runner.activate()
    except MissingDependencyError as e:
        raise _Skip(f"skipped: {e}") from None
    return (lambda: runner.infer(feed)), time.perf_counter() - t0, runner.deactivate


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

    import torch

    from uniforget.flops import ReferenceShape, count_flops

    # a structural copy whose tensors are meta from the start: deep-copying the weights first would double an
    # SD-size UNet's memory for a count that needs shapes only
    memo = {id(t): (torch.nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                    if isinstance(t, torch.nn.Parameter) else torch.empty_like(t, device="meta"))
            for t in [*unet.parameters(), *unet.buffers()]}
    meta = copy.deepcopy(unet, memo)
    h = opts.height or int(unet.config.sample_size)
    return count_flops(meta, ReferenceShape(opts.batch, h, opts.width or h, opts.seq_len))


def _runtime_pair(rt: str, models: dict[str, Any], inputs: dict[str, dict], opts: BenchOptions,
                  onnx: dict[str, Path], trt: dict[str, Path], tmp: Path, say: Callable[[str], None]) -> list[Timing]:
    """Prepare both models under one runtime, then time them interleaved; a model that cannot run is a skip row."""
    calls, setups, cleanups, out = {}, {}, [], []
    try:
        for name, unet in models.items():
            try:
                if rt == "eager":
                    prep = _prep_eager(unet, inputs[name], opts, tmp, name)
                elif rt == "cuda_graph":
                    prep = _prep_cuda_graph(unet, inputs[name], opts, tmp, name)
                elif rt == "compile":
                    prep = _prep_compile(unet, inputs[name], opts, tmp, name)
                elif rt == "onnxruntime":
                    prep = _prep_onnxruntime(unet, onnx.get(name), opts, tmp, name)
                else:
                    prep = _prep_tensorrt(unet, trt.get(name), opts, tmp, name)
            except _Skip as e:
                out.append(Timing(name, rt, str(e)))
                say(f"{name}: {rt}: {e}")
                continue
            calls[name], setups[name] = prep[0], prep[1]
            if prep[2] is not None:
                cleanups.append(prep[2])
        if calls:
            ms = interleaved(calls, opts, _sync(opts.device) if rt != "onnxruntime" else None)
            for name in calls:
                out.append(_timing(name, rt, ms[name], setups[name]))
    finally:
        for c in cleanups:
            c()
        if rt == "compile":
            import torch

            torch._dynamo.reset()
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(out, key=lambda t: order.get(t.model, 9))


def in_fresh_memory(unet: Any) -> Any:
    """A copy of `unet` whose weights sit in fresh CPU allocations; the caller's module is untouched.

    Why: the models arrive from different memory: a pipeline's UNet usually memory-mapped from safetensors (none
    of the toy's tensors 64-byte aligned), a slim UNet in allocations made while loading it. Timed as they arrived,
    the toy's slim UNet read x1.019 and x1.041 of its dense one in two processes (8 blocks of 30 rounds each, every
    block 'slower' in the second); as fresh copies of both, x0.995 and x0.997, no block slower
    (`scripts/bench_placement.py`, README "Speed"). The offset belonged to where the weights sat, not to the models,
    so both are timed from the same kind of memory, at the cost of a copy of each while the bench runs (a CUDA run
    copies them to the device anyway and skips this)."""
    import copy

    return copy.deepcopy(unet)


def bench_pair(dense: Any, slim: Any, opts: BenchOptions, label: str = "unet",
               onnx: dict[str, Path] | None = None, trt: dict[str, Path] | None = None,
               progress: Callable[[str], None] | None = None) -> BenchResult:
    """Time dense and slim interleaved under each runtime (same inputs); counts parameters and FLOPs of both.

    `dense`/`slim`: UNet modules or folders (`onnx_export.load_unet`: a slim-UNet folder, a diffusers UNet folder).
    `onnx` / `trt`: ready ONNX files / TensorRT engines per model name; missing ONNX files are exported here."""
    import torch

    from .onnx_export import load_unet

    say = progress or (lambda s: log.info("%s", s))
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("device cuda requested but torch sees no CUDA device")
    onnx, trt = onnx or {}, trt or {}
    models = {"dense": load_unet(dense).eval(), "slim": load_unet(slim).eval()}
    if opts.device == "cpu":
        models = {n: in_fresh_memory(m) for n, m in models.items()}
    h = opts.height or int(models["dense"].config.sample_size)
    opts = replace(opts, height=h, width=opts.width or h)
    shape = {"batch": opts.batch, "height": h, "width": opts.width, "seq_len": opts.seq_len}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    flops = {n: flops_at(m, opts) for n, m in models.items()}
    dtype = torch.float16 if opts.fp16 else torch.float32
    models = {n: m.to(opts.device, dtype) for n, m in models.items()}
    inputs = {n: torch_inputs(m, opts) for n, m in models.items()}
    timings: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="uniforget-bench-") as d:
        for rt in opts.runtimes:
            say(f"{rt}: dense and slim, interleaved")
            got = _runtime_pair(rt, models, inputs, opts, onnx, trt, Path(d), say)
            timings += got
            pair = BenchResult(label, opts, "", shape, params, flops, tuple(got)).estimate(rt)
            if pair is not None:
                say(f"{rt}: dense p50 {got[0].p50_ms:.2f} ms, slim p50 {got[1].p50_ms:.2f} ms, {pair.describe()}")
    return BenchResult(label, opts, device_name(opts.device), shape, params, flops, tuple(timings))


# ------------------------------------------------------------------------------------------------ output


def format_table(results: Sequence[BenchResult]) -> list[list[str]]:
    """Rows for a printed table: model, runtime, dense/slim p50 (p95), ratio [interval] verdict, FLOP ratio, setup."""

    def ms(p50: float | None, p95: float | None) -> str:
        return "-" if p50 is None else f"{p50:.2f} ({p95:.2f})"

    def r(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    table = []
    for res in results:
        for row in res.rows():
            setup = row["dense_setup_s"]
            ratio = "-" if row["latency_ratio"] is None else \
                f"{row['latency_ratio']:.3f} [{row['ratio_low']:.3f}, {row['ratio_high']:.3f}]"
            table.append([res.label, f"b{res.shape['batch']} {res.shape['height']}x{res.shape['width']}",
                          row["runtime"], ms(row["dense_p50_ms"], row["dense_p95_ms"]),
                          ms(row["slim_p50_ms"], row["slim_p95_ms"]), ratio, row["verdict"] or "-",
                          r(row["flop_ratio"]), r(row["dense_vs_eager"]), "-" if setup is None else f"{setup:.1f}",
                          row["status"] if row["status"] != "ok" else ""])
    return table


TABLE_HEADER = ["model", "shape", "runtime", "dense p50 (p95) ms", "slim p50 (p95) ms",
                "slim/dense latency [95% interval]", "verdict", "slim/dense FLOPs", "vs eager (dense)",
                "setup s (dense)", "note"]


def write_json(results: Sequence[BenchResult], path: str | os.PathLike) -> Path:
    """All results as one JSON file, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({"format": "uniforget.bench/2", "results": [r.to_json() for r in results]}, indent=2))
    tmp.replace(path)
    return path


__all__ = ["BenchOptions", "BenchResult", "RatioEstimate", "Timing", "bench_pair", "format_table", "interleaved",
           "plot", "ratio_estimate", "ratio_sentence", "time_calls", "write_json"]
