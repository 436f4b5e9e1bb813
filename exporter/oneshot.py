"""`uniforget-export`: one command from a Stable Diffusion checkpoint to de-memorized, parity-checked artifacts.

    model -> masks (file | shipped set for --beta | learned) -> plan at --ratio -> slim UNet (gate: slim == gated)
    -> ONNX (gate: ONNX Runtime == torch) -> ONNX pipeline (gate per component) -> TensorRT with --trt (gate:
    TensorRT == ONNX Runtime fp32) -> Triton repository -> validation (memorization before/after, quality, size,
    latency) -> report

Everything is written into a temporary sibling of `engines/<name>` and renamed into place only after every
requested stage passed its gate, so a directory at the output path is always a finished run. Any failure or
Ctrl-C removes the temporary sibling (in `finally`). Work that can be refused is refused before anything is
loaded: an existing output without `force`, `--trt` where TensorRT is missing, an unreadable masks file.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import ExportError, MissingDependencyError
from .publish import publish_dir
from .report import ReportData, StageRecord, write_report

log = logging.getLogger(__name__)

BETAS = ("weak", "medium", "strong")
TOY_MASKS_DIR = Path(__file__).resolve().parent.parent / "uniforget" / "toy" / "masks"
MODEL_MASKS_SUBDIR = "uniforget_masks"  # <model folder>/uniforget_masks/<beta>.safetensors


@dataclass(frozen=True)
class Tolerances:
    """Parity gates (ARCHITECTURE.md): slim == gated (fp32), ONNX Runtime == torch (fp32), TensorRT == ORT fp32."""

    slim_atol: float = 1e-5
    onnx_atol: float = 1e-4
    onnx_rtol: float = 0.0
    trt_atol: float = 5e-3
    trt_rtol: float = 1e-2


@dataclass(frozen=True)
class ValidationSize:
    """How much the validation generates. Defaults keep the toy's whole one-shot within ~10 min on 2 cores."""

    seeds: int = 8  # per memorized caption
    neutral_prompts: int | None = None  # evenly spaced subset of the held-out neutral prompts; None = all
    neutral_seeds: int = 1
    perturb_norms: tuple[float, ...] = (0.1,)  # random trigger-embedding perturbations (relative norm)
    optimized_norm: float | None = None  # optimized perturbation; None = off (slow: backprop through sampling)
    steps: int | None = None  # None: the model's own sampling defaults
    guidance: float | None = None  # None: the model's own sampling defaults
    batch_size: int = 16
    bench_runs: int = 20
    bench_batch: int = 2


@dataclass(frozen=True)
class ExportOptions:
    """Everything the one-shot needs; `uniforget-export`'s arguments map onto it one to one."""

    model: str = "toy"
    masks: Path | None = None
    beta: str = "medium"
    ratio: str | float = 0.05
    trt: bool = False
    fp16: bool = False
    out: Path | None = None  # default engines/<model>-<beta>-r<ratio>
    force: bool = False
    validate: bool = True
    tolerances: Tolerances = Tolerances()
    size: ValidationSize = ValidationSize()
    learn_steps: int = 300  # when no MaskSet is given or shipped
    eval_spec: Path | None = None  # dataset spec (toy format) with the memorized items; default: the toy's own
    eval_data: Any = field(default=None, compare=False, repr=False)  # a ready uniforget.evaluate.EvalData
    progress: bool = True
    command: str = "uniforget-export"


@dataclass(frozen=True)
class ExportResult:
    out: Path
    stages: tuple[StageRecord, ...]
    parity: dict[str, Any]
    plan: dict[str, Any]
    evaluation: dict[str, Any] | None
    bench: Any
    report: dict[str, Path]
    wall_seconds: float


class StageObserver(Protocol):
    """What the CLI shows: a line per stage, a bar where a stage knows its length."""

    def start(self, name: str, total: int | None = None) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def done(self, record: StageRecord) -> None: ...


class _Quiet:
    def start(self, name: str, total: int | None = None) -> None:
        log.info("%s ...", name)

    def advance(self, n: int = 1) -> None:
        pass

    def done(self, record: StageRecord) -> None:
        log.info("%s: %s (%.1f s)", record.name, record.summary, record.seconds)


@dataclass
class _Run:
    """Mutable state handed from stage to stage inside one run (never leaves this module)."""

    opts: ExportOptions
    tmp: Path
    obs: StageObserver
    pipe: Any = None
    dense: Any = None
    masks: Any = None
    masks_source: str = ""
    plan: Any = None
    slim: Any = None
    parity: dict[str, Any] = field(default_factory=dict)
    trt_dir: Path | None = None
    evaluation: dict[str, Any] | None = None
    bench: Any = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ preflight


def default_out(opts: ExportOptions) -> Path:
    name = "toy" if opts.model in ("toy", None) else Path(opts.model).name.removesuffix(".safetensors")
    src = Path(opts.masks).stem if opts.masks else opts.beta
    return Path("engines") / f"{name}-{src}-r{opts.ratio}"


def shipped_masks(model: str, beta: str) -> Path | None:
    """The MaskSet a model ships for `beta` (toy: uniforget/toy/masks/; a folder: uniforget_masks/), if any."""
    from uniforget.models import resolve_model_path

    path = resolve_model_path(model)
    folder = TOY_MASKS_DIR if model in ("toy", None) else Path(path) / MODEL_MASKS_SUBDIR
    f = folder / f"{beta}.safetensors"
    return f if f.is_file() else None


def preflight(opts: ExportOptions) -> Path:
    """Every refusal that needs no model loaded; returns the resolved output path."""
    from uniforget.models import resolve_model_path
    from uniforget.plan import parse_ratio

    out = Path(opts.out or default_out(opts))
    if out.exists() and not opts.force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose another --out")
    if opts.trt:
        from .tensorrt_build import INSTALL_HINT, tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise MissingDependencyError(f"--trt needs TensorRT, which is not importable here; install it: "
                                         f"{INSTALL_HINT} (or drop --trt)")
    elif opts.fp16:
        raise ExportError("--fp16 sets the TensorRT engine's precision (ONNX stays fp32 for the 1e-4 gate); "
                          "add --trt, or drop --fp16")
    parse_ratio(opts.ratio)
    if opts.masks is not None and not Path(opts.masks).is_file():
        raise ExportError(f"masks file not found: {opts.masks}")
    if opts.masks is None and opts.beta not in BETAS:
        raise ExportError(f"--beta must be one of {', '.join(BETAS)} (got {opts.beta!r})")
    model_path = resolve_model_path(opts.model)
    if not Path(model_path).exists():
        hint = (" (the embedded toy is not installed in this checkout: train it with scripts/train_toy.py)"
                if opts.model in ("toy", None) else "")
        raise ExportError(f"model not found: {model_path}{hint}")
    if opts.learn_steps < 1:
        raise ExportError(f"learn steps must be >= 1 (got {opts.learn_steps})")
    if out.parent.exists() and not os.access(out.parent, os.W_OK):
        raise ExportError(f"output folder {out.parent} is not writable")
    return out


# ------------------------------------------------------------------------------------------------ stages
# Each stage: (run) -> (one-line summary, gate dict or None). Looked up at call time by run_export.


def stage_load(run: _Run) -> tuple[str, dict | None]:
    from uniforget.models import load_pipeline

    run.pipe = load_pipeline(run.opts.model)
    run.dense = run.pipe.unet.eval()
    n = sum(p.numel() for p in run.dense.parameters())
    return f"{type(run.pipe).__name__}, UNet {n / 1e6:.2f} M parameters", None


def stage_masks(run: _Run) -> tuple[str, dict | None]:
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet

    opts = run.opts
    fp = model_fingerprint(run.dense)
    src = Path(opts.masks) if opts.masks else shipped_masks(opts.model, opts.beta)
    if src is not None:
        run.masks = MaskSet.load(src, expect_fingerprint=fp)
        run.masks_source = str(src)
        summary = f"loaded {src}"
    else:
        from uniforget.learn import LearnConfig, LearnRequest, parse_beta, run_learn

        cfg = LearnConfig(beta=parse_beta(opts.beta), steps=opts.learn_steps)
        run.obs.start("masks: learning", total=cfg.steps)
        req = LearnRequest(model=str(opts.model), out=run.tmp / "masks.learned.safetensors", config=cfg,
                           checkpoint_every=0, drift_prompts=0)
        res = run_learn(req, callback=lambda stats: run.obs.advance(1))
        run.masks = res.maskset
        run.masks_source = f"learned here (beta {opts.beta}, {cfg.steps} steps, {res.wall_s:.0f} s)"
        (run.tmp / "masks.learned.safetensors").unlink(missing_ok=True)
        summary = run.masks_source
    run.masks.save(run.tmp / "masks.safetensors")
    return summary, None


def stage_plan(run: _Run) -> tuple[str, dict | None]:
    from uniforget.plan import make_plan

    run.plan = make_plan(run.dense, run.masks, run.opts.ratio)
    run.plan.save(run.tmp / "plan.json")
    p = run.plan
    fr = f", FLOPs x{p.flop_ratio:.3f}" if p.flop_ratio is not None else ""
    return f"{p.ratio_achieved:.2%} of parameters removed ({p.params_before:,} -> {p.params_after:,}){fr}", None


def _parity_inputs(unet: Any) -> list[tuple[str, dict]]:
    from uniforget.geometries import example_inputs

    s = int(unet.config.sample_size)
    m = 2 ** (len(unet.config.block_out_channels) - 1)
    big = max(2 * s, m)
    return [(f"batch=1 {s}x{s}", example_inputs(unet, 1, s, s, seed=11)),
            (f"batch=2 {big}x{s}", example_inputs(unet, 2, big, s, seed=12))]


def stage_prune(run: _Run) -> tuple[str, dict | None]:
    from uniforget.errors import ParityError
    from uniforget.prune import check_parity, prune_unet
    from uniforget.slim_io import save_slim_unet

    tol = run.opts.tolerances.slim_atol
    run.slim = prune_unet(run.dense, run.plan).eval()
    results = [check_parity(run.dense, run.slim, run.plan, inp, atol=tol) for _, inp in _parity_inputs(run.dense)]
    worst = max(r.max_abs for r in results)
    gate = {"max_abs": worst, "max_rel": max(r.max_abs / max(r.max_ref, 1e-30) for r in results),
            "tolerance": f"atol {tol:g}", "passed": all(bool(r) for r in results)}
    run.parity["slim == gated (torch fp32)"] = gate
    if not gate["passed"]:
        raise ParityError(f"slim UNet differs from the gated UNet by max abs {worst:.3g} (tolerance {tol:g}); "
                          "nothing was written")
    save_slim_unet(run.slim, run.plan, run.tmp / "unet")
    return f"slim == gated: max abs {worst:.2e} (<= {tol:g}); saved unet/", gate


def stage_onnx(run: _Run) -> tuple[str, dict | None]:
    from .onnx_export import OnnxExportOptions, export_unet_validated
    from .parity import Tolerance

    t = run.opts.tolerances
    tol = Tolerance(atol=t.onnx_atol, rtol=t.onnx_rtol)
    res, report = export_unet_validated(run.slim, run.tmp / "onnx" / "unet.onnx", OnnxExportOptions(), tol)
    gate = {"max_abs": report.max_abs, "max_rel": report.max_rel, "tolerance": f"atol {t.onnx_atol:g} rtol "
            f"{t.onnx_rtol:g}", "passed": report.passed, "cases": len(report.cases)}
    run.parity["ONNX Runtime == slim torch (fp32)"] = gate
    return (f"onnx/unet.onnx {res.file_bytes / 1e6:.1f} MB, {res.nodes_folded} nodes; ORT max abs "
            f"{report.max_abs:.2e} over {len(report.cases)} shapes"), gate


def stage_pipeline(run: _Run) -> tuple[str, dict | None]:
    from .onnx_export import export_pipeline
    from .parity import Tolerance

    if run.slim.config.addition_embed_type is not None:
        run.notes.append("ONNX pipeline folder skipped: whole-pipeline export supports SD1.x/2.x-style UNets")
        return "skipped (SDXL-style UNet: the UNet ONNX is exported alone)", None
    t = run.opts.tolerances
    res = export_pipeline(run.pipe, run.tmp / "onnx" / "pipeline", unet=run.slim,
                          tol=Tolerance(atol=t.onnx_atol, rtol=t.onnx_rtol))
    worst = max(r.max_abs for r in res.parity.values())
    for name, rep in res.parity.items():
        run.parity[f"ONNX pipeline {name} == torch"] = {"max_abs": rep.max_abs, "max_rel": rep.max_rel,
                                                          "tolerance": f"atol {rep.tolerance.atol:g}",
                                                          "passed": rep.passed}
    return f"onnx/pipeline/ (text encoder, slim UNet, VAE decoder), worst max abs {worst:.2e}", None


def stage_tensorrt(run: _Run) -> tuple[str, dict | None]:
    from .tensorrt_build import BuildOptions, build_engine

    t = run.opts.tolerances
    res = build_engine(BuildOptions(onnx=run.tmp / "onnx" / "unet.onnx", out_dir=run.tmp / "trt",
                                    fp16=run.opts.fp16, rtol=t.trt_rtol, atol=t.trt_atol),
                       progress=lambda s: log.info("%s", s))
    run.trt_dir = run.tmp / "trt"
    worst = max((o.max_abs for o in res.parity.outputs), default=0.0) if res.parity else None
    gate = {"max_abs": worst, "max_rel": None, "tolerance": f"rtol {t.trt_rtol:g} atol {t.trt_atol:g}",
            "passed": bool(res.parity.passed) if res.parity else True}
    run.parity[f"TensorRT {'fp16' if run.opts.fp16 else 'fp32'} == ONNX Runtime fp32"] = gate
    return f"trt/unet.plan built in {res.seconds:.0f} s, parity max abs {worst:.2e}", gate


def stage_triton(run: _Run) -> tuple[str, dict | None]:
    from .triton_repo import TritonRepoOptions, write_repository

    pipeline = run.tmp / "onnx" / "pipeline"
    res = write_repository(TritonRepoOptions(
        out_dir=run.tmp / "triton", unet_onnx=run.tmp / "onnx" / "unet.onnx", trt_dir=run.trt_dir,
        pipeline_dir=pipeline if pipeline.is_dir() else None))
    return f"triton/ with {', '.join(res.models)} (configs checked against Triton's schema)", None


def _eval_data(run: _Run) -> Any:
    from uniforget.evaluate import EvalData, judge_beside
    from uniforget.models import resolve_model_path

    opts = run.opts
    if opts.eval_data is not None:
        return opts.eval_data
    if opts.model not in ("toy", None) and opts.eval_spec is None:
        return None
    return EvalData.from_toy(opts.eval_spec, judge_beside(Path(resolve_model_path(opts.model))))


def stage_validate(run: _Run) -> tuple[str, dict | None]:
    """Memorization and quality, original vs slim (torch pipeline, same prompts and seeds); then latency."""
    from uniforget.evaluate import EvalConfig, evaluate, sampling_defaults
    from uniforget.models import resolve_model_path

    from .bench import BenchOptions, bench_pair

    opts, size = run.opts, run.opts.size
    data = _eval_data(run)
    parts = []
    if data is None:
        run.notes.append("memorization not measured: no evaluation data for this model (give --eval-spec, a "
                         "dataset spec listing the memorized items and their captions)")
    else:
        cfg = EvalConfig(seeds=size.seeds, neutral_seeds=size.neutral_seeds, neutral_prompts=size.neutral_prompts,
                         steps=size.steps, guidance=size.guidance, batch_size=size.batch_size, perturb_norms=size.perturb_norms,
                         optimized_norm=size.optimized_norm, progress=opts.progress)
        model_dir = Path(resolve_model_path(opts.model))
        defaults = sampling_defaults(model_dir if model_dir.is_dir() else None)
        original = evaluate(run.pipe, data, cfg, label="original", defaults=defaults)
        dense = run.pipe.unet
        run.pipe.unet = run.slim
        try:
            slim = evaluate(run.pipe, data, cfg, reference=original, label="slim", defaults=defaults)
        finally:
            run.pipe.unet = dense
        from uniforget.evaluate import _subset

        idx = _subset(len(data.neutral_prompts), cfg.neutral_prompts)
        run.evaluation = {"config": asdict(cfg), "original": original, "slim": slim,
                          "memorized_captions": list(data.memorized_captions),
                          "neutral_prompts": [data.neutral_prompts[i] for i in idx]}
        parts.append(f"copy rate {original.memorized.copy_rate:.0%} -> {slim.memorized.copy_rate:.0%}")
        if slim.judge_accuracy is not None:
            parts.append(f"judge {original.judge_accuracy:.0%} -> {slim.judge_accuracy:.0%}")
    bopts = BenchOptions(runtimes=("eager", "onnxruntime") + (("tensorrt",) if run.trt_dir else ()),
                         batch=size.bench_batch, runs=size.bench_runs, seq_len=int(
                             getattr(getattr(run.pipe, "tokenizer", None), "model_max_length", 77) or 77))
    run.bench = bench_pair(run.dense, run.slim, bopts, label="UNet",
                           onnx={"slim": run.tmp / "onnx" / "unet.onnx"},
                           trt={"slim": run.trt_dir / "unet.plan"} if run.trt_dir else None)
    for rt in ("eager", "onnxruntime"):
        r = run.bench.ratio(rt)
        if r is not None:
            parts.append(f"{rt} slim/dense x{r:.2f}")
    return "; ".join(parts), None


# ------------------------------------------------------------------------------------------------ orchestration


def _environment() -> dict[str, str]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads())}
    for mod in ("diffusers", "onnxruntime", "onnx"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def run_export(opts: ExportOptions, observer: StageObserver | None = None) -> ExportResult:
    """Run every stage into a temporary sibling of the output; publish only when all gates passed."""
    t_start = time.perf_counter()
    out = preflight(opts).resolve()
    obs = observer or _Quiet()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    run = _Run(opts, tmp, obs)
    stages: list[tuple[str, Callable[[_Run], tuple[str, dict | None]]]] = [
        ("load model", stage_load), ("masks", stage_masks), ("plan", stage_plan), ("slim UNet", stage_prune),
        ("ONNX UNet", stage_onnx), ("ONNX pipeline", stage_pipeline)]
    if opts.trt:
        stages.append(("TensorRT", stage_tensorrt))
    stages.append(("Triton repository", stage_triton))
    if opts.validate:
        stages.append(("validation", stage_validate))
    records: list[StageRecord] = []
    try:
        for name, fn in stages:
            obs.start(name)
            t0 = time.perf_counter()
            summary, gate = fn(run)
            rec = StageRecord(name, time.perf_counter() - t0, summary, gate)
            records.append(rec)
            obs.done(rec)
        obs.start("report")
        t0 = time.perf_counter()
        from uniforget.plan import plan_dict_summary

        plan_summary = plan_dict_summary(run.plan)
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(
            _without_data(opts)).items()}
        options["masks_source"] = run.masks_source
        wall = time.perf_counter() - t_start
        data = ReportData(
            title=f"uniforget export: {opts.model} at ratio {opts.ratio}", command=opts.command, options=options,
            stages=tuple(records), plan=plan_summary, parity=run.parity, evaluation=run.evaluation,
            bench=run.bench, wall_seconds=wall, notes=tuple(run.notes), environment=_environment(),
            artifacts=_artifacts(tmp))
        written = write_report(data, tmp / "report")
        rec = StageRecord("report", time.perf_counter() - t0, "report/report.md, report.json, images, latency.png")
        records.append(rec)
        obs.done(rec)
        publish_dir(tmp, out)  # an old output is only there with --force
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out)
    return ExportResult(out, tuple(records), run.parity, plan_summary, run.evaluation, run.bench,
                        {k: out / Path(v).relative_to(tmp) for k, v in written.items()},
                        time.perf_counter() - t_start)


def _without_data(opts: ExportOptions) -> ExportOptions:
    from dataclasses import replace

    return replace(opts, eval_data=None)


def _artifacts(tmp: Path) -> dict[str, str]:
    """What the output holds, with sizes (the report written next is listed by name)."""
    desc = {"masks.safetensors": "MaskSet (gate logits)", "plan.json": "PruningPlan", "unet": "slim UNet (diffusers "
            "config + plan + safetensors)", "onnx/unet.onnx": "slim UNet ONNX (fp32, dynamic batch/size/sequence)",
            "onnx/pipeline": "ONNX pipeline: text encoder, slim UNet, VAE decoder (optimum layout)",
            "trt/unet.plan": "TensorRT engine (+ build.json)", "triton": "Triton model repository",
            "report": "this report"}
    out = {}
    for rel, what in desc.items():
        p = tmp / rel
        if rel == "report" or p.exists():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (
                p.stat().st_size if p.exists() else 0)
            out[rel] = what + (f", {size / 1e6:.1f} MB" if size else "")
    return out


def python_command(argv: list[str] | None = None) -> str:
    """The command line as typed (for the report)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["uniforget-export", *args])
