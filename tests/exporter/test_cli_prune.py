"""`uniforget plan` / `uniforget prune` end to end: real files in, slim UNet out, one-line errors, exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from exporter.cli import main
from uniforget.fingerprint import model_fingerprint
from uniforget.geometries import TINY, build_unet, example_inputs, tiny_pipeline
from uniforget.masks import MaskSet
from uniforget.plan import PruningPlan
from uniforget.slim_io import load_slim_unet
from uniforget.targets import discover_targets


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A diffusers UNet folder, a pipeline folder holding the same UNet, and a MaskSet for it."""
    root = tmp_path_factory.mktemp("cli")
    unet = build_unet(TINY["sd1"], seed=0)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    tiny_pipeline(unet=unet).save_pretrained(root / "pipe", safe_serialization=True)
    g = torch.Generator().manual_seed(0)
    logits = {}
    for t in discover_targets(unet):
        m = torch.rand(t.size, generator=g) * 1.9 - 0.45
        m[0] = -0.3
        logits[t.key] = m
    MaskSet(logits, model_fingerprint(unet), meta={"beta": "2.0"}).save(root / "masks.safetensors")
    return root, unet


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_plan_writes_plan_json(files, tmp_path, capsys):
    root, unet = files
    out = tmp_path / "plan.json"
    rc = main(["-q", "plan", "--unet", str(root / "unet"), "--masks", str(root / "masks.safetensors"),
               "--ratio", "0.05", "--out", str(out), "--ref-size", "8", "--ref-seq", "7"])
    assert rc == 0
    plan = PruningPlan.load(out)
    assert plan.ratio_requested == 0.05 and plan.ratio_achieved >= 0.05
    assert plan.model_fingerprint == model_fingerprint(unet)
    assert plan.reference_shape.height == 8 and plan.flops_after < plan.flops_before
    assert plan.maskset_meta["beta"] == "2.0"
    stdout = capsys.readouterr().out
    assert "parameters" in stdout and "ffn units" in stdout


def test_prune_from_pipeline_folder(files, tmp_path, capsys):
    root, unet = files
    out = tmp_path / "slim"
    rc = main(["-q", "prune", "--model", str(root / "pipe"), "--masks", str(root / "masks.safetensors"),
               "--ratio", "auto", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "parameters" in stdout and "parity slim vs gated" in stdout
    slim = load_slim_unet(out)
    plan = PruningPlan.load(out / "uniforget_plan.json")
    assert sum(p.numel() for p in slim.parameters()) == plan.params_after < plan.params_before
    from uniforget.prune import check_parity

    res = check_parity(unet, slim, plan, example_inputs(unet, batch=2, height=16, width=16, seed=5))
    assert res, res


def test_prune_with_existing_plan(files, tmp_path, capsys):
    root, _ = files
    plan_path = tmp_path / "plan.json"
    assert main(["-q", "plan", "--unet", str(root / "unet"), "--masks", str(root / "masks.safetensors"),
                 "--ratio", "0.1", "--out", str(plan_path)]) == 0
    out = tmp_path / "slim"
    assert main(["-q", "prune", "--unet", str(root / "unet"), "--plan", str(plan_path), "--out", str(out)]) == 0
    assert json.loads((out / "uniforget_plan.json").read_text()) == json.loads(plan_path.read_text())


@pytest.mark.parametrize("ratio", ["nan", "1", "-0.2", "lots", "0.99"])
def test_bad_ratio_is_one_line_exit_2(files, tmp_path, capsys, ratio):
    root, _ = files
    out = tmp_path / "slim"
    rc = main(["-q", "prune", "--unet", str(root / "unet"), "--masks", str(root / "masks.safetensors"),
               "--ratio", ratio, "--out", str(out)])
    assert rc == 2
    assert "ratio" in _err_line(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_out_and_bad_inputs(files, tmp_path, capsys):
    root, _ = files
    masks = str(root / "masks.safetensors")
    (tmp_path / "taken").mkdir()
    base = ["-q", "prune", "--unet", str(root / "unet"), "--ratio", "auto"]
    assert main([*base, "--masks", masks, "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in _err_line(capsys)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert main([*base, "--masks", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o")]) == 2
    _err_line(capsys)
    assert main([*base, "--out", str(tmp_path / "o")]) == 2  # neither --masks nor --plan
    assert "--masks" in _err_line(capsys)
    assert main(["-q", "prune", "--unet", str(tmp_path), "--masks", masks, "--ratio", "auto",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a diffusers UNet folder" in _err_line(capsys)
    assert not (tmp_path / "o").exists()


def test_masks_for_another_model(files, tmp_path, capsys):
    root, _ = files
    other = build_unet(TINY["sd1"], seed=3)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    rc = main(["-q", "plan", "--unet", str(tmp_path / "other"), "--masks", str(root / "masks.safetensors"),
               "--ratio", "auto", "--out", str(tmp_path / "p.json")])
    assert rc == 2 and "learned for model" in _err_line(capsys)


def test_prune_align_option(files, tmp_path, capsys):
    """--align 8 (default) rounds kept widths with zero-gated units and still passes slim == gated; --align 1 is
    exact; --align 0 is refused in one line before the model loads."""
    root, unet = files
    base = ["-q", "prune", "--unet", str(root / "unet"), "--masks", str(root / "masks.safetensors"), "--ratio",
            "auto"]
    assert main([*base, "--out", str(tmp_path / "a8")]) == 0, capsys.readouterr().err
    assert main([*base, "--align", "1", "--out", str(tmp_path / "a1")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    a8, a1 = (PruningPlan.load(tmp_path / d / "uniforget_plan.json") for d in ("a8", "a1"))
    assert a8.align == 8 and a1.align == 1
    assert a8.params_after > a1.params_after  # the padding is real weights
    for t in a8.targets:  # heads here are 8 or 16 wide, so any head count is aligned; neurons/channels are 1
        if t.kind != "heads":
            assert len(t.kept) == t.size or len(t.kept) % 8 == 0, (t.key, len(t.kept))
    eff8, eff1 = a8.effective_gates(), a1.effective_gates()
    assert all(torch.equal(eff8[k], eff1[k]) for k in eff8)  # same model, other widths
    from uniforget.prune import check_parity

    slim8 = load_slim_unet(tmp_path / "a8")
    assert check_parity(unet, slim8, a8, example_inputs(unet, batch=1, height=8, width=8, seed=2))
    with pytest.raises(SystemExit) as e:  # refused by argparse, naming the option
        main([*base, "--align", "0", "--out", str(tmp_path / "a0")])
    assert e.value.code == 2
    assert "--align" in _err_line(capsys) and not (tmp_path / "a0").exists()
