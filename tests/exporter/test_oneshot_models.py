"""The one-shot on the checkpoints users hold: a single original-layout file, and an SDXL pipeline folder."""

from __future__ import annotations

import shutil

import pytest
import torch

from exporter.cli import export_main
from uniforget.geometries import tiny_pipeline

PIPELINE_FILES = ("onnx/unet.onnx", "onnx/pipeline/model_index.json", "onnx/pipeline/text_encoder/model.onnx",
                  "onnx/pipeline/unet/model.onnx", "onnx/pipeline/vae_decoder/model.onnx", "unet/uniforget_plan.json")


def _random_masks(unet, path):
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.targets import discover_targets

    g = torch.Generator().manual_seed(3)
    logits = {t.key: torch.randn(t.size, generator=g) * 2 + 1 for t in discover_targets(unet)}
    return MaskSet(logits=logits, model_fingerprint=model_fingerprint(unet), meta={"beta": "test"}).save(path)


def test_single_file_checkpoint_runs_through(tiny_model_dir, tiny_pipe, tiny_masks, tmp_path, monkeypatch, capsys):
    """The file holds the folder's weights: the folder's MaskSet (fingerprint-checked) applies to it."""
    from uniforget import single_file
    from uniforget.ldm_layout import save_original

    root = tmp_path / "configs"
    shutil.copytree(tiny_model_dir, root / "sd1")  # stands in for the shipped full-size SD1 configs
    monkeypatch.setattr(single_file, "CONFIGS", root)
    f = save_original(tiny_pipe, "sd1", tmp_path / "v1-tiny-emaonly.safetensors")
    out = tmp_path / "out"
    rc = export_main(["--model", str(f), "--masks", str(tiny_masks), "--ratio", "0.05", "--out", str(out), "-q",
                      "--no-validate"])
    assert rc == 0, capsys.readouterr().err
    for rel in PIPELINE_FILES:
        assert (out / rel).is_file(), rel


@pytest.mark.parametrize("geometry", ["sdxl"])
def test_sdxl_folder_exports_the_whole_pipeline(geometry, tmp_path, capsys):
    pipe = tiny_pipeline(geometry, image_size=16, scheduler="euler")
    folder = tmp_path / "sdxl"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    masks = _random_masks(pipe.unet, tmp_path / "masks.safetensors")
    out = tmp_path / "out"
    rc = export_main(["--model", str(folder), "--masks", str(masks), "--ratio", "0.05", "--out", str(out), "-q",
                      "--no-validate"])
    assert rc == 0, capsys.readouterr().err
    for rel in (*PIPELINE_FILES, "onnx/pipeline/text_encoder_2/model.onnx", "onnx/pipeline/tokenizer_2/vocab.json"):
        assert (out / rel).is_file(), rel


def test_sdxl_single_file_learns_and_runs_through(tmp_path, monkeypatch, capsys):
    """An SDXL checkpoint in the original layout: mask learning and the one-shot both take the file."""
    from exporter.cli import main
    from uniforget import single_file
    from uniforget.ldm_layout import save_original

    pipe = tiny_pipeline("sdxl", image_size=16, scheduler="euler")
    pipe.save_pretrained(str(tmp_path / "configs" / "sdxl"), safe_serialization=True)
    monkeypatch.setattr(single_file, "CONFIGS", tmp_path / "configs")  # stands in for the full-size SDXL configs
    f = save_original(pipe, "sdxl", tmp_path / "sd_xl_tiny.safetensors", dtype=torch.float16)
    masks = tmp_path / "masks.safetensors"
    rc = main(["learn", "--model", str(f), "--beta", "1", "--steps", "2", "--sampler-steps", "2", "--batch", "2",
               "--out", str(masks), "--no-progress"])
    assert rc == 0 and masks.is_file(), capsys.readouterr().err
    out = tmp_path / "out"
    rc = export_main(["--model", str(f), "--masks", str(masks), "--ratio", "0.05", "--out", str(out), "-q",
                      "--no-validate"])
    assert rc == 0, capsys.readouterr().err
    for rel in (*PIPELINE_FILES, "onnx/pipeline/text_encoder_2/model.onnx"):
        assert (out / rel).is_file(), rel
