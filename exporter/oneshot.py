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
import math
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
from .publish import (
    check_can_create,
    check_eval_prompts_file,
    check_input_file,
    check_model,
    check_prompts_file,
    publish_dir,
)
from .report import ReportData, StageRecord, write_report

log = logging.getLogger(__name__)

BETAS = ("auto", "weak", "medium", "strong")  # names a model may ship MaskSets for; numbers are learned
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
    perturb_norms: tuple[float, ...] = ()  # random trigger-embedding perturbations (relative norm)
    optimized_norm: float | None = 0.1  # optimized perturbation (DoRI-style re-trigger check); None = off
    empty_seeds: int = 48  # empty-prompt generations (the global-mode check, uniforget.signature)
    controls: bool = True  # evaluate random-removal and shuffled-gates controls at matched drift (with eval data)
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
    beta: str = "auto"  # auto (calibrated on held-out neutral prompts) | weak | medium | strong | a number
    ratio: str | float = 0.05
    align: int = 8  # kept widths rounded up to a multiple of this (uniforget.plan; 1 = exact)
    # ONNX Runtime's transformer optimizer on the pipeline's UNet (exporter.onnx_optimize); off by default: on the
    # CPU provider it fused 249 of 2503 SD1.5 nodes for no measured gain (x1.009 [0.992, 1.021], README "Speed")
    ort_optimize: bool = False
    trt: bool = False
    fp16: bool = False
    out: Path | None = None  # default engines/<model>-<beta>-r<ratio>
    force: bool = False
    validate: bool = True
    tolerances: Tolerances = Tolerances()
    size: ValidationSize = ValidationSize()
    learn_steps: int = 300  # when no MaskSet is given or shipped
    retrain_steps: int = 0  # brief neutral retrain of the slim UNet after pruning (0 = off)
    tune_weights: float = 0.0  # > 0: learn the masks jointly with a fine-tuned copy of the weights (learn.py)
    prompts: Path | None = None  # neutral prompts to learn and retrain from; None = uniforget.prompts' default
    eval_spec: Path | None = None  # dataset spec (toy format) with the memorized items; default: the toy's own
    eval_prompts: Path | None = None  # any model: JSON of neutral prompts + suspect captions (EvalData.from_file)
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
    verdict: Any = None


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
    base: Any = None  # the UNet the masks gate: the original, or the copy tuned jointly with them
    masks: Any = None
    masks_source: str = ""
    controls: dict[str, Any] = field(default_factory=dict)  # control MaskSets at matched drift (name -> MaskSet)
    plan: Any = None
    slim: Any = None
    pruned: Any = None  # the slim UNet before the retrain (when there is one)
    eval_data: Any = field(default=None, repr=False)  # built once by _eval_data (the toy's renders 4,800 images)
    eval_data_built: bool = False
    parity: dict[str, Any] = field(default_factory=dict)
    trt_dir: Path | None = None
    evaluation: dict[str, Any] | None = None
    verdict: Any = None  # uniforget.verdict.Verdict, or a sentence where nothing could be measured
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


def _check_ratio(ratio: Any) -> None:
    """uniforget.plan.parse_ratio's rule without importing torch (preflight runs before any heavy import)."""
    if isinstance(ratio, str) and ratio.strip().lower() == "auto":
        return
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        r = math.nan
    if isinstance(ratio, bool) or not 0.0 <= r < 1.0:  # NaN fails both comparisons
        raise ExportError(f"--ratio must be 'auto' or a fraction of UNet parameters to remove in [0, 1), "
                          f"got {ratio!r}")


def _number_problems(opts: ExportOptions) -> list[str]:
    """Every out-of-range count, size and tolerance, named by its option (checked here, not after loading)."""
    s, t, bad = opts.size, opts.tolerances, []

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    for flag, v, least in (("--learn-steps", opts.learn_steps, 1), ("--seeds", s.seeds, 1),
                           ("--neutral-seeds", s.neutral_seeds, 1), ("--neutral-prompts", s.neutral_prompts, 1),
                           ("--steps", s.steps, 1), ("--bench-runs", s.bench_runs, 20),
                           ("batch size", s.batch_size, 1), ("bench batch", s.bench_batch, 1),
                           ("--empty-seeds", s.empty_seeds, 0)):
        if v is not None and v < least:
            bad.append(f"{flag} must be >= {least} (got {v})")
    if isinstance(opts.align, bool) or not isinstance(opts.align, int) or opts.align < 1:
        bad.append(f"--align must be a whole number >= 1 (1 = exact widths; got {opts.align!r})")
    if s.guidance is not None and not (finite(s.guidance) and s.guidance >= 0):
        bad.append(f"--guidance must be a finite number >= 0 (got {s.guidance})")
    if any(not (finite(n) and n >= 0) for n in s.perturb_norms):
        bad.append(f"--perturb norms must be finite and >= 0 (got {','.join(map(str, s.perturb_norms))})")
    if s.optimized_norm is not None and not (finite(s.optimized_norm) and s.optimized_norm > 0):
        bad.append(f"--optimized-perturbation must be a finite norm > 0 (got {s.optimized_norm})")
    for flag, v in (("--slim-atol", t.slim_atol), ("--onnx-atol", t.onnx_atol), ("onnx rtol", t.onnx_rtol),
                    ("--trt-atol", t.trt_atol), ("--trt-rtol", t.trt_rtol)):
        if not (finite(v) and v >= 0):
            bad.append(f"{flag} must be a finite number >= 0 (got {v})")
    return bad


def preflight(opts: ExportOptions) -> Path:
    """Every refusal that needs no model loaded; returns the resolved output path.

    Imports nothing heavy (no torch, diffusers or onnx), so the CLI runs it before anything else and a bad
    option is refused in well under a second.
    """

    out = Path(opts.out or default_out(opts))
    check_can_create(out, "--out", replace=opts.force, flag="--force")
    _check_ratio(opts.ratio)
    bad = _number_problems(opts)
    if bad:
        raise ExportError("; ".join(bad))
    if opts.trt:
        from .tensorrt_build import INSTALL_HINT, tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise MissingDependencyError(f"--trt needs TensorRT, which is not importable here; install it: "
                                         f"{INSTALL_HINT} (or drop --trt)")
    elif opts.fp16:
        raise ExportError("--fp16 sets the TensorRT engine's precision (ONNX stays fp32 for the 1e-4 gate); "
                          "add --trt, or drop --fp16")
    if opts.masks is None and opts.beta not in BETAS:
        try:
            b = float(opts.beta)
        except ValueError:
            b = math.nan
        if not (math.isfinite(b) and b >= 0):
            raise ExportError(f"--beta must be one of {', '.join(BETAS)} or a number >= 0 (got {opts.beta!r})")
    if opts.retrain_steps < 0:
        raise ExportError(f"--retrain-steps must be >= 0 (got {opts.retrain_steps})")
    if not (math.isfinite(opts.tune_weights) and opts.tune_weights >= 0):
        raise ExportError(f"--tune-weights must be a finite learning rate >= 0 (got {opts.tune_weights})")
    if opts.tune_weights > 0 and opts.masks is not None:
        raise ExportError("--tune-weights learns new masks; drop --masks (masks from `uniforget learn "
                          "--tune-weights` are found with their tuned UNet beside them)")
    if opts.masks is not None:
        check_input_file(opts.masks, "--masks", safetensors=True)
    check_model(opts.model)
    if opts.eval_spec is not None and not Path(opts.eval_spec).is_file():
        raise ExportError(f"--eval-spec file not found: {opts.eval_spec}")
    if opts.prompts is not None:
        check_prompts_file(opts.prompts)
    if opts.eval_prompts is not None:  # parsed and checked now, not after every stage before validation ran
        check_eval_prompts_file(opts.eval_prompts, "--eval-prompts")
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
    from uniforget.learn import tuned_unet_path_for
    from uniforget.masks import MaskSet

    opts = run.opts
    fp = model_fingerprint(run.dense)
    run.base = run.dense
    src = Path(opts.masks) if opts.masks else (shipped_masks(opts.model, opts.beta) if not opts.tune_weights
                                               else None)
    if src is not None:
        run.masks = MaskSet.load(src)
        run.base = _gated_unet(run.masks, src, run.dense, fp)
        run.masks_source = str(src) + ("" if run.base is run.dense else
                                       f" with its tuned UNet {tuned_unet_path_for(src)}")
        summary = _loaded_summary(src, run.masks.meta)
        run.masks_source += _close_call_clause(run.masks.meta)
        for name in ("random", "shuffled"):  # controls shipped beside the masks (uniforget learn --controls)
            c = src.with_name(src.name.removesuffix(".safetensors") + f".control-{name}.safetensors")
            if c.is_file():
                run.controls[name] = MaskSet.load(c, expect_fingerprint=fp)
    else:
        from uniforget.learn import LearnConfig, LearnRequest, control_path_for, parse_beta, run_learn

        cal = None
        if opts.beta == "auto":
            from uniforget.calibrate import CalibrationConfig

            cal = CalibrationConfig()
        cfg = LearnConfig(beta=cal.ladder[0] if cal else parse_beta(opts.beta), steps=opts.learn_steps,
                          weight_lr=opts.tune_weights)
        total = cfg.steps + (0 if cal is None else (len(cal.ladder) - 1) * max(1, cfg.steps // 2))
        run.obs.start("masks: learning" + (" (--beta auto ladder)" if cal else ""), total=total)
        out = run.tmp / "masks.learned.safetensors"
        want_controls = opts.validate and opts.size.controls and _eval_data(run) is not None
        req = LearnRequest(model=str(opts.model), out=out, config=cfg, checkpoint_every=0, prompts_file=opts.prompts,
                           drift_prompts=16 if want_controls else 0, controls=want_controls, calibration=cal,
                           write_unet=False)
        res = run_learn(req, callback=lambda stats: run.obs.advance(1))
        run.masks = res.maskset
        run.masks_source = _learned_source(res.maskset.meta, calibrated=cal is not None,
                                           tuned_lr=opts.tune_weights if res.unet is not None else None,
                                           wall_s=res.wall_s)
        if res.unet is not None:  # plan and prune the tuned copy; the original stays the reference everywhere else
            run.base = res.unet
        for name in ("random", "shuffled") if want_controls else ():
            run.controls[name] = MaskSet.load(control_path_for(out, name))
            control_path_for(out, name).unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        summary = run.masks_source
    run.masks.save(run.tmp / "masks.safetensors")
    return summary, None


def _close_call_clause(meta: dict) -> str:
    """"; close call: ..." when the MaskSet's `--beta auto` ladder recorded one (calibrate.close_call), else ""."""
    return f"; close call: {meta['calibration_close_call']}" if meta.get("calibration_close_call") else ""


def _loaded_summary(src: Path, meta: dict) -> str:
    """The masks line for a MaskSet file: its strength, and the close call its `--beta auto` ladder recorded."""
    return f"loaded {src} (beta {meta.get('beta', '?')}){_close_call_clause(meta)}"


def _learned_source(meta: dict, *, calibrated: bool, tuned_lr: float | None, wall_s: float) -> str:
    """One line saying how the one-shot's own masks were learned: the strength, the ladder behind it and whether
    its decision was a close call (--beta auto), the jointly tuned weights, and the time."""
    strength = f"beta {meta.get('beta')}"
    if calibrated:
        strength += (f" chosen by --beta auto from {meta.get('calibration_rungs')}"
                     f" (s.e. {meta.get('calibration_rungs_se')}){_close_call_clause(meta)}")
    tuned = [] if tuned_lr is None else [f"weights tuned jointly at lr {tuned_lr:g}"]
    return f"learned here ({', '.join([strength, *tuned, f'{wall_s:.0f} s'])})"


def _gated_unet(masks: Any, path: Path, dense: Any, fp: str) -> Any:
    """The UNet a MaskSet file gates: the original, or the tuned copy `uniforget learn --tune-weights` wrote beside
    it (`masks.unet/`) when the MaskSet names that copy instead; masks of any other model are refused."""
    from uniforget.learn import tuned_unet_path_for

    d = tuned_unet_path_for(path)
    if masks.model_fingerprint == fp or not (d / "config.json").is_file():
        masks.check_model(fp)
        return dense
    from diffusers import UNet2DConditionModel

    from uniforget.fingerprint import model_fingerprint

    tuned = UNet2DConditionModel.from_pretrained(d).eval().requires_grad_(False)
    masks.check_model(model_fingerprint(tuned))
    return tuned


def stage_plan(run: _Run) -> tuple[str, dict | None]:
    from uniforget.plan import make_plan

    run.plan = make_plan(run.base, run.masks, run.opts.ratio, align=run.opts.align)
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
    run.slim = prune_unet(run.base, run.plan).eval()
    results = [check_parity(run.base, run.slim, run.plan, inp, atol=tol) for _, inp in _parity_inputs(run.base)]
    worst = max(r.max_abs for r in results)
    gate = {"max_abs": worst, "max_rel": None, "reference_max_abs": max(r.max_ref for r in results),
            "tolerance": f"atol {tol:g}", "passed": all(bool(r) for r in results)}
    run.parity["slim == gated (torch fp32)"] = gate
    if not gate["passed"]:
        raise ParityError(f"slim UNet differs from the gated UNet by max abs {worst:.3g} (tolerance {tol:g}); "
                          "nothing was written")
    save_slim_unet(run.slim, run.plan, run.tmp / "unet")
    return f"slim == gated: max abs {worst:.2e} (<= {tol:g}); saved unet/", gate


def stage_retrain(run: _Run) -> tuple[str, dict | None]:
    """Brief neutral retrain of the slim UNet against the frozen original (uniforget.retrain). The slim == gated
    gate above holds for the pruned weights; the retrained ones start a new parity chain (ONNX Runtime next)."""
    import copy

    from uniforget.evaluate import model_guidance
    from uniforget.prompts import load_prompts
    from uniforget.retrain import RetrainConfig, retrain_unet
    from uniforget.sampler import encode_prompts
    from uniforget.slim_io import save_slim_unet

    opts = run.opts
    guidance = model_guidance(opts.model)
    cfg = RetrainConfig(steps=opts.retrain_steps, **({"guidance_scale": guidance} if guidance is not None else {}))
    prompts = load_prompts(opts.prompts, model=str(opts.model))
    cond = encode_prompts(run.pipe, prompts)
    run.pruned = copy.deepcopy(run.slim).eval()
    run.obs.start("retrain", total=cfg.steps)
    res = retrain_unet(run.slim, run.dense, run.pipe.scheduler, cond, cfg, callback=lambda s: run.obs.advance(1))
    run.slim = res.unet.eval()
    run.slim.requires_grad_(False)
    save_slim_unet(run.slim, run.plan, run.tmp / "unet", overwrite=True)
    first, last = (res.history[0].loss, res.history[-1].loss) if res.history else (float("nan"),) * 2
    return (f"{cfg.steps} steps on {len(prompts)} neutral prompts, {cfg.objective} loss {first:.3g} -> {last:.3g}; "
            "unet/ now holds the retrained weights"), None


def stage_onnx(run: _Run) -> tuple[str, dict | None]:
    from .onnx_export import OnnxExportOptions, export_unet_validated
    from .parity import Tolerance

    t = run.opts.tolerances
    tol = Tolerance(atol=t.onnx_atol, rtol=t.onnx_rtol)
    res, report = export_unet_validated(run.slim, run.tmp / "onnx" / "unet.onnx", OnnxExportOptions(), tol)
    gate = {"max_abs": report.max_abs, "max_rel": report.max_rel, "reference_max_abs": report.reference_max_abs,
            "tolerance": f"atol {t.onnx_atol:g} rtol "
            f"{t.onnx_rtol:g}", "passed": report.passed, "cases": len(report.cases)}
    run.parity["ONNX Runtime == slim torch (fp32)"] = gate
    return (f"onnx/unet.onnx {res.file_bytes / 1e6:.1f} MB, {res.nodes_folded} nodes; ORT max abs "
            f"{report.max_abs:.2e} over {len(report.cases)} shapes"), gate


def stage_pipeline(run: _Run) -> tuple[str, dict | None]:
    from .onnx_export import export_pipeline
    from .parity import Tolerance

    if run.slim.config.addition_embed_type is not None and getattr(run.pipe, "text_encoder_2", None) is None:
        run.notes.append("ONNX pipeline folder skipped: a UNet with added conditioning outside an SDXL pipeline")
        return "skipped (added-conditioning UNet without SDXL's second text encoder: the UNet ONNX is alone)", None
    t = run.opts.tolerances
    res = export_pipeline(run.pipe, run.tmp / "onnx" / "pipeline", unet=run.slim,
                          tol=Tolerance(atol=t.onnx_atol, rtol=t.onnx_rtol))
    worst = max(r.max_abs for r in res.parity.values())
    for name, rep in res.parity.items():
        run.parity[f"ONNX pipeline {name} == torch"] = {"max_abs": rep.max_abs, "max_rel": rep.max_rel,
                                                          "reference_max_abs": rep.reference_max_abs,
                                                          "tolerance": f"atol {rep.tolerance.atol:g}",
                                                          "passed": rep.passed}
    fused = ""
    if run.opts.ort_optimize:  # what ONNX Runtime loads (our pipeline, optimum, Triton); onnx/unet.onnx stays plain
        from .onnx_optimize import optimize_unet_validated

        path = run.tmp / "onnx" / "pipeline" / "unet" / "model.onnx"
        opt, rep = optimize_unet_validated(run.slim, path, path, Tolerance(atol=t.onnx_atol, rtol=t.onnx_rtol))
        run.parity["ONNX pipeline unet (ORT-optimized) == torch"] = {
            "max_abs": rep.max_abs, "max_rel": rep.max_rel, "reference_max_abs": rep.reference_max_abs,
            "tolerance": f"atol {rep.tolerance.atol:g}", "passed": rep.passed}
        worst = max(worst, rep.max_abs)
        fused = f"; UNet fused by ONNX Runtime's optimizer ({opt.summary()})"
    return f"onnx/pipeline/ (text encoder, slim UNet, VAE decoder), worst max abs {worst:.2e}{fused}", None


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
    if not res.schema_checked:  # base install: the configs are written, only Triton's schema check is skipped
        from .triton_repo import SCHEMA_SKIPPED

        run.notes.append(f"Triton repository: {SCHEMA_SKIPPED}")
        return f"triton/ with {', '.join(res.models)} (schema check skipped: tritonclient not installed)", None
    copied = f"; {res.external_data_bytes / 1e9:.2f} GB of ONNX external data copied in" if res.external_data_bytes else ""
    return f"triton/ with {', '.join(res.models)} (configs checked against Triton's schema{copied})", None


def _eval_data(run: _Run) -> Any:
    """The run's evaluation data, built on first use and kept (masks and validation both need it)."""
    if not run.eval_data_built:
        run.eval_data, run.eval_data_built = _build_eval_data(run), True
    return run.eval_data


def _build_eval_data(run: _Run) -> Any:
    from uniforget.evaluate import EvalData, judge_beside
    from uniforget.models import resolve_model_path

    opts = run.opts
    if opts.eval_data is not None:
        return opts.eval_data
    if opts.eval_prompts is not None:
        unet = run.pipe.unet
        size = int(unet.config.sample_size) * int(getattr(run.pipe, "vae_scale_factor", 8))
        return EvalData.from_file(opts.eval_prompts, size)
    if opts.model not in ("toy", None) and opts.eval_spec is None:
        return None
    return EvalData.from_toy(opts.eval_spec, judge_beside(Path(resolve_model_path(opts.model))))


def stage_validate(run: _Run) -> tuple[str, dict | None]:
    """Memorization and quality of the original, the slim model (before and after a retrain) and the controls at
    matched drift (torch pipeline, same prompts and seeds), the verdict; then latency."""
    from uniforget.evaluate import EvalConfig, _subset, evaluate, sampling_defaults
    from uniforget.models import resolve_model_path
    from uniforget.verdict import decide

    from .bench import BenchOptions, bench_pair

    opts, size = run.opts, run.opts.size
    data = _eval_data(run)
    parts = []
    if data is None:
        run.notes.append("memorization not measured: no evaluation data for this model (give --eval-prompts, a JSON "
                         "of neutral prompts and suspect captions with optional reference images, or --eval-spec)")
        run.verdict = ("Memorization not measured: this model came without evaluation data, so neither copies nor "
                       "the empty-prompt and Wen signatures could be checked; rerun with --eval-prompts FILE.")
    else:
        cfg = EvalConfig(seeds=size.seeds, neutral_seeds=size.neutral_seeds, neutral_prompts=size.neutral_prompts,
                         steps=size.steps, guidance=size.guidance, batch_size=size.batch_size,
                         perturb_norms=size.perturb_norms, optimized_norm=size.optimized_norm,
                         empty_seeds=size.empty_seeds, progress=opts.progress)
        light = EvalConfig(**{**cfg.__dict__, "perturb_norms": (), "optimized_norm": None, "empty_seeds": 0})
        model_dir = Path(resolve_model_path(opts.model))
        defaults = sampling_defaults(model_dir if model_dir.is_dir() else None)
        original = evaluate(run.pipe, data, cfg, label="original", defaults=defaults)
        dense = run.pipe.unet

        def with_unet(unet: Any, label: str) -> Any:
            run.pipe.unet = unet
            try:
                return evaluate(run.pipe, data, cfg, reference=original, label=label, defaults=defaults)
            finally:
                run.pipe.unet = dense

        slim = with_unet(run.pruned if run.pruned is not None else run.slim, "slim")
        retrained = with_unet(run.slim, "retrained") if run.pruned is not None else None
        controls = {name: evaluate(run.pipe, data, light, gates=ms, reference=original, label=f"control {name}",
                                   defaults=defaults) for name, ms in run.controls.items()} if size.controls else {}
        final = retrained or slim
        verdict = decide(original, final, controls, retrained=retrained is not None)
        run.verdict = verdict
        idx = _subset(len(data.neutral_prompts), cfg.neutral_prompts)
        run.evaluation = {"config": asdict(cfg), "original": original, "slim": slim, "retrained": retrained,
                          "controls": controls, "verdict": verdict,
                          "memorized_captions": list(data.memorized_captions),
                          "neutral_prompts": [data.neutral_prompts[i] for i in idx]}
        if retrained is None:
            run.evaluation.pop("retrained")
        if verdict.status == "not measured":  # no reference images: say what was and was not checked, no nan%
            wen = (f"Wen AUC {original.wen_auc:.2f} -> {final.wen_auc:.2f}" if original.wen_auc is not None
                   and final.wen_auc is not None and math.isfinite(original.wen_auc) else "no Wen AUC")
            parts.append(f"memorization not measured (no reference images: no copy rate, no empty-prompt check; "
                         f"{wen})")
        else:
            parts.append(f"{verdict.status}: copy rate {original.memorized.copy_rate:.0%} -> "
                         f"{final.memorized.copy_rate:.0%}")
        if final.judge_accuracy is not None:
            parts.append(f"judge {original.judge_accuracy:.0%} -> {final.judge_accuracy:.0%}")
    bopts = BenchOptions(runtimes=("eager", "onnxruntime") + (("tensorrt",) if run.trt_dir else ()),
                         batch=size.bench_batch, runs=size.bench_runs, seq_len=int(
                             getattr(getattr(run.pipe, "tokenizer", None), "model_max_length", 77) or 77))
    run.bench = bench_pair(run.dense, run.slim, bopts, label="UNet",
                           onnx={"slim": run.tmp / "onnx" / "unet.onnx"},
                           trt={"slim": run.trt_dir / "unet.plan"} if run.trt_dir else None)
    for rt in ("eager", "onnxruntime"):
        e = run.bench.estimate(rt)
        if e is not None:  # the verdict says "within noise" where the interval holds 1: no claim then
            parts.append(f"{rt} slim/dense {e.describe()}")
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
        ("load model", stage_load), ("masks", stage_masks), ("plan", stage_plan), ("slim UNet", stage_prune)]
    if opts.retrain_steps > 0:
        stages.append(("retrain", stage_retrain))
    stages += [("ONNX UNet", stage_onnx), ("ONNX pipeline", stage_pipeline)]
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
            verdict=run.verdict,
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
                        time.perf_counter() - t_start, run.verdict)


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
