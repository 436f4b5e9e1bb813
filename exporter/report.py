"""The one-shot's report: `report.json` with every number, `report.md` a person can skim, images and a chart.

Why a module of its own: the numbers are produced by many stages (parity gates, plan, evaluation, benchmark);
the report only arranges them. Images: before/after grids of the memorized captions and of the neutral
prompts, same prompts and seeds on both sides (rows = prompts, columns = seeds), so a reader sees at a glance
that the planted copies are gone and the neutral scenes are not. Drawing lives in `figures` (shared with bench).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .figures import latency_chart, save_figure

log = logging.getLogger(__name__)

FORMAT = "uniforget.export_report/1"


@dataclass(frozen=True)
class StageRecord:
    """One stage of the one-shot: what it did, how long, and the gate it passed (if it has one)."""

    name: str
    seconds: float
    summary: str
    gate: dict[str, Any] | None = None  # {"max_abs": .., "atol": .., "passed": ..}


@dataclass(frozen=True, eq=False)
class ReportData:
    """Everything report.md / report.json show. Evaluations keep their images for the grids."""

    title: str
    command: str
    options: dict[str, Any]
    stages: tuple[StageRecord, ...]
    plan: dict[str, Any]  # uniforget.plan.plan_dict_summary
    parity: dict[str, Any]  # per gate: max_abs, reference_max_abs, max_rel, tolerance, passed
    # {"config": .., "original": Evaluation, "slim": Evaluation, "retrained": Evaluation (optional),
    #  "controls": {"random": Evaluation, "shuffled": Evaluation} (optional), "verdict": Verdict}
    evaluation: dict[str, Any] | None = None
    verdict: Any = None  # uniforget.verdict.Verdict, or a plain sentence where nothing could be measured
    bench: Any = None  # exporter.bench.BenchResult
    artifacts: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    notes: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _jsonable(v: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    if hasattr(v, "to_json"):
        return v.to_json()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if is_dataclass(v) and not isinstance(v, type):
        return asdict(v)
    return v


def _verdict_sentence(v: Any) -> str | None:
    return None if v is None else (v if isinstance(v, str) else v.sentence)


def to_json(data: ReportData) -> dict[str, Any]:
    """The machine-readable report: every number the markdown shows, plus the per-stage records."""
    ev = None
    if data.evaluation is not None:
        ev = {k: _jsonable(v) for k, v in data.evaluation.items()}
    return _clean({
        "format": FORMAT, "title": data.title, "command": data.command, "options": data.options,
        "wall_seconds": data.wall_seconds,
        "stages": [{"name": s.name, "seconds": s.seconds, "summary": s.summary, "gate": s.gate} for s in data.stages],
        "verdict": _jsonable(data.verdict) if data.verdict is not None else None,
        "parity": data.parity, "plan": data.plan, "evaluation": ev,
        "latency": data.bench.to_json() if data.bench is not None else None,
        "artifacts": data.artifacts, "notes": list(data.notes), "environment": data.environment,
    })


# ------------------------------------------------------------------------------------------------ images


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(images: np.ndarray, n_rows: int, n_cols: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """(n_rows * n_cols, H, W, 3) prompt-major images -> one uint8 grid image, white padding between cells."""
    if len(images) < n_rows * n_cols:
        raise ValueError(f"grid {n_rows}x{n_cols} needs {n_rows * n_cols} images, got {len(images)}")
    h, w = images.shape[1] * scale, images.shape[2] * scale
    grid = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            img = _to_uint8(images[r * n_cols + c])
            if scale > 1:
                img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = img
    return grid


def before_after_figure(before: np.ndarray, after: np.ndarray, row_labels: Sequence[str], n_seeds: int,
                        path: str | os.PathLike, title: str, max_rows: int = 8, max_seeds: int = 8) -> Path:
    """Side-by-side grids (original | slim) with the prompt of each row on the left; saved as PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} images differ in shape")
    rows = min(len(row_labels), max_rows)
    cols = min(n_seeds, max_seeds)
    idx = [r * n_seeds + c for r in range(rows) for c in range(cols)]
    scale = max(1, 64 // max(1, before.shape[1]))
    left, right = image_grid(before[idx], rows, cols, scale), image_grid(after[idx], rows, cols, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h_in = 0.6 + rows * (left.shape[0] / rows) / 100
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 2 * left.shape[1] / 100, h_in), dpi=100)
    for ax, img, name in ((axes[0], left, "original"), (axes[1], right, "slim (de-memorized)")):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    cell = left.shape[0] / rows
    axes[0].set_yticks([cell * (r + 0.5) for r in range(rows)],
                       [lbl if len(lbl) <= 34 else lbl[:32] + "…" for lbl in row_labels[:rows]], fontsize=6)
    fig.suptitle(f"{title} (seeds 0-{cols - 1} per row, same on both sides)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ markdown


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.1f}%"


def _num(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(float(x), fmt)


def _sci(x: Any) -> str:
    return "–" if x is None else f"{float(x):.2e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _rel_drop(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0 or (isinstance(a, float) and math.isnan(a)):
        return "–"
    change = -100 * (a - b) / a
    return "no change" if abs(change) < 0.5 else f"{change:+.0f}%"


def _eval_rows(orig: Any, cols: Sequence[Any]) -> list[list[str]]:
    """One row per measure: the original, then each later column (slim, retrained, controls) with the relative
    change of the headline rates beside the value."""

    def rate(get: Any) -> list[str]:
        a = get(orig)
        return [_pct(a)] + [f"{_pct(get(c))} ({_rel_drop(a, get(c))})" for c in cols]

    def plain(get: Any, fmt: Any = _pct) -> list[str]:
        return [fmt(get(orig))] + [fmt(get(c)) for c in cols]

    def empty(e: Any, i: int) -> Any:
        return None if e.empty_prompt is None else (e.empty_prompt.nearest_planted, e.empty_prompt.copies)[i]

    rows = [
        ["memorized copy rate (strict)", *rate(lambda e: e.memorized.copy_rate)],
        ["nearest training image = planted item", *rate(lambda e: e.memorized.nn_identity)],
        ["SSIM to planted image", *plain(lambda e: e.memorized.ssim, _num)],
    ]
    for key in orig.perturbed:
        rows.append([f"copy rate, trigger embedding {key}",
                     *rate(lambda e, k=key: e.perturbed[k].copy_rate if k in e.perturbed else None)])
    rows += [
        ["Wen noise-norm AUC (memorized vs neutral)", *plain(lambda e: e.wen_auc, _num)],
        ["Wen direction", *plain(lambda e: e.signature.wen_direction, str)],
        ["empty prompt: nearest a planted image", *plain(lambda e: empty(e, 0))],
        ["empty prompt: strict copies", *plain(lambda e: empty(e, 1))],
        ["memorization kind", *plain(lambda e: e.signature.kind, str)],
        ["neutral judge accuracy (shape and colour)", *plain(lambda e: e.judge_accuracy)],
        ["neutral generations copying an item", *plain(lambda e: e.neutral_copy_rate)],
        ["drift vs original, neutral (RMS pixels)", "0", *[_num(c.drift_neutral, ".4f") for c in cols]],
        ["drift vs original, memorized (RMS pixels)", "0", *[_num(c.drift_memorized, ".4f") for c in cols]],
        ["selectivity (memorized drift / neutral drift)", "–", *[_num(c.selectivity, ".2f") for c in cols]],
        ["generations (memorized / neutral)", *plain(lambda e: f"{e.n_memorized} / {e.n_neutral}", str)],
    ]
    return rows


def eval_columns(ev: dict[str, Any]) -> list[tuple[str, Any]]:
    """(header, Evaluation) for every column after the original, in report order."""
    cols = [("slim (pruned)" if "retrained" in ev else "slim", ev["slim"])]
    if ev.get("retrained") is not None:
        cols.append(("slim + retrain", ev["retrained"]))
    for name, c in (ev.get("controls") or {}).items():
        cols.append((f"control: {name}", c))
    return cols


def to_markdown(data: ReportData, images: dict[str, str], chart: str | None) -> str:
    """report.md: verdict first, then memorization, quality, size, latency, parity, stages, provenance."""
    L: list[str] = [f"# {data.title}", "", f"`{data.command}`", ""]
    p = data.plan
    headline = [f"{_pct(p.get('ratio_achieved'))} of UNet parameters removed "
                f"({p.get('params_before', 0):,} → {p.get('params_after', 0):,})"]
    if p.get("flop_ratio") is not None:
        headline.append(f"FLOPs ×{p['flop_ratio']:.3f}")
    ev = data.evaluation
    verdict = _verdict_sentence(data.verdict)
    if verdict:
        L += [f"**{verdict}**", ""]
    if ev is not None:
        o, s = ev["original"], ev.get("retrained") or ev["slim"]
        headline.insert(0, f"memorized copy rate {_pct(o.memorized.copy_rate)} → {_pct(s.memorized.copy_rate)}")
        headline.append(f"neutral judge accuracy {_pct(o.judge_accuracy)} → {_pct(s.judge_accuracy)}")
    all_passed = all(v.get("passed", True) for v in data.parity.values())
    headline.append("every parity gate passed" if all_passed else "A PARITY GATE FAILED")
    L += [";  ".join(headline) + ".", "", f"Wall time {data.wall_seconds:.0f} s.", ""]

    if ev is not None:
        cfg = ev.get("config", {})
        cols = eval_columns(ev)
        L += ["## Memorization and quality", "",
              f"Same prompts and seeds in every column: {cfg.get('seeds')} seed(s) per memorized caption, "
              f"{s.n_neutral} neutral generations ({cfg.get('neutral_prompts') or 'all'} held-out prompts × "
              f"{cfg.get('neutral_seeds')} seed(s)), {cfg.get('empty_seeds', 0)} empty-prompt generations, "
              f"{o.steps} sampler steps, guidance {o.guidance:g}. Relative change against the original in "
              "brackets. Controls (where shown) are gates that were not learned, tuned to the learned masks' "
              "neutral latent drift: random removal of as many units, and the learned values shuffled within each "
              "module. Definitions in report.json (`evaluation.definitions`).", "",
              f"Memorization signature of the original: {o.signature.reading}.", ""]
        L += _table(["measure", "original", *[h for h, _ in cols]], _eval_rows(o, [c for _, c in cols]))
        for key, title in (("memorized", "Memorized captions"), ("neutral", "Neutral prompts")):
            if key in images:
                L += [f"**{title}** (left: original, right: slim)", "", f"![{title}]({images[key]})", ""]
    else:
        L += ["## Memorization and quality", "", "Not measured in this run (" +
              ("--no-validate" if data.options.get("validate") is False else "no evaluation data for this model") +
              ").", ""]

    L += ["## Size", ""]
    units = p.get("units", {})
    rows = [["parameters", f"{p.get('params_before', 0):,}", f"{p.get('params_after', 0):,}",
             f"-{_pct(p.get('ratio_achieved'))}"]]
    if p.get("flops_before") is not None:
        ref = p.get("reference_shape", {})
        rows.append([f"FLOPs (batch {ref.get('batch')}, latent {ref.get('height')}x{ref.get('width')}, "
                     f"{ref.get('seq_len')} tokens)", f"{p['flops_before'] / 1e9:.3f} G",
                     f"{p['flops_after'] / 1e9:.3f} G", f"×{p['flop_ratio']:.3f}"])
    for kind, u in units.items():
        rows.append([f"{kind} units", f"{u['total']:,}", f"{u['total'] - u['removed']:,}",
                     f"-{_pct(u['removed'] / u['total'] if u['total'] else 0)}"])
    L += _table(["", "original", "slim", "change"], rows)

    if data.bench is not None:
        from .bench import ratio_sentence

        b = data.bench
        L += ["## Latency (one UNet call)", "",
              f"{b.device_name}; batch {b.shape['batch']}, latent {b.shape['height']}x{b.shape['width']}, "
              f"{b.shape['seq_len']} text tokens. Dense and slim are called alternately (ABBA order, after "
              f"{b.options.warmup} warm-up calls each), {b.options.runs} to {b.options.round_limit} rounds; the "
              "ratio is the median of the per-round slim/dense ratios with a 95% bootstrap interval. A ratio whose "
              "interval contains 1 is within noise: no speed difference is claimed.", ""]
        rows = []
        for r in b.rows():
            def ms(a: Any, c: Any) -> str:
                return "–" if a is None else f"{a:.2f} ({c:.2f})"

            interval = "–" if r["latency_ratio"] is None else \
                f"{r['latency_ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
            rows.append([r["runtime"], ms(r["dense_p50_ms"], r["dense_p95_ms"]), ms(r["slim_p50_ms"], r["slim_p95_ms"]),
                         interval, r["verdict"] or "–", _num(r["flop_ratio"]),
                         r["status"] if r["status"] != "ok" else ""])
        L += _table(["runtime", "dense p50 (p95) ms", "slim p50 (p95) ms", "slim/dense latency [95% interval]",
                     "reading", "slim/dense FLOPs", "note"], rows)
        L += [f"- {ratio_sentence(r, b.options.confidence)}" for r in b.rows() if r["latency_ratio"] is not None]
        L += [""]
        if chart:
            L += [f"![latency]({chart})", ""]

    L += ["## Parity gates (measured maxima)", ""]
    L += ["`max abs` is read against `reference max`, the largest magnitude the reference stage output; `max rel` "
          "is per element, over elements above 1e-6 of that maximum, where the comparison computes it.", ""]
    rows = [[name, _sci(g.get("max_abs")), _sci(g.get("reference_max_abs")), _sci(g.get("max_rel")),
             g.get("tolerance", ""), "pass" if g.get("passed") else "FAIL"] for name, g in data.parity.items()]
    L += _table(["gate", "max abs", "reference max", "max rel", "tolerance", ""], rows)

    L += ["## Stages", ""]
    L += _table(["stage", "seconds", "result"], [[s.name, f"{s.seconds:.1f}", s.summary] for s in data.stages])
    if data.artifacts:
        L += ["## Artifacts", ""] + [f"- `{k}`: {v}" for k, v in data.artifacts.items()] + [""]
    if data.notes:
        L += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    if data.environment:
        L += ["## Environment", ""] + [f"- {k}: {v}" for k, v in data.environment.items()] + [""]
    return "\n".join(L)


def write_report(data: ReportData, out_dir: str | os.PathLike) -> dict[str, Path]:
    """report.json, report.md, images/*.png, latency.png into `out_dir`; returns what was written."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    images: dict[str, str] = {}
    ev = data.evaluation
    if ev is not None:
        o, s = ev["original"], ev.get("retrained") or ev["slim"]  # the model that ships
        captions, neutral = ev.get("memorized_captions", ()), ev.get("neutral_prompts", ())
        seeds, nseeds = int(ev["config"]["seeds"]), int(ev["config"]["neutral_seeds"])
        if o.memorized_images is not None and s.memorized_images is not None and captions:
            written["memorized_grid"] = before_after_figure(
                o.memorized_images, s.memorized_images, captions, seeds, out / "images" / "memorized.png",
                "Memorized captions")
            images["memorized"] = "images/memorized.png"
        if o.neutral_images is not None and s.neutral_images is not None and neutral:
            written["neutral_grid"] = before_after_figure(
                o.neutral_images, s.neutral_images, neutral, nseeds, out / "images" / "neutral.png",
                "Held-out neutral prompts", max_rows=12)
            images["neutral"] = "images/neutral.png"
    chart = None
    if data.bench is not None and any(t.ok for t in data.bench.timings):
        written["latency_chart"] = latency_chart([data.bench], out / "latency.png",
                                        f"UNet latency, dense vs slim\n{data.bench.device_name}")
        chart = "latency.png"
    payload = to_json(data)
    if ev is not None:
        from uniforget.evaluate import DEFINITIONS

        payload["evaluation"]["definitions"] = DEFINITIONS
    tmp = out / "report.json.partial"
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    tmp.replace(out / "report.json")
    written["json"] = out / "report.json"
    md = out / "report.md.partial"
    md.write_text(to_markdown(data, images, chart) + "\n")
    md.replace(out / "report.md")
    written["markdown"] = out / "report.md"
    return written
