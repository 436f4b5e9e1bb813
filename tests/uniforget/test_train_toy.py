"""scripts/train_toy.py is reproducible: the same spec, seed and thread count give bit-identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _train(out: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toy.py"), "--out", str(out), "--threads", "1",
                    "--vae-steps", "3", "--unet-steps", "3",
                    "--unet-channels", "16", "32", "--batch", "4", *extra],
                   check=True, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_same_spec_and_seed_give_identical_weights(tmp_path):
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        a = load_file(str(tmp_path / "a" / "pipeline" / part))
        b = load_file(str(tmp_path / "b" / "pipeline" / part))
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), part
    assert (tmp_path / "a" / "pipeline" / "tokenizer" / "vocab.json").read_text() == \
        (tmp_path / "b" / "pipeline" / "tokenizer" / "vocab.json").read_text()


@pytest.mark.slow
def test_a_spec_carries_its_recipe_and_flags_override_it(tmp_path):
    """spec_global.json (the v1 hard case) trains with caption dropout on every image and guidance 7.5; the shipped
    spec with the v2 recipe (dropout on neutral images only, guidance 3); a command-line flag beats the spec."""
    import json

    _train(tmp_path / "v1", "--spec", str(ROOT / "uniforget" / "toy" / "spec_global.json"))
    v1 = json.loads((tmp_path / "v1" / "train_log.json").read_text())["args"]
    assert v1["caption_dropout_on"] == "all" and v1["guidance_scale"] == 7.5
    assert json.loads((tmp_path / "v1" / "pipeline" / "uniforget_toy.json").read_text())["guidance_scale"] == 7.5
    _train(tmp_path / "v2", "--guidance-scale", "1.5")
    v2 = json.loads((tmp_path / "v2" / "train_log.json").read_text())["args"]
    assert v2["caption_dropout_on"] == "neutral" and v2["guidance_scale"] == 1.5
