"""One evaluation of a (possibly gated) pipeline: every memorization and quality number, as one frozen result.

Generations: each memorized caption x `seeds` seeds, each held-out neutral prompt x `neutral_seeds` seeds,
and, for the DoRI-style check, the memorized captions' embeddings perturbed at stated relative norms plus
one optimized perturbation. Numbers (definitions in memorization.py / wen.py / generate.py):
copy rate, nearest-neighbour identity, SSIM to the planted image, judge accuracy on neutral prompts,
neutral copies, Wen noise-norm AUC (memorized vs neutral prompts), perturbed-embedding copy rates, and,
against a reference evaluation on the same prompts and seeds, output drift and selectivity.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MaskSetError, UniforgetError
from .eval_prompts import read_eval_prompts
from .generate import Gates, encode_prompts, generate, optimize_embeddings, perturb_embeddings
from .memorization import COPY_RATIO, detect_copies, output_drift, roc_auc, ssim
from .signature import THRESHOLDS, EmptyPromptCheck, Signature, empty_prompt_check, read_signature
from .wen import NoiseNormRecorder, per_prompt

log = logging.getLogger(__name__)

JudgeFn = Callable[[np.ndarray], tuple[list[str], list[str]]]
TOY_SETTINGS_FILE = "uniforget_toy.json"  # sampling defaults written beside a toy pipeline by train_toy.py


@dataclass(frozen=True, eq=False)
class EvalData:
    """Prompts, reference images and (optionally) a judge: everything an evaluation compares against."""

    neutral_prompts: tuple[str, ...]
    memorized_captions: tuple[str, ...]
    memorized_item: tuple[int, ...]  # planted item index per caption
    item_names: tuple[str, ...]
    item_images: np.ndarray  # (K, H, W, 3) planted references in [0, 1]
    train_images: np.ndarray  # (R, H, W, 3) distinct training images (the copy-detection reference set)
    train_item: np.ndarray  # (R,) planted item index, -1 for neutral
    neutral_shapes: tuple[str, ...] | None = None  # judge labels per neutral prompt
    neutral_colours: tuple[str, ...] | None = None
    judge: JudgeFn | None = None

    @property
    def has_references(self) -> bool:
        """Reference images exist (copy detection and the empty-prompt check can run); else Wen's score only."""
        return len(self.train_images) >= 2 and len(self.item_images) > 0

    def __post_init__(self) -> None:
        if len(self.memorized_captions) != len(self.memorized_item):
            raise UniforgetError("eval data: one planted item index per memorized caption is required")
        if len(self.train_images) != len(self.train_item):
            raise UniforgetError("eval data: one item index per training image is required")
        if self.neutral_shapes is not None and len(self.neutral_shapes) != len(self.neutral_prompts):
            raise UniforgetError("eval data: one shape label per neutral prompt is required")

    @classmethod
    def from_toy(cls, spec_path: str | Path | None = None, judge_dir: str | Path | None = None,
                 prompts_path: str | Path | None = None) -> EvalData:
        """The toy testbed's evaluation data: held-out neutral prompts, planted captions, training set, judge."""
        from .toy import data as toy

        try:
            spec = toy.load_spec(spec_path)
        except (OSError, KeyError, ValueError) as e:
            raise UniforgetError(f"cannot read toy dataset spec {spec_path or toy.SPEC_PATH}: {e}") from e
        prompts_path = Path(prompts_path) if prompts_path else Path(spec_path or toy.SPEC_PATH).with_name(
            "prompts_eval.json")
        if prompts_path.is_file():
            raw = json.loads(prompts_path.read_text())
            neutral = raw["neutral"]
            names = [m.name for m in spec.memorized]
            mem = [(m["caption"], names.index(m["item"])) for m in raw["memorized"]]
        else:
            neutral = toy.eval_prompts(spec)
            mem = [(m.caption, i) for i, m in enumerate(spec.memorized)]
        images, index = toy.training_images(spec)
        judge = None
        try:
            from .toy.judge import load_judge

            judge = load_judge(judge_dir).predict
        except (ImportError, OSError, KeyError, RuntimeError) as e:
            log.warning("toy judge unavailable (%s): judge accuracy will not be reported", e)
        return cls(
            neutral_prompts=tuple(n["prompt"] for n in neutral),
            memorized_captions=tuple(c for c, _ in mem), memorized_item=tuple(i for _, i in mem),
            item_names=tuple(m.name for m in spec.memorized),
            item_images=np.stack([m.image for m in spec.memorized]).astype(np.float32),
            train_images=images, train_item=index,
            neutral_shapes=tuple(n["shape"] for n in neutral), neutral_colours=tuple(n["colour"] for n in neutral),
            judge=judge,
        )


    @classmethod
    def from_file(cls, path: str | Path, size: int) -> EvalData:
        """Evaluation data for any model (a user's checkpoint): a JSON file of neutral prompts and suspect captions,
        each with an optional reference image, plus an optional folder of further (neutral) training images
        (format and checks: uniforget.eval_prompts). Images are resized to `size` (the model's output
        resolution). Without any reference image only Wen's noise norm can be measured (copy detection and the
        empty-prompt check need references)."""
        from PIL import Image

        spec = read_eval_prompts(path)

        def load(p: Path) -> np.ndarray:
            try:
                img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
            except OSError as e:
                raise UniforgetError(f"{spec.path}: cannot read reference image {p}: {e}") from e
            return np.asarray(img, np.float32) / 255.0

        mem = spec.memorized
        items = np.stack([load(m.image) for m in mem]) if spec.has_images else np.zeros((0, size, size, 3), np.float32)
        extra = [load(f) for f in spec.references]
        train = np.concatenate([np.stack(extra), items]) if extra else items
        index = np.concatenate([np.full(len(extra), -1), np.arange(len(items))]).astype(np.int64)
        return cls(neutral_prompts=spec.neutral, memorized_captions=tuple(m.caption for m in mem),
                   memorized_item=tuple(range(len(mem))), item_names=tuple(m.name for m in mem),
                   item_images=items, train_images=train.astype(np.float32), train_item=index)


@dataclass(frozen=True)
class EvalConfig:
    """What to generate. `steps` / `guidance` None: the model's own defaults (toy: uniforget_toy.json)."""

    seeds: int = 8  # per memorized caption (seeds 0..seeds-1)
    neutral_seeds: int = 1  # per neutral prompt
    neutral_prompts: int | None = None  # evenly spaced subset of the held-out prompts; None = all
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 16
    perturb_norms: tuple[float, ...] = (0.05, 0.1, 0.2)  # relative per-token norm of random perturbations
    optimized_norm: float | None = 0.1  # relative norm ball of the optimized perturbation; None = skip
    optimized_iters: int = 8
    copy_threshold: float = COPY_RATIO
    empty_seeds: int = 48  # empty-prompt generations for the global-mode check (signature.py); 0 = skip
    progress: bool = False

    def __post_init__(self) -> None:
        if self.empty_seeds < 0:
            raise UniforgetError("empty-prompt seeds must be >= 0")
        if self.seeds < 1 or self.neutral_seeds < 1:
            raise UniforgetError("seeds and neutral seeds must be >= 1")
        if self.neutral_prompts is not None and self.neutral_prompts < 1:
            raise UniforgetError("neutral prompt count must be >= 1")
        if any(r < 0 for r in self.perturb_norms):
            raise UniforgetError("perturbation norms must be >= 0")


@dataclass(frozen=True)
class CopyStats:
    """Copy-detection summary of one set of memorized-caption generations."""

    copy_rate: float
    nn_identity: float
    ssim: float


@dataclass(frozen=True)
class Evaluation:
    """Every number of one evaluation; the images stay attached (not serialized) for drift comparisons."""

    label: str
    steps: int
    guidance: float
    n_memorized: int  # generations
    n_neutral: int
    memorized: CopyStats
    per_item: dict[str, CopyStats]
    neutral_copy_rate: float  # neutral generations that copy any planted item
    judge_accuracy: float | None  # shape and colour both right
    judge_shape_accuracy: float | None
    judge_colour_accuracy: float | None
    wen_auc: float | None  # memorized captions (positive) vs neutral prompts
    wen_memorized: float | None  # mean per-prompt score
    wen_neutral: float | None
    perturbed: dict[str, CopyStats]  # "random@0.1", "optimized@0.1"
    empty_prompt: EmptyPromptCheck | None  # None: not checked (empty_seeds 0)
    signature: Signature  # what kind of memorization these numbers show (signature.py)
    drift_neutral: float | None = None  # vs the reference evaluation
    drift_memorized: float | None = None
    selectivity: float | None = None  # drift_memorized / drift_neutral
    seconds_per_image: float = float("nan")
    neutral_images: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    memorized_images: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("neutral_images")
        d.pop("memorized_images")
        return _clean(d)


def _clean(x: Any) -> Any:
    """NaN -> None and NumPy scalars -> Python, so the JSON is strict."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


DEFINITIONS = {
    "copy_rate": "share of memorized-caption generations whose nearest training image (pixel l2, planted copies "
                 "grouped) is the caption's planted item and l2(x,NN1)/l2(x,NN2) < threshold (Gu et al. 2023)",
    "nn_identity": "share of memorized-caption generations whose nearest training image is the planted item",
    "ssim": "mean SSIM to the planted image (Gaussian window 11, sigma 1.5, data range 1)",
    "neutral_copy_rate": "share of neutral-prompt generations that pass the ratio test against any planted item",
    "judge_accuracy": "share of neutral-prompt generations whose judged shape and colour both match the prompt",
    "wen_auc": "ROC AUC of Wen et al.'s text-conditional noise norm (mean over steps of ||eps(x_t,c)-eps(x_t,'')||, "
               "mean over seeds), memorized captions vs neutral prompts",
    "perturbed": "copy statistics with the memorized captions' text embeddings perturbed: random Gaussian per token "
                 "at the stated norm relative to each token's norm, or optimized (projected gradient descent on the "
                 "denoising loss of the planted latent within that norm ball)",
    "drift": "mean over images of per-image RMS pixel difference ([0,1] pixels) to the reference model, same "
             "prompts and seeds",
    "selectivity": "drift on memorized captions / drift on neutral prompts",
    "empty_prompt": "generations for the empty prompt (one per seed, seeds 0..n-1): nearest_planted = share whose "
                    "nearest training image is a planted item, copies = share passing the ratio test against one",
    "signature": "one-line reading of the kind of memorization (uniforget/signature.py): global-mode when the empty "
                 "prompt is not clean, prompt-triggered when the captions copy and the empty prompt is clean; "
                 f"thresholds {THRESHOLDS}",
}


def sampling_defaults(model_dir: str | Path | None) -> dict[str, Any]:
    """Sampling defaults a toy pipeline folder ships (steps, guidance); {} when there are none."""
    if model_dir is None:
        return {}
    f = Path(model_dir) / TOY_SETTINGS_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UniforgetError(f"{f} is not valid JSON: {e}") from e


def model_guidance(model: Any, explicit: float | None = None) -> float | None:
    """The guidance scale to learn or retrain with: an explicit value, else the model folder's own sampling
    default (uniforget_toy.json), else None (the caller's own default)."""
    if explicit is not None:
        return float(explicit)
    from .models import resolve_model_path

    path = resolve_model_path(model)
    guidance = sampling_defaults(path if Path(path).is_dir() else None).get("guidance_scale")
    if guidance is not None:
        log.info("guidance scale %.3g from the model's sampling defaults", float(guidance))
        return float(guidance)
    return None


def _subset(n: int, k: int | None) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / max(k - 1, 1))) for i in range(k)})


def judge_accuracy(data: EvalData, images: np.ndarray, prompt_idx: Sequence[int], n_seeds: int
                   ) -> tuple[float | None, float | None, float | None]:
    """(both right, shape right, colour right) shares of neutral generations, laid out prompt-major with
    `n_seeds` images per prompt of `data.neutral_prompts[prompt_idx]`; Nones without a judge or labels."""
    if data.judge is None or data.neutral_shapes is None:
        return None, None, None
    shapes, colours = data.judge(images)
    want_s = np.repeat([data.neutral_shapes[i] for i in prompt_idx], n_seeds)
    want_c = np.repeat([data.neutral_colours[i] for i in prompt_idx], n_seeds)
    ok_s, ok_c = np.asarray(shapes) == want_s, np.asarray(colours) == want_c
    return float(np.mean(ok_s & ok_c)), float(np.mean(ok_s)), float(np.mean(ok_c))


def _copy_stats(images: np.ndarray, data: EvalData, expected: np.ndarray, threshold: float) -> CopyStats:
    res = detect_copies(images, data.train_images, data.train_item, expected, threshold)
    s = ssim(images, data.item_images[expected]) if len(images) else np.zeros(0)
    return CopyStats(res.copy_rate, res.nn_identity, float(np.mean(s)))


def evaluate(pipe: Any, data: EvalData, cfg: EvalConfig = EvalConfig(), gates: Gates = None,
             reference: Evaluation | None = None, label: str = "model",
             defaults: dict[str, Any] | None = None) -> Evaluation:
    """Generate and measure everything once. Give `reference` (an evaluation of the original model with the
    same config) to get drift and selectivity."""
    defaults = defaults or {}
    steps = int(cfg.steps or defaults.get("num_inference_steps", 20))
    guidance = float(cfg.guidance if cfg.guidance is not None else defaults.get("guidance_scale", 5.0))
    size = {k: defaults[k] for k in ("height", "width") if k in defaults}
    seeds = list(range(cfg.seeds))
    nseeds = list(range(cfg.neutral_seeds))
    gen = dict(steps=steps, guidance=guidance, gates=gates, batch_size=cfg.batch_size, progress=cfg.progress, **size)
    use_wen = guidance > 1.0
    if not use_wen:
        log.warning("guidance %.2f <= 1: no classifier-free guidance pass, Wen's noise norm is skipped", guidance)

    expected = np.repeat(np.asarray(data.memorized_item, np.int64), len(seeds))
    with NoiseNormRecorder(pipe.unet) as rec:
        t0 = time.perf_counter()
        mem_images = generate(pipe, data.memorized_captions, seeds, label=f"{label}: memorized captions",
                              observer=rec if use_wen else None, **gen)
        sec_per_image = (time.perf_counter() - t0) / len(mem_images)
        wen_mem = per_prompt(rec.norms, len(seeds)) if use_wen else None
    has_refs = data.has_references
    if has_refs and mem_images.shape[1:] != data.train_images.shape[1:]:
        raise UniforgetError(f"generations are {mem_images.shape[1:]} but the reference training images are "
                             f"{data.train_images.shape[1:]}: evaluate at the training resolution, or give "
                             "reference images (dataset spec) that match this model")
    nan = float("nan")
    memorized = _copy_stats(mem_images, data, expected, cfg.copy_threshold) if has_refs else CopyStats(nan, nan, nan)
    per_item: dict[str, CopyStats] = {}
    for k, name in enumerate(data.item_names if has_refs else ()):
        sel = expected == k
        if sel.any():
            per_item[name] = _copy_stats(mem_images[sel], data, expected[sel], cfg.copy_threshold)

    idx = _subset(len(data.neutral_prompts), cfg.neutral_prompts)
    prompts = [data.neutral_prompts[i] for i in idx]
    with NoiseNormRecorder(pipe.unet) as rec:
        neu_images = generate(pipe, prompts, nseeds, label=f"{label}: neutral prompts",
                              observer=rec if use_wen else None, **gen)
        wen_neu = per_prompt(rec.norms, len(nseeds)) if use_wen else None
    neutral_copy_rate = (detect_copies(neu_images, data.train_images, data.train_item, -1, cfg.copy_threshold)
                         .any_item_copy_rate if has_refs else nan)

    judge_acc, shape_acc, colour_acc = judge_accuracy(data, neu_images, idx, len(nseeds))

    perturbed: dict[str, CopyStats] = {}
    if has_refs and (cfg.perturb_norms or cfg.optimized_norm is not None):
        cond = encode_prompts(pipe, data.memorized_captions)
        for j, r in enumerate(cfg.perturb_norms):
            pcond = perturb_embeddings(cond, r, seed=1000 + j)
            imgs = generate(pipe, None, seeds, prompt_embeds=pcond, label=f"{label}: random perturbation {r:g}", **gen)
            perturbed[f"random@{r:g}"] = _copy_stats(imgs, data, expected, cfg.copy_threshold)
        if cfg.optimized_norm is not None:
            targets = data.item_images[np.asarray(data.memorized_item)]
            ocond = optimize_embeddings(pipe, cond, targets, cfg.optimized_norm, cfg.optimized_iters, gates=gates)
            imgs = generate(pipe, None, seeds, prompt_embeds=ocond,
                            label=f"{label}: optimized perturbation {cfg.optimized_norm:g}", **gen)
            perturbed[f"optimized@{cfg.optimized_norm:g}"] = _copy_stats(imgs, data, expected, cfg.copy_threshold)

    empty = None
    if cfg.empty_seeds and has_refs:
        imgs = generate(pipe, [""], list(range(cfg.empty_seeds)), label=f"{label}: empty prompt", **gen)
        empty = empty_prompt_check(imgs, data.train_images, data.train_item, data.item_names, cfg.copy_threshold)
    wen_auc = roc_auc(wen_mem, wen_neu) if use_wen else None

    drift_n = drift_m = sel = None
    if reference is not None:
        if reference.neutral_images.shape != neu_images.shape or reference.memorized_images.shape != mem_images.shape:
            raise UniforgetError("reference evaluation used other prompts or seeds; drift needs the same config")
        drift_n = output_drift(reference.neutral_images, neu_images)
        drift_m = output_drift(reference.memorized_images, mem_images)
        sel = drift_m / drift_n if drift_n > 0 else None

    return Evaluation(
        label=label, steps=steps, guidance=guidance, n_memorized=len(mem_images), n_neutral=len(neu_images),
        memorized=memorized, per_item=per_item, neutral_copy_rate=neutral_copy_rate,
        judge_accuracy=judge_acc, judge_shape_accuracy=shape_acc, judge_colour_accuracy=colour_acc,
        wen_auc=wen_auc,
        wen_memorized=float(np.mean(wen_mem)) if use_wen else None,
        wen_neutral=float(np.mean(wen_neu)) if use_wen else None,
        perturbed=perturbed, empty_prompt=empty,
        signature=read_signature(memorized.copy_rate if has_refs else None,
                                 memorized.nn_identity if has_refs else None, empty, wen_auc),
        drift_neutral=drift_n, drift_memorized=drift_m, selectivity=sel,
        seconds_per_image=sec_per_image, neutral_images=neu_images, memorized_images=mem_images,
    )


# ---------------------------------------------------------------------------------------------- validate


@dataclass(frozen=True)
class ValidateOptions:
    """`uniforget validate`: which model, which masks, what to generate, where to write JSON."""

    model: str = "toy"
    masks: str | None = None
    slims: tuple[str, ...] = ()  # slim UNet folders (prune / retrain output) to evaluate against the original
    spec: str | None = None  # toy dataset spec; None = the shipped one
    prompts: str | None = None  # evaluation prompts file for any model (EvalData.from_file); overrides spec
    judge: str | None = None  # judge folder; None = beside the model (train_toy.py output) or the shipped one
    config: EvalConfig = EvalConfig()
    json_path: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class ValidateReport:
    model: str
    masks: str | None
    config: EvalConfig
    evaluations: tuple[Evaluation, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"format": "uniforget.validate/1", "model": self.model, "masks": self.masks,
                "config": _clean(asdict(self.config)),
                "evaluations": {e.label: e.to_json() for e in self.evaluations},
                "definitions": DEFINITIONS, "seconds": self.seconds}


def judge_beside(model_dir: Any) -> str | None:
    """A judge folder (`judge/judge.json`) beside a model folder, as a training run may leave it; else None."""
    if isinstance(model_dir, Path) and (model_dir.parent / "judge" / "judge.json").is_file():
        return str(model_dir.parent / "judge")
    return None


def validate(opts: ValidateOptions) -> ValidateReport:
    """Load the model (and masks, slim UNets), evaluate it: the original first, then gated and each slim UNet
    against it (same seeds, so drift and selectivity compare like with like)."""
    from .fingerprint import model_fingerprint
    from .models import load_pipeline, resolve_model_path
    from .slim_io import PLAN_NAME, load_slim_unet

    t0 = time.perf_counter()
    for s in opts.slims:  # before the heavy work: a wrong folder is one clear line
        if not (Path(s) / PLAN_NAME).is_file():
            raise UniforgetError(f"--slim {s}: not a slim UNet folder (no {PLAN_NAME}); write one with "
                                 "`uniforget prune` or `uniforget retrain`")
    pipe = load_pipeline(opts.model, allow_pickle=opts.allow_pickle)
    model_dir = resolve_model_path(opts.model)
    masks = None
    if opts.masks:
        from .masks import MaskSet

        fp = model_fingerprint(pipe.unet)
        masks = MaskSet.load(opts.masks)
        if "teacher_fingerprint" in masks.meta and masks.model_fingerprint != fp:
            raise MaskSetError(f"{opts.masks} gates the copy of the weights its run tuned (learn --tune-weights), "
                               "not this model: prune that copy (uniforget prune --unet ... --masks ...) and pass "
                               "the slim folder with --slim")
        masks.check_model(fp)
    judge_dir = opts.judge if opts.judge is not None else judge_beside(model_dir)
    if opts.prompts:
        size = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
        data = EvalData.from_file(opts.prompts, size)
    else:
        data = EvalData.from_toy(opts.spec, judge_dir)
    defaults = sampling_defaults(model_dir if isinstance(model_dir, Path) and model_dir.is_dir() else None)
    evals = [evaluate(pipe, data, opts.config, label="original", defaults=defaults)]
    if masks is not None:
        evals.append(evaluate(pipe, data, opts.config, gates=masks, reference=evals[0], label="masked",
                              defaults=defaults))
    dense = pipe.unet
    for s in opts.slims:
        pipe.unet = load_slim_unet(s).eval()
        try:
            evals.append(evaluate(pipe, data, opts.config, reference=evals[0], label=Path(s).name,
                                  defaults=defaults))
        finally:
            pipe.unet = dense
    report = ValidateReport(str(opts.model), opts.masks, opts.config, tuple(evals), time.perf_counter() - t0)
    if opts.json_path:
        write_json(report.to_json(), opts.json_path)
    return report


def write_json(obj: dict[str, Any], path: str | Path) -> Path:
    """Write JSON atomically (temp file, then rename), so a half-written report never looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
    return path


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def table_rows(evals: Sequence[Evaluation]) -> list[tuple[str, list[str]]]:
    """(measure, one cell per evaluation): what `uniforget validate` prints."""
    rows: list[tuple[str, list[str]]] = [
        ("memorized copy rate", [_fmt(e.memorized.copy_rate) for e in evals]),
        ("NN1 = planted item", [_fmt(e.memorized.nn_identity) for e in evals]),
        ("SSIM to planted", [_fmt(e.memorized.ssim, False) for e in evals]),
        ("neutral judge accuracy", [_fmt(e.judge_accuracy) for e in evals]),
        ("  shape / colour", [f"{_fmt(e.judge_shape_accuracy)} / {_fmt(e.judge_colour_accuracy)}" for e in evals]),
        ("neutral copies", [_fmt(e.neutral_copy_rate) for e in evals]),
        ("Wen noise-norm AUC", [_fmt(e.wen_auc, False) for e in evals]),
        ("  Wen mean mem / neutral", [f"{_fmt(e.wen_memorized, False)} / {_fmt(e.wen_neutral, False)}" for e in evals]),
        ("  Wen direction", [e.signature.wen_direction for e in evals]),
        ("empty prompt: nearest planted / copies", [
            "-" if e.empty_prompt is None else
            f"{_fmt(e.empty_prompt.nearest_planted)} / {_fmt(e.empty_prompt.copies)} (n={e.empty_prompt.n})"
            for e in evals]),
        ("memorization kind", [e.signature.kind for e in evals]),
    ]
    for key in evals[0].perturbed:
        rows.append((f"copy rate, {key}", [_fmt(e.perturbed[key].copy_rate) if key in e.perturbed else "-"
                                           for e in evals]))
    if any(e.drift_neutral is not None for e in evals):
        rows += [
            ("drift neutral (RMS)", [_fmt(e.drift_neutral, False) for e in evals]),
            ("drift memorized (RMS)", [_fmt(e.drift_memorized, False) for e in evals]),
            ("selectivity", [_fmt(e.selectivity, False) for e in evals]),
        ]
    rows += [
        ("generations (mem / neutral)", [f"{e.n_memorized} / {e.n_neutral}" for e in evals]),
        ("seconds per image", [f"{e.seconds_per_image:.3f}" for e in evals]),
        ("sampler steps / guidance", [f"{e.steps} / {e.guidance:g}" for e in evals]),
    ]
    return rows
