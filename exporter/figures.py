"""Figures the report and the benchmarks write: the latency chart, and the atomic PNG save they share.

Why its own module: the benchmark (bench.py) and the report (report.py) both draw; keeping the drawing here
lets neither import the other. matplotlib is imported on first use, with the Agg backend (no display).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DENSE_COLOUR, SLIM_COLOUR = "#8c8c8c", "#2b7bba"


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG under a temporary name, rename it into place, and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def latency_chart(results: Sequence[Any], path: str | os.PathLike,
                  title: str = "UNet latency, dense vs slim") -> Path:
    """Box plots of every timed call (dense vs slim) per model and runtime: box = quartiles, whiskers = 5th-95th
    percentile, so the spread is on the chart. Above each pair: the slim/dense ratio with its interval and verdict
    ("within noise" when the interval contains 1). `results` are exporter.bench.BenchResult."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for res in results:
        for row in res.rows():
            d, s = res.get("dense", row["runtime"]), res.get("slim", row["runtime"])
            if d is not None and d.ok and d.samples:
                groups.append((res, row, d.samples, s.samples if s is not None and s.ok else ()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(groups) + 1.5), 3.8), dpi=120)
    x = np.arange(len(groups), dtype=float)
    for i, (_, row, dense, slim) in enumerate(groups):
        for offset, samples, colour in ((-0.2, dense, DENSE_COLOUR), (0.2, slim, SLIM_COLOUR)):
            if not samples:
                continue
            bp = ax.boxplot([samples], positions=[x[i] + offset], widths=0.34, whis=(5, 95), showfliers=True,
                            patch_artist=True, flierprops={"markersize": 2, "alpha": 0.5})
            for box in bp["boxes"]:
                box.set(facecolor=colour, alpha=0.75)
            for med in bp["medians"]:
                med.set(color="black")
        top = max(np.percentile(dense, 95), np.percentile(slim, 95) if slim else 0.0)
        if row["latency_ratio"] is not None:
            fr = f"\nFLOPs x{row['flop_ratio']:.3f}" if row["flop_ratio"] else ""
            ax.annotate(f"x{row['latency_ratio']:.3f} [{row['ratio_low']:.3f}, {row['ratio_high']:.3f}]\n"
                        f"{row['verdict']}{fr}", (x[i], top), xytext=(0, 4), textcoords="offset points",
                        ha="center", va="bottom", fontsize=6.5)
    multi = len({res.label for res, *_ in groups}) > 1
    ax.set_xticks(x, [f"{res.label}\n{row['runtime']}" if multi else row["runtime"] for res, row, *_ in groups],
                  fontsize=7)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("latency per UNet call (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[matplotlib.patches.Patch(color=DENSE_COLOUR, label="dense"),
                       matplotlib.patches.Patch(color=SLIM_COLOUR, label="slim")], fontsize=7, loc="lower right")
    ax.margins(y=0.25)
    ax.set_ylim(bottom=0)
    fig.text(0.01, 0.01, "interleaved calls; box: quartiles, whiskers: 5th-95th percentile\nratio: median of "
             "paired per-round ratios [95% bootstrap interval]", fontsize=5.5, color="#555555")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


__all__ = ["latency_chart", "save_figure"]
