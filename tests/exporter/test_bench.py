"""The latency benchmark: interleaved timing, the paired ratio's interval and its wording, dense vs slim rows
with FLOP ratios, JSON/chart output, the CLIs."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.bench import (
    BenchOptions,
    bench_pair,
    format_table,
    interleaved,
    percentile,
    plot,
    ratio_estimate,
    ratio_sentence,
    time_calls,
    write_json,
)
from exporter.errors import ExportError
from uniforget.geometries import TINY, build_unet
from uniforget.masks import random_maskset
from uniforget.plan import make_plan
from uniforget.prune import prune_unet


def random_slim(unet, ratio: float, seed: int = 0):
    plan = make_plan(unet, random_maskset(unet, seed), ratio, with_flops=False)
    return prune_unet(unet, plan), plan

ROOT = Path(__file__).resolve().parents[2]


def test_percentiles_match_numpy_and_time_calls_counts_runs():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 95) == pytest.approx(np.percentile(xs, 95))
    calls = []
    ms = time_calls(lambda: calls.append(1), runs=20, warmup=3)
    assert len(ms) == 20 and len(calls) == 23 and all(m >= 0 for m in ms)


def test_options_refuse_too_few_runs_and_unknown_runtimes():
    with pytest.raises(ExportError, match=">= 20"):
        BenchOptions(runs=5)
    with pytest.raises(ExportError, match="unknown runtime"):
        BenchOptions(runtimes=("eager", "warp-drive"))


@pytest.fixture(scope="module")
def result():
    dense = build_unet(TINY["sd1"], seed=0)
    slim, plan = random_slim(dense, 0.2, seed=1)
    opts = BenchOptions(runtimes=("eager", "cuda_graph", "onnxruntime", "tensorrt"), batch=1, seq_len=8, max_runs=20)
    return bench_pair(dense, slim, opts, label="tiny"), plan


def test_pair_rows_ratios_and_skips(result):
    res, plan = result
    assert res.params["slim"] < res.params["dense"]
    assert res.params["slim"] == plan.params_after
    assert res.flop_ratio is not None and 0 < res.flop_ratio < 1
    rows = {r["runtime"]: r for r in res.rows()}
    for rt in ("eager", "onnxruntime"):
        d, s = res.get("dense", rt), res.get("slim", rt)
        assert d.ok and s.ok and d.runs == 20 and d.p95_ms >= d.p50_ms > 0
        paired = np.asarray(s.samples) / np.asarray(d.samples)  # median of per-round ratios, not p50 / p50
        assert rows[rt]["latency_ratio"] == pytest.approx(float(np.median(paired)))
        assert rows[rt]["flop_ratio"] == res.flop_ratio
    assert res.get("dense", "onnxruntime").setup_s > 0  # export + session creation is reported, not timed
    assert rows["cuda_graph"]["latency_ratio"] is None and "CUDA" in rows["cuda_graph"]["status"]
    assert rows["tensorrt"]["latency_ratio"] is None and "skipped" in rows["tensorrt"]["status"]
    assert len(format_table([res])) == 4
    for rt in ("eager", "onnxruntime"):  # interleaved: both models have the same rounds, paired by index
        r = rows[rt]
        assert r["rounds"] == len(res.get("dense", rt).samples) == len(res.get("slim", rt).samples) >= 20
        assert r["ratio_low"] <= r["latency_ratio"] <= r["ratio_high"]
        assert r["verdict"] in ("slim faster", "slim slower", "within noise")


def test_json_and_chart(result, tmp_path):
    res, _ = result
    path = write_json([res], tmp_path / "b.json")
    data = json.loads(path.read_text())
    assert data["results"][0]["flop_ratio"] == pytest.approx(res.flop_ratio)
    assert {t["runtime"] for t in data["results"][0]["timings"]} == {"eager", "cuda_graph", "onnxruntime", "tensorrt"}
    png = plot([res], tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.partial*"))


def test_bench_cli_on_an_export_folder(tiny_model_dir, tmp_path, capsys):
    """`uniforget bench` against a slim UNet saved by the prune stage."""
    from exporter.cli import main
    from uniforget.models import load_pipeline
    from uniforget.slim_io import save_slim_unet

    dense = load_pipeline(str(tiny_model_dir)).unet
    slim, plan = random_slim(dense, 0.1)
    save_slim_unet(slim, plan, tmp_path / "export" / "unet")
    rc = main(["bench", "--model", str(tiny_model_dir), "--slim", str(tmp_path / "export"), "--runtimes", "eager",
               "--batch", "1", "--max-runs", "20", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert r["params"]["slim"] == plan.params_after
    assert r["rows"][0]["latency_ratio"] is not None


def test_gpu_check_quick_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--batch", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    first = data["results"][0]
    assert "SD1" in first["label"]
    assert {r["runtime"] for r in first["rows"] if r["latency_ratio"] is not None} == {"eager", "onnxruntime"}
    assert (tmp_path / "gpu_check.png").is_file()


def test_ratio_interval_and_its_wording():
    rng = np.random.default_rng(0)
    dense = 100 + rng.normal(0, 5, 40)
    same = ratio_estimate(dense, dense * rng.normal(1.0, 0.03, 40))
    assert same.low < 1 < same.high and same.verdict == "within noise"
    fast = ratio_estimate(dense, dense * rng.normal(0.8, 0.02, 40))
    assert fast.high < 1 and fast.verdict == "slim faster" and fast.low < 0.8 < fast.high
    slow = ratio_estimate(dense, dense * 1.2)
    assert slow.verdict == "slim slower" and slow.ratio == pytest.approx(1.2)
    assert ratio_estimate(dense, dense * 0.9, seed=3) == ratio_estimate(dense, dense * 0.9, seed=3)
    row = {"runtime": "onnxruntime", "latency_ratio": same.ratio, "ratio_low": same.low, "ratio_high": same.high,
           "verdict": same.verdict, "rounds": same.rounds}
    text = ratio_sentence(row)
    assert "within noise" in text and "faster" not in text and "slower" not in text
    assert "slim faster" in ratio_sentence({**row, "latency_ratio": fast.ratio, "ratio_low": fast.low,
                                            "ratio_high": fast.high, "verdict": fast.verdict})


def test_interleaving_alternates_and_adds_rounds_until_the_interval_is_narrow():
    calls: list[str] = []
    opts = BenchOptions(runs=20, max_runs=60, warmup=1, ci_halfwidth=1e-9)  # never narrow enough: runs to 60
    ms = interleaved({"dense": lambda: calls.append("d"), "slim": lambda: calls.append("s")}, opts)
    assert len(ms["dense"]) == len(ms["slim"]) == 60
    timed = "".join(calls[2:])  # after one warm-up call each
    assert timed[:8] == "dssddssd"  # ABBA: a slow drift hits both models alike
    calls.clear()
    ms = interleaved({"dense": lambda: time.sleep(0.002), "slim": lambda: time.sleep(0.002)},
                     BenchOptions(runs=20, max_runs=60, warmup=1, ci_halfwidth=10.0))
    assert len(ms["dense"]) == 20  # wide target reached at once: no extra rounds
    with pytest.raises(ExportError, match="max_runs"):
        BenchOptions(runs=20, max_runs=10)


def test_bench_consumes_a_slim_unet_folder(tmp_path):
    """The slim side can be a slim-UNet folder, loaded the way the rest of exporter/ loads it."""
    from uniforget.slim_io import save_slim_unet

    dense = build_unet(TINY["sd1"], seed=0)
    slim, plan = random_slim(dense, 0.2, seed=2)
    folder = save_slim_unet(slim, plan, tmp_path / "unet")
    res = bench_pair(dense, folder, BenchOptions(runtimes=("eager",), batch=1, seq_len=8, max_runs=20))
    assert res.params["slim"] == plan.params_after and res.ratio("eager") is not None


def test_cpu_bench_times_both_models_from_fresh_memory(monkeypatch):
    """Both UNets are timed as fresh copies (README "Speed": as loaded, a memory-mapped dense UNet and a cloned slim
    one read a 2-4% offset that belonged to their memory); the caller's modules are neither timed nor changed."""
    import torch

    import exporter.bench as bench

    dense = build_unet(TINY["sd1"], seed=0)
    slim, _ = random_slim(dense, 0.2, seed=2)
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    timed = {}
    real = bench._prep_eager

    def spy(unet, inputs, opts, tmp, name):
        timed[name] = unet
        return real(unet, inputs, opts, tmp, name)

    monkeypatch.setattr(bench, "_prep_eager", spy)
    bench_pair(dense, slim, BenchOptions(runtimes=("eager",), batch=1, seq_len=8, max_runs=20))
    for name, caller in (("dense", dense), ("slim", slim)):
        copy = timed[name]
        assert copy is not caller
        ours = {p.untyped_storage().data_ptr() for p in caller.parameters()}
        assert not ours & {p.untyped_storage().data_ptr() for p in copy.parameters()}
        assert all(torch.equal(a, b) for a, b in zip(caller.state_dict().values(), copy.state_dict().values(),
                                                      strict=True))
    assert all(torch.equal(p, before[n]) for n, p in dense.named_parameters())


def test_bench_and_report_do_not_import_each_other():
    import subprocess
    import sys

    for first, other in (("exporter.bench", "exporter.report"), ("exporter.report", "exporter.bench")):
        code = f"import sys, {first}; print({other!r} in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        assert out.stdout.strip() == "False", f"importing {first} imported {other}"
    src = (ROOT / "exporter" / "bench.py").read_text() + (ROOT / "exporter" / "report.py").read_text()
    assert "from .report import" not in src and "from .bench import plot" not in src
    assert "make_plan" not in (ROOT / "exporter" / "bench.py").read_text()  # bench consumes slim UNets only


def test_sd15_cpu_script_runs_on_a_tiny_geometry(tmp_path):
    """scripts/bench_sd15_cpu.py end to end on TINY['sd1'] (the README's Speed table comes from its SD1.5 run)."""
    spec = importlib.util.spec_from_file_location("bench_sd15_cpu", ROOT / "scripts" / "bench_sd15_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "b.json"
    assert mod.main(["--geometry", "tiny", "--size", "8", "--ratios", "0.15", "--no-optimizer", "--max-runs", "20",
                     "--threads", "1", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["align"], r["ort_optimizer"]): r for r in data["rows"]}
    assert set(rows) == {(8, False), (1, False)}  # aligned, and the unaligned ablation at the same ratio
    for r in rows.values():
        assert r["ratio_low"] <= r["latency_ratio"] <= r["ratio_high"] and 0 < r["flop_ratio"] < 1
        assert r["ratio_achieved"] >= 0.15 and len(r["samples"]["dense"]) == r["rounds"] >= 20
