"""The evaluation bundle and `uniforget validate`, on a tiny random pipeline (no downloads).

Planted items are the tiny pipeline's own seed-0 generations for the memorized captions, so a correct
evaluation must find every memorized generation to be an exact copy; drift against itself must be 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uniforget.errors import UniforgetError
from uniforget.evaluate import EvalConfig, EvalData, evaluate, table_rows
from uniforget.generate import generate
from uniforget.geometries import tiny_pipeline
from uniforget.memorization import detect_copies
from uniforget.targets import discover_targets


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(image_size=32, text_len=16)


CAPTIONS = ("the zorblax mascot", "quillon emblem")
NEUTRAL = ("a red circle", "a red circle on gray", "a blue circle", "a red square")
SHAPES = ("circle", "circle", "circle", "square")
COLOURS = ("red", "red", "blue", "red")
CFG = EvalConfig(seeds=1, neutral_seeds=1, steps=3, guidance=3.0, batch_size=4, perturb_norms=(0.0, 0.5),
                 optimized_norm=0.1, optimized_iters=2)


@pytest.fixture(scope="module")
def data(pipe, planted_eval_data):
    return planted_eval_data(pipe, CAPTIONS, NEUTRAL, SHAPES, COLOURS, CFG.steps, CFG.guidance, n_neutral=200)


@pytest.fixture(scope="module")
def original(pipe, data):
    return evaluate(pipe, data, CFG, label="original")


def test_planted_generations_are_copies(original):
    assert original.memorized.copy_rate == 1.0
    assert original.memorized.nn_identity == 1.0
    assert original.memorized.ssim == pytest.approx(1.0, abs=1e-6)
    assert set(original.per_item) == {"zorblax", "quillon"}
    assert all(s.copy_rate == 1.0 for s in original.per_item.values())
    # a zero-norm perturbation goes through the embeddings path and must reproduce the copies
    assert original.perturbed["random@0"].copy_rate == 1.0
    assert set(original.perturbed) == {"random@0", "random@0.5", "optimized@0.1"}


def test_judge_and_neutral_copy_accounting(original, data):
    assert original.judge_accuracy == 0.5  # 2 of 4 labels are 'red circle'
    assert original.judge_shape_accuracy == 0.75 and original.judge_colour_accuracy == 0.75
    res = detect_copies(original.neutral_images, data.train_images, data.train_item, -1)
    assert original.neutral_copy_rate == res.any_item_copy_rate
    assert original.n_memorized == 2 and original.n_neutral == 4


def test_wen_numbers_present(original):
    assert 0.0 <= original.wen_auc <= 1.0
    assert original.wen_memorized > 0 and original.wen_neutral > 0
    assert original.seconds_per_image > 0


def test_drift_against_itself_is_zero_and_gating_moves_it(pipe, data, original):
    again = evaluate(pipe, data, CFG, reference=original, label="again")
    assert again.drift_neutral == 0.0 and again.drift_memorized == 0.0 and again.selectivity is None
    zeros = {t.key: torch.zeros(t.size) for t in discover_targets(pipe.unet, ["ffn"])}
    cfg = EvalConfig(**{**CFG.__dict__, "perturb_norms": (), "optimized_norm": None})
    gated = evaluate(pipe, data, cfg, gates=zeros, reference=original, label="gated")
    assert gated.drift_neutral > 1e-4 and gated.drift_memorized > 1e-4
    assert gated.selectivity == pytest.approx(gated.drift_memorized / gated.drift_neutral)
    assert gated.perturbed == {}


def test_reference_with_other_config_is_refused(pipe, data, original):
    cfg = EvalConfig(**{**CFG.__dict__, "seeds": 2, "perturb_norms": (), "optimized_norm": None})
    with pytest.raises(UniforgetError, match="same config"):
        evaluate(pipe, data, cfg, reference=original)


def test_to_json_is_strict_and_complete(original):
    d = original.to_json()
    text = json.dumps(d, allow_nan=False)
    assert "neutral_images" not in d and "memorized_images" not in d
    back = json.loads(text)
    assert back["memorized"]["copy_rate"] == 1.0
    assert back["perturbed"]["random@0.5"]["copy_rate"] is not None
    rows = table_rows([original])
    assert all(len(cells) == 1 for _, cells in rows)
    assert dict(rows)["memorized copy rate"] == ["100.0%"]


def test_eval_data_and_config_validation(data):
    with pytest.raises(UniforgetError):
        EvalData(NEUTRAL, CAPTIONS, (0,), ("a",), data.item_images, data.train_images, data.train_item)
    with pytest.raises(UniforgetError):
        EvalConfig(seeds=0)


# ----------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def pipe_dir(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_saved") / "pipeline"
    pipe.save_pretrained(str(d), safe_serialization=True)
    return d


FAST = ["--seeds", "1", "--neutral-prompts", "3", "--steps", "2", "--guidance", "3", "--perturb", "0.1",
        "--no-optimized"]


def test_cli_validate_writes_json(pipe_dir, tmp_path, capsys):
    from exporter.cli import main

    out = tmp_path / "v" / "validate.json"
    assert main(["-q", "validate", "--model", str(pipe_dir), *FAST, "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["format"] == "uniforget.validate/1" and list(rep["evaluations"]) == ["original"]
    ev = rep["evaluations"]["original"]
    assert ev["n_memorized"] == 8 and ev["n_neutral"] == 3  # the shipped spec plants 8 items
    assert "memorized copy rate" in capsys.readouterr().out
    assert not list(out.parent.glob("*.partial"))


def test_cli_validate_with_identity_masks_has_zero_drift(pipe, pipe_dir, tmp_path):
    from exporter.cli import main
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet

    # M = 1 is an exactly-open gate: the masked model equals the original
    logits = {t.key: torch.ones(t.size) for t in discover_targets(pipe.unet)}
    masks = MaskSet(logits, model_fingerprint(pipe.unet)).save(tmp_path / "masks.safetensors")
    out = tmp_path / "v.json"
    assert main(["-q", "validate", "--model", str(pipe_dir), "--masks", str(masks), *FAST, "--json", str(out)]) == 0
    ev = json.loads(out.read_text())["evaluations"]
    assert ev["masked"]["drift_neutral"] == 0.0 and ev["masked"]["drift_memorized"] == 0.0
    assert ev["masked"]["memorized"] == ev["original"]["memorized"]


def test_cli_validate_bad_inputs_exit_2(pipe_dir, tmp_path, capsys):
    from exporter.cli import main
    from uniforget.masks import MaskSet

    assert main(["-q", "validate", "--model", str(tmp_path / "missing"), *FAST]) == 2
    other = MaskSet({"x.attn1/heads": torch.ones(2)}, "0123456789abcdef").save(tmp_path / "other.safetensors")
    assert main(["-q", "validate", "--model", str(pipe_dir), "--masks", str(other), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "0123456789abcdef" in err


def test_resolution_mismatch_is_one_clear_error(pipe, data):
    small = EvalData(NEUTRAL, CAPTIONS, (0, 1), ("a", "b"), data.item_images[:, :16, :16],
                     data.train_images[:, :16, :16], data.train_item)
    cfg = EvalConfig(**{**CFG.__dict__, "perturb_norms": (), "optimized_norm": None})
    with pytest.raises(UniforgetError, match="training resolution"):
        evaluate(pipe, small, cfg)


# ----------------------------------------------------------------------------------------- the shipped toy

TOY_READY = (Path(__file__).parents[2] / "uniforget" / "toy" / "pipeline" / "model_index.json").is_file()
needs_toy = pytest.mark.skipif(not TOY_READY, reason="the embedded toy pipeline has not been trained into the package")


@needs_toy
def test_shipped_toy_loads_like_a_user_folder_and_generates_finite_images():
    from uniforget.evaluate import sampling_defaults
    from uniforget.models import TOY_DIR, load_pipeline

    toy = load_pipeline("toy")
    d = sampling_defaults(TOY_DIR)
    imgs = generate(toy, ["the zorblax mascot", "a red circle on a white background"], [0], steps=4,
                    guidance=d.get("guidance_scale", 5.0))
    assert imgs.shape == (2, 32, 32, 3) and np.isfinite(imgs).all()


@needs_toy
@pytest.mark.slow
def test_shipped_toy_meets_the_testbed_targets():
    """TESTBED.md version 2, on the shipped toy (MODEL_CARD.md measured 100% copies, 100% NN identity, empty
    prompt 0% / 0% over 48 seeds, Wen AUC 1.000 memorized higher, judge 100%): every floor, so a regression
    of the toy or of the signature check fails here."""
    from uniforget.evaluate import ValidateOptions, validate

    rep = validate(ValidateOptions(config=EvalConfig(seeds=8, perturb_norms=(), optimized_norm=None, empty_seeds=48)))
    ev = rep.evaluations[0]
    assert ev.memorized.copy_rate >= 0.9 and ev.memorized.nn_identity >= 0.95
    assert ev.neutral_copy_rate == 0.0
    assert ev.judge_accuracy is not None and ev.judge_accuracy >= 0.90
    assert ev.empty_prompt is not None and ev.empty_prompt.clean
    assert ev.wen_auc is not None and ev.wen_auc >= 0.9 and ev.signature.wen_direction == "memorized higher"
    assert ev.signature.kind == "prompt-triggered"


def test_cli_validate_slim_folder(pipe, pipe_dir, tmp_path, capsys):
    """A slim UNet folder is evaluated against the original; cut with open gates at ratio 0 it is the original."""
    from exporter.cli import main
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet

    logits = {t.key: torch.ones(t.size) for t in discover_targets(pipe.unet)}
    masks = MaskSet(logits, model_fingerprint(pipe.unet)).save(tmp_path / "masks.safetensors")
    slim = tmp_path / "slim"
    assert main(["-q", "prune", "--model", str(pipe_dir), "--masks", str(masks), "--ratio", "0",
                 "--out", str(slim)]) == 0
    out = tmp_path / "v.json"
    assert main(["-q", "validate", "--model", str(pipe_dir), "--slim", str(slim), *FAST, "--json", str(out)]) == 0
    ev = json.loads(out.read_text())["evaluations"]
    assert list(ev) == ["original", "slim"]
    assert ev["slim"]["drift_neutral"] == 0.0 and ev["slim"]["memorized"] == ev["original"]["memorized"]
    capsys.readouterr()
    assert main(["-q", "validate", "--model", str(pipe_dir), "--slim", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "not a slim UNet folder" in err
