"""Every CLI table rendered in an 80-column terminal: nothing wider than 80, no word cut with an ellipsis, every
header word whole (bench used to print "runt…" and "late…")."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.cells import cell_len
from rich.console import Console

from exporter.bench import BenchOptions, BenchResult, Timing
from exporter.commands.bench import BENCH_COLUMNS, bench_notes, bench_table
from exporter.commands.oneshot import summary_table
from exporter.oneshot import ExportResult
from exporter.tables import WIDTH, fitted_table


def render(renderable, width: int = WIDTH) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


def assert_fits(text: str, headers, width: int = WIDTH) -> None:
    lines = text.splitlines()
    too_wide = [ln for ln in lines if cell_len(ln) > width]
    assert not too_wide, "\n".join(too_wide)
    assert "…" not in text, text
    top = next(i for i, ln in enumerate(lines) if ln.startswith("┏"))
    rule = next(i for i, ln in enumerate(lines) if ln.startswith("┡"))
    head = " ".join(lines[top + 1:rule])
    missing = [w for h in headers for w in h.split() if w not in head]
    assert not missing, f"header words cut: {missing}\n{text}"


def _bench_result(ms: float) -> BenchResult:
    runtimes = ("eager", "cuda_graph", "compile", "onnxruntime", "tensorrt")
    timings = []
    for model, f in (("dense", 1.0), ("slim", 0.93)):
        for rt in runtimes:
            if rt == "tensorrt":
                timings.append(Timing(model, rt, 'skipped: TensorRT is not importable (pip install "uniforget[gpu]")'))
            else:
                samples = tuple(ms * f * (1 + 0.01 * ((i * 7) % 5 - 2)) for i in range(20))
                timings.append(Timing(model, rt, "ok", ms * f, ms * 1.09 * f, ms * f, 20, 123.4, samples))
    return BenchResult("/models/stable-diffusion-v1-5-with-a-long-folder-name", BenchOptions(runtimes=runtimes),
                       "NVIDIA H200 (cuda:0), torch 2.13.0+cu128", {"batch": 2, "height": 64, "width": 64},
                       {"dense": 859_520_964, "slim": 812_000_000}, {"dense": 10**12, "slim": 9 * 10**11},
                       tuple(timings))


@pytest.mark.parametrize("ms", [0.912, 12.34, 1234.5])
def test_bench_table_fits_80_columns(ms):
    res = _bench_result(ms)
    text = render(bench_table(res))
    assert_fits(text, [h for h, _ in BENCH_COLUMNS])
    for rt in ("eager", "cuda_graph", "compile", "onnxruntime", "tensorrt"):
        assert rt in text  # runtime names are never folded
    assert "faster" in text.split() and "0.930-0.930" in text  # the ratio comes with its interval and reading
    assert bench_notes(res) == ['tensorrt: skipped: TensorRT is not importable (pip install "uniforget[gpu]")']


def test_plan_table_fits_80_columns():
    import torch

    from exporter.commands.plan import plan_table
    from uniforget.fingerprint import model_fingerprint
    from uniforget.flops import ReferenceShape
    from uniforget.geometries import TINY, build_unet
    from uniforget.masks import MaskSet
    from uniforget.plan import make_plan
    from uniforget.targets import discover_targets

    unet = build_unet(TINY["sd1"], seed=0)
    g = torch.Generator().manual_seed(0)
    ms = MaskSet({t.key: torch.randn(t.size, generator=g) for t in discover_targets(unet)},
                 model_fingerprint(unet))
    plan = make_plan(unet, ms, 0.05, ReferenceShape(batch=16, height=128, width=128, seq_len=77))
    text = render(plan_table(plan, "slim UNet -> /a/rather/long/output/folder/engines/sd15-medium-r0.05/unet"))
    assert_fits(text, ["before", "after", "change"])
    assert "FLOPs" in text and "parameters" in text


def test_validate_table_fits_80_columns():
    """The shape `uniforget validate` prints: a long measure column and one column per evaluation."""
    rows = [("empty prompt: nearest planted / copies", "12.5% / 3.1% (n=48)", "0.0% / 0.0% (n=48)"),
            ("  Wen mean mem / neutral", "0.1234 / 0.0567", "0.0456 / 0.0432"),
            ("copy rate, optimized@0.1", "100.0%", "12.5%"),
            ("memorization kind", "local (per caption)", "none")]
    headers = ["measure", "original", "masked"]
    text = render(fitted_table([headers[0], *((h, "right") for h in headers[1:])], rows,
                               title="uniforget validate: /models/some-long-model-folder-name"))
    assert_fits(text, headers)
    for name, *_ in rows:
        assert all(w in text for w in name.split())


def test_one_shot_summary_fits_80_columns(tmp_path):
    def evaluation(copy: float, drift: float | None) -> SimpleNamespace:  # the fields the summary reads
        stats = SimpleNamespace(copy_rate=copy, nn_identity=copy, ssim=0.5)
        return SimpleNamespace(memorized=stats, perturbed={"random@0.1": stats, "optimized@0.1": stats},
                               judge_accuracy=0.8125, wen_auc=0.734, drift_neutral=drift)

    ev, slim = evaluation(1.0, None), evaluation(0.0, 0.0123)
    out = tmp_path / "a-long-engines-folder" / "toy-medium-r0.05-and-then-some-more-words"
    parity = {g: {"max_abs": 1.2e-6} for g in ("slim == gated (torch fp32)", "ONNX Runtime == slim torch (fp32)",
                                               "ONNX pipeline text_encoder == torch", "ONNX pipeline vae_decoder == torch")}
    res = ExportResult(out=out, stages=(), parity=parity, plan={"ratio_achieved": 0.0501, "params_before": 859_520_964,
                                                                 "params_after": 816_000_000, "flop_ratio": 0.947},
                       evaluation={"original": ev, "slim": slim}, bench=_bench_result(12.3),
                       report={"markdown": out / "report" / "report.md"}, wall_seconds=312.0)
    text = render(summary_table(res))
    assert_fits(text, ["measure", "value"])
    assert "816,000,000" in text
    assert all(w in text.split() for w in "parity: ONNX pipeline vae_decoder == torch".split())


def test_wider_terminals_get_natural_widths():
    t = fitted_table(["runtime", "latency slim / dense"], [("onnxruntime", "0.950")])
    assert t.widths(200) is None  # fits as it is: rich's own layout
    assert render(t, 200).splitlines()[1].count("latency slim / dense") == 1
