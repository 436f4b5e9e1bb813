"""The one-shot `uniforget-export` end to end on a tiny random pipeline, and its failure paths.

Every failure path must leave nothing at the output path (and no temporary sibling) and end as one line with
exit code 2 through the real CLI entry point.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from exporter import oneshot
from exporter.cli import export_main
from exporter.errors import ExportError, MissingDependencyError
from exporter.oneshot import ExportOptions, Tolerances, run_export

EXPECTED = ("masks.safetensors", "plan.json", "unet/config.json", "unet/uniforget_plan.json",
            "unet/diffusion_pytorch_model.safetensors", "onnx/unet.onnx", "onnx/pipeline/model_index.json",
            "onnx/pipeline/unet/model.onnx", "onnx/pipeline/text_encoder/model.onnx",
            "onnx/pipeline/vae_decoder/model.onnx", "triton/unet_onnx/config.pbtxt",
            "triton/pipeline/config.pbtxt", "report/report.md", "report/report.json", "report/latency.png",
            "report/images/memorized.png", "report/images/neutral.png")


def _opts(model_dir, masks, out, size, **kw) -> ExportOptions:
    return ExportOptions(model=str(model_dir), masks=masks, ratio=0.05, out=out, size=size,
                         progress=False, **kw)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tiny_masks, tiny_eval_data, fast_size, tmp_path_factory):
    """One full run with a brief retrain, and 'controls' shipped beside the masks (copies of the masks
    themselves: the plumbing is under test here, not the science)."""
    import shutil

    work = tmp_path_factory.mktemp("engines")
    masks = work / "m.safetensors"
    shutil.copyfile(tiny_masks, masks)
    for name in ("random", "shuffled"):
        shutil.copyfile(tiny_masks, work / f"m.control-{name}.safetensors")
    out = work / "tiny"
    res = run_export(_opts(tiny_model_dir, masks, out, fast_size, eval_data=tiny_eval_data, retrain_steps=2,
                           ort_optimize=True))  # off by default; the fused graph must pass its own gate
    return out, res


def test_full_layout(finished):
    out, res = finished
    missing = [p for p in EXPECTED if not (out / p).is_file()]
    assert not missing, missing
    assert res.out == out.resolve()
    assert _leftovers(out) == []


def test_report_numbers(finished):
    out, res = finished
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["format"] == "uniforget.export_report/1"
    gates = rep["parity"]
    assert gates["slim == gated (torch fp32)"]["max_abs"] <= 1e-5
    assert gates["ONNX Runtime == slim torch (fp32)"]["max_abs"] <= 1e-4
    assert all(g["passed"] for g in gates.values())
    assert any(k.startswith("ONNX pipeline unet") for k in gates)
    # every gate names the scale its max abs is small against: the reference output's largest magnitude
    assert all(g["reference_max_abs"] > 100 * g["max_abs"] for g in gates.values())
    assert rep["plan"]["ratio_achieved"] >= 0.05
    ev = rep["evaluation"]
    # planted items are the original's own seed-0 generations: the original copies them exactly
    assert ev["original"]["memorized"]["copy_rate"] == 1.0
    assert ev["slim"]["drift_neutral"] is not None and ev["slim"]["drift_neutral"] > 0
    assert "random@0.1" in ev["slim"]["perturbed"]
    assert "definitions" in ev
    lat = rep["latency"]
    runtimes = {t["runtime"] for t in lat["timings"] if t["status"] == "ok"}
    assert runtimes == {"eager", "onnxruntime"}
    assert all(t["runs"] >= 20 for t in lat["timings"] if t["status"] == "ok")
    md = (out / "report" / "report.md").read_text()
    for needle in ("memorized copy rate", "Parity gates", "images/memorized.png", "latency.png", "slim/dense"):
        assert needle in md
    assert "ONNX pipeline unet (ORT-optimized) == torch" in gates
    for row in lat["rows"]:  # every ratio has its interval; the report claims nothing the interval does not hold
        if row["latency_ratio"] is None:
            continue
        assert row["ratio_low"] <= row["latency_ratio"] <= row["ratio_high"]
        within = row["ratio_low"] <= 1.0 <= row["ratio_high"]
        assert (row["verdict"] == "within noise") == within
        line = next(ln for ln in md.splitlines() if ln.startswith(f"- {row['runtime']}: slim/dense"))
        assert ("within noise" in line) == within and (("faster" in line or "slower" in line) != within)
    assert [s["name"] for s in rep["stages"]][:5] == ["load model", "masks", "plan", "slim UNet", "retrain"]


def test_retrain_controls_signature_and_verdict_are_reported(finished, tiny_model_dir):
    out, res = finished
    rep = json.loads((out / "report" / "report.json").read_text())
    ev = rep["evaluation"]
    assert set(ev["controls"]) == {"random", "shuffled"}
    assert ev["retrained"]["drift_neutral"] is not None  # against the original, like the pruned slim model
    for col in ("original", "slim", "retrained"):
        assert ev[col]["empty_prompt"]["n"] == 4 and ev[col]["signature"]["kind"]
    assert rep["verdict"]["status"] in ("reduced", "not beyond controls", "not reduced", "nothing to reduce")
    md = (out / "report" / "report.md").read_text().splitlines()
    assert md[4].startswith("**") and rep["verdict"]["sentence"] in md[4]  # the report opens with the verdict
    assert "slim + retrain" in "\n".join(md) and "control: random" in "\n".join(md)
    # the shipped unet/ is the retrained one (not the pruned weights), and ONNX Runtime was checked against it
    import torch

    from uniforget.models import load_pipeline
    from uniforget.plan import PruningPlan
    from uniforget.prune import prune_unet
    from uniforget.slim_io import load_slim_unet

    shipped = load_slim_unet(out / "unet")
    pruned = prune_unet(load_pipeline(str(tiny_model_dir)).unet, PruningPlan.load(out / "plan.json"))
    assert any(not torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), pruned.state_dict().values(),
                                                       strict=True))
    assert rep["parity"]["ONNX Runtime == slim torch (fp32)"]["passed"]


def test_existing_output_without_force_is_refused(finished, tiny_model_dir, tiny_masks, capsys):
    out, _ = finished
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    rc = export_main(["--model", str(tiny_model_dir), "--masks", str(tiny_masks), "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_parity_failure_leaves_nothing(tiny_model_dir, tiny_masks, tmp_path, capsys):
    out = tmp_path / "fail"
    rc = export_main(["--model", str(tiny_model_dir), "--masks", str(tiny_masks), "--out", str(out), "-q",
                      "--onnx-atol", "1e-12", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and "atol 1e-12" in err[0]
    assert not out.exists()
    assert _leftovers(out) == []


def test_parity_failure_keeps_an_existing_output_intact(finished, tiny_model_dir, tiny_masks, fast_size):
    """--force with a failing gate must not destroy the finished run that is already there."""
    out, _ = finished
    report = (out / "report" / "report.json").read_bytes()
    opts = _opts(tiny_model_dir, tiny_masks, out, fast_size, force=True, validate=False,
                 tolerances=Tolerances(slim_atol=0.0, onnx_atol=1e-12))
    with pytest.raises(Exception, match="tolerance|atol"):
        run_export(opts)
    assert (out / "report" / "report.json").read_bytes() == report
    assert _leftovers(out) == []


def test_keyboard_interrupt_mid_run_leaves_no_directory(tiny_model_dir, tiny_masks, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the ONNX stage (after masks, plan and the slim UNet were written to the temp sibling)."""
    reached = []

    def interrupted(run):
        reached.append(sorted(p.name for p in run.tmp.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(oneshot, "stage_onnx", interrupted)
    out = tmp_path / "ctrl-c"
    rc = export_main(["--model", str(tiny_model_dir), "--masks", str(tiny_masks), "--out", str(out), "-q",
                      "--no-validate"])
    assert rc == 130
    assert reached and {"masks.safetensors", "plan.json", "unet"} <= set(reached[0])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert "interrupted" in capsys.readouterr().err


def test_sigterm_mid_run_leaves_no_directory(tiny_model_dir, tiny_masks, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM during the ONNX stage unwinds like Ctrl-C: exit 130, nothing left behind."""
    import os
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(oneshot, "stage_onnx", lambda run: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "sigterm"
    try:
        rc = export_main(["--model", str(tiny_model_dir), "--masks", str(tiny_masks), "--out", str(out), "-q",
                          "--no-validate"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 130
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_trt_without_tensorrt_exits_before_any_work(tmp_path, monkeypatch, capsys):
    from exporter.tensorrt_build import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT is installed here; the missing-TensorRT path cannot be exercised")
    called = []
    monkeypatch.setattr(oneshot, "stage_load", lambda run: called.append(1))
    out = tmp_path / "engines" / "x"
    rc = export_main(["--trt", "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and called == []
    assert len(err) == 1 and "TensorRT" in err[0] and "pip install" in err[0]
    assert not out.parent.exists()


def test_preflight_refusals(tiny_model_dir, tmp_path):
    base = ExportOptions(model=str(tiny_model_dir), out=tmp_path / "o")
    with pytest.raises(ExportError, match="--fp16"):
        oneshot.preflight(replace(base, fp16=True))
    with pytest.raises(ExportError, match="masks file not found"):
        oneshot.preflight(replace(base, masks=tmp_path / "nope.safetensors"))
    with pytest.raises(Exception, match="ratio"):
        oneshot.preflight(replace(base, ratio=1.5))
    with pytest.raises(ExportError, match="model not found"):
        oneshot.preflight(replace(base, model=str(tmp_path / "no-model")))
    for bad in ("loud", "-1", "nan"):
        with pytest.raises(ExportError, match="--beta"):
            oneshot.preflight(replace(base, beta=bad))
    for ok in ("auto", "strong", "12.5"):
        oneshot.preflight(replace(base, beta=ok))
    with pytest.raises(ExportError, match="--retrain-steps"):
        oneshot.preflight(replace(base, retrain_steps=-1))
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ExportError, match="--align"):
            oneshot.preflight(replace(base, align=bad))
    with pytest.raises(ExportError, match="--eval-prompts"):
        oneshot.preflight(replace(base, eval_prompts=tmp_path / "none.json"))
    with pytest.raises(ExportError, match="--prompts file not found"):
        oneshot.preflight(replace(base, prompts=tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ExportError, match="--prompts: .* holds no prompts"):
        oneshot.preflight(replace(base, prompts=tmp_path / "empty.txt"))
    assert not (tmp_path / "o").exists()
    assert issubclass(MissingDependencyError, Exception)


def test_masks_of_another_model_refused_and_nothing_left(tiny_model_dir, tmp_path, capsys):
    import torch

    from uniforget.geometries import TINY, build_unet
    from uniforget.masks import MaskSet
    from uniforget.targets import discover_targets

    other = build_unet(TINY["sd1"], seed=5)
    from uniforget.fingerprint import model_fingerprint

    ms = MaskSet({t.key: torch.zeros(t.size) for t in discover_targets(other)}, model_fingerprint(other))
    f = ms.save(tmp_path / "other.safetensors")
    out = tmp_path / "o"
    rc = export_main(["--model", str(tiny_model_dir), "--masks", str(f), "--out", str(out), "-q", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "learned for model" in err[0]
    assert not out.exists() and _leftovers(out) == []


def test_tune_weights_prunes_the_tuned_copy(tiny_model_dir, tmp_path):
    """--tune-weights: the masks are learned with a tuned copy of the weights, the plan and the slim == gated gate
    are on that copy, and masks from `uniforget learn --tune-weights` are found with their UNet beside them."""
    from exporter.cli import main
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.models import load_pipeline

    base = ExportOptions(model=str(tiny_model_dir), out=tmp_path / "o", tune_weights=1e-3)
    oneshot.preflight(base)  # --beta auto with --tune-weights: the ladder carries the tuned weights
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="drop --masks"):
        oneshot.preflight(replace(base, beta="10", masks=tmp_path / "m.safetensors"))
    with pytest.raises(ExportError, match="--tune-weights must be"):
        oneshot.preflight(replace(base, beta="10", tune_weights=float("nan")))

    original = model_fingerprint(load_pipeline(str(tiny_model_dir)).unet)
    # gates start clamped at 1 (no reconstruction gradient), so the weights move only once some gates open
    res = run_export(replace(base, beta="50", learn_steps=20, validate=False, progress=False))
    ms = MaskSet.load(res.out / "masks.safetensors")
    assert ms.meta["teacher_fingerprint"] == original != ms.model_fingerprint
    assert all(g["passed"] for g in res.parity.values())
    assert "tuned jointly" in json.loads((res.out / "report" / "report.json").read_text())["options"]["masks_source"]

    masks = tmp_path / "learned" / "m.safetensors"
    assert main(["learn", "--model", str(tiny_model_dir), "--out", str(masks), "--beta", "50", "--steps", "4",
                 "--lr", "0.5", "--batch", "2", "--sampler-steps", "1", "--device", "cpu", "--no-progress", "--tune-weights",
                 "1e-3", "--drift-prompts", "0"]) == 0
    assert MaskSet.load(masks).model_fingerprint != original, "the learn run must have tuned the copy"
    again = run_export(replace(base, beta="10", tune_weights=0.0, masks=masks, out=tmp_path / "o2", validate=False,
                               progress=False))
    assert all(g["passed"] for g in again.parity.values())


def test_learned_source_line_names_ladder_close_call_and_tuning():
    """The masks line of the summary: the kept strength, the ladder only under --beta auto, a close call when the
    MaskSet records one, and the jointly tuned weights only when they were tuned."""
    meta = {"beta": 5.0, "calibration_rungs": "{1: 0.1, 5: 0.19}", "calibration_rungs_se": "{1: 0.01, 5: 0.02}",
            "calibration_close_call": "the kept beta 5 drifts 0.19 +- 0.02"}
    auto = oneshot._learned_source(meta, calibrated=True, tuned_lr=None, wall_s=12.4)
    assert auto.startswith("learned here (beta 5.0 chosen by --beta auto from {1: 0.1, 5: 0.19}")
    assert "close call: the kept beta 5" in auto and auto.endswith(", 12 s)") and "tuned" not in auto
    fixed = oneshot._learned_source({"beta": 2.0}, calibrated=False, tuned_lr=1e-4, wall_s=3)
    assert fixed == "learned here (beta 2.0, weights tuned jointly at lr 0.0001, 3 s)"
    clear = oneshot._learned_source({**meta, "calibration_close_call": ""}, calibrated=True, tuned_lr=None, wall_s=1)
    assert "close call" not in clear


def test_loaded_summary_line_repeats_the_recorded_close_call():
    """A MaskSet file learned with --beta auto carries its ladder's close call; the one-shot repeats it."""
    close = {"beta": 5.0, "calibration_close_call": "the kept beta 5 drifts 0.19 +- 0.02"}
    assert oneshot._loaded_summary(Path("m.safetensors"), close) == (
        "loaded m.safetensors (beta 5.0); close call: the kept beta 5 drifts 0.19 +- 0.02")
    assert oneshot._loaded_summary(Path("m.safetensors"), {"beta": 2.0, "calibration_close_call": ""}) == (
        "loaded m.safetensors (beta 2.0)")
