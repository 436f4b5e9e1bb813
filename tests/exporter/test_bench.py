"""The latency benchmark: statistics, dense vs slim rows with FLOP ratios, JSON/chart output, the CLIs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from exporter.bench import (
    BenchOptions,
    bench_pair,
    format_table,
    percentile,
    plot,
    random_slim,
    time_calls,
    write_json,
)
from exporter.errors import ExportError
from uniforget.geometries import TINY, build_unet

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
    opts = BenchOptions(runtimes=("eager", "cuda_graph", "onnxruntime", "tensorrt"), batch=1, seq_len=8)
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
        assert rows[rt]["latency_ratio"] == pytest.approx(s.p50_ms / d.p50_ms)
        assert rows[rt]["flop_ratio"] == res.flop_ratio
    assert res.get("dense", "onnxruntime").setup_s > 0  # export + session creation is reported, not timed
    assert rows["cuda_graph"]["latency_ratio"] is None and "CUDA" in rows["cuda_graph"]["status"]
    assert rows["tensorrt"]["latency_ratio"] is None and "skipped" in rows["tensorrt"]["status"]
    assert len(format_table([res])) == 4


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
               "--batch", "1", "--json", str(tmp_path / "r.json")])
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
