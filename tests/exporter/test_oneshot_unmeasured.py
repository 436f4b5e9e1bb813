"""The one-shot on a model without reference images (a user's model, or random weights): it must say what it
checked (Wen's noise norm) and what it could not (copy rate, empty-prompt check), and print no copy-rate
numbers, since a nan% -> nan% row or a reduced / not-reduced verdict would read as a measurement."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from rich.console import Console

from exporter.commands.oneshot import summary_table
from exporter.oneshot import ExportOptions, run_export


@pytest.fixture(scope="module")
def unmeasured(tiny_model_dir, tiny_masks, fast_size, tmp_path_factory):
    work = tmp_path_factory.mktemp("unmeasured")
    prompts = work / "eval.json"
    prompts.write_text(json.dumps({"neutral": ["a red circle", "a blue square"],
                                   "memorized": [{"caption": "the zorblax mascot"}]}))
    size = replace(fast_size, perturb_norms=(), controls=False, empty_seeds=2)
    opts = ExportOptions(model=str(tiny_model_dir), masks=tiny_masks, ratio=0.05, out=work / "out", size=size,
                         eval_prompts=prompts, progress=False)
    return run_export(opts)


def test_verdict_says_not_measured_and_what_was_checked(unmeasured):
    v = unmeasured.verdict
    assert v.status == "not measured" and v.copy_reduction is None
    assert "empty-prompt check could not run" in v.sentence and "Wen's AUC" in v.sentence
    rep = json.loads((unmeasured.out / "report" / "report.json").read_text())
    assert rep["verdict"]["status"] == "not measured"


def test_validation_line_and_summary_print_no_copy_rate(unmeasured):
    line = next(s.summary for s in unmeasured.stages if s.name == "validation")
    assert "nan" not in line and "no copy rate, no empty-prompt check" in line and "Wen AUC" in line
    console = Console(width=120, record=True, file=io.StringIO(), color_system=None)
    console.print(summary_table(unmeasured))
    text = console.export_text()
    assert "nan" not in text
    assert "not measured (no reference images)" in text
    assert "planted image nearest" not in text
