"""Model loading: the toy goes through the user-folder path; bad input is one clear ModelLoadError; no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from uniforget.errors import ModelLoadError
from uniforget.models import TOY_DIR, load_pipeline, resolve_model_path


def test_toy_resolves_to_embedded_folder():
    assert resolve_model_path("toy") == TOY_DIR
    assert resolve_model_path(None) == TOY_DIR


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found"):
        load_pipeline(tmp_path / "nope")


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_pipeline_without_unet(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ModelLoadError, match="no 'unet' component"):
        load_pipeline(tmp_path)


def test_broken_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoint_refused_without_flag(tmp_path, suffix):
    f = tmp_path / f"model{suffix}"
    torch.save({"a": torch.zeros(1)}, f)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_pipeline(f)


def test_wrong_file_type(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("not a model")
    with pytest.raises(ModelLoadError, match="unsupported model file type"):
        load_pipeline(f)


def test_bad_safetensors_file_is_one_line(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(f)
    assert "\n" not in str(e.value)


def test_cli_bad_model_exits_2(tmp_path, capsys):
    from exporter.cli import main

    rc = main(["validate", "--model", str(tmp_path / "missing")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model not found")
