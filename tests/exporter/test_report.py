"""The report: grids keep prompts and seeds aligned, JSON is strict, markdown shows every gate and number."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.report import (
    ReportData,
    StageRecord,
    before_after_figure,
    image_grid,
    to_markdown,
    write_report,
)


def test_image_grid_places_prompt_major_cells():
    imgs = np.zeros((6, 2, 2, 3), np.float32)
    for i in range(6):
        imgs[i] = i / 10
    g = image_grid(imgs, n_rows=2, n_cols=3, pad=1)
    assert g.shape == (2 * 3 + 1, 3 * 3 + 1, 3) and g.dtype == np.uint8
    # row 1, column 2 is image 1 * 3 + 2 = 5
    assert g[1 + 3, 1 + 2 * 3, 0] == round(0.5 * 255)
    assert g[0, 0, 0] == 255  # padding
    with pytest.raises(ValueError):
        image_grid(imgs, 3, 3)


def test_before_after_figure_refuses_mismatched_sets(tmp_path):
    a = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="differ"):
        before_after_figure(a, a[:2], ["x", "y"], 2, tmp_path / "f.png", "t")
    p = before_after_figure(a, a, ["x", "y"], 2, tmp_path / "f.png", "t")
    assert p.read_bytes()[:4] == b"\x89PNG"


def _data(**kw) -> ReportData:
    plan = {"ratio_achieved": 0.0512, "params_before": 1000, "params_after": 949, "flop_ratio": 0.94,
            "flops_before": 2e9, "flops_after": 1.88e9, "reference_shape": {"batch": 1, "height": 8, "width": 8,
                                                                               "seq_len": 77},
            "units": {"ffn": {"total": 10, "removed": 2}}}
    parity = {"slim == gated": {"max_abs": 3e-7, "max_rel": 1e-6, "reference_max_abs": 0.75, "tolerance": "atol 1e-05",
                                "passed": True},
              "ORT == torch": {"max_abs": float("nan"), "max_rel": None, "tolerance": "atol 1e-4", "passed": False}}
    return ReportData(title="t", command="uniforget-export --ratio 0.05", options={"validate": False},
                      stages=(StageRecord("plan", 0.5, "5% removed"),), plan=plan, parity=parity, **kw)


def test_markdown_without_evaluation_says_why_and_flags_failed_gate():
    md = to_markdown(_data(), {}, None)
    assert "--no-validate" in md
    assert "A PARITY GATE FAILED" in md and "FAIL" in md
    assert "3.00e-07" in md and "×0.940" in md and "-20.0%" in md
    assert "| slim == gated | 3.00e-07 | 7.50e-01 |" in md  # max abs beside the reference's scale


def test_write_report_json_is_strict(tmp_path):
    written = write_report(_data(notes=("n1",)), tmp_path / "report")
    text = (tmp_path / "report" / "report.json").read_text()
    data = json.loads(text)  # NaN would make this non-standard JSON
    assert "NaN" not in text
    assert data["parity"]["ORT == torch"]["max_abs"] is None
    assert data["notes"] == ["n1"] and data["format"] == "uniforget.export_report/1"
    assert set(written) == {"json", "markdown"}
    assert not list((tmp_path / "report").glob("*.partial*"))
