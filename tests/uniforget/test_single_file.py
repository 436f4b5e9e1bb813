"""Single-file checkpoints offline: family detection from the header, shipped configs, same weights as the folder.

Tiny random pipelines are written in the original (LDM/SGM) key layout by `uniforget.ldm_layout`; loading the
file must give back every tensor of the folder it came from. Full-size shapes are checked on the meta device.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from uniforget.errors import ModelLoadError
from uniforget.geometries import tiny_pipeline
from uniforget.ldm_layout import pipeline_to_original, save_original
from uniforget.models import load_pipeline
from uniforget.single_file import (
    CLIP_TOKENIZER,
    CONFIGS,
    detect_family,
    inspect_checkpoint,
    load_single_file,
    read_safetensors_header,
)

FAMILIES = {"sd1": "sd1", "sd2": "sd2-v", "sdxl": "sdxl"}  # family -> the config folder it loads with


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per family: the tiny pipeline, a configs root holding its folder under the shipped name, and its file."""
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for family, config in FAMILIES.items():
        pipe = tiny_pipeline(family)
        pipe.save_pretrained(root / "configs" / config)
        if family == "sd2":  # the same tiny geometry stands in for the 512-base folder too
            pipe.save_pretrained(root / "configs" / "sd2-base")
        out[family] = (pipe, root / "configs", save_original(pipe, family, root / f"{family}.safetensors"))
    return out


def _same(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(set(sa) ^ set(sb)) + [k for k in sa if k in sb and not torch.equal(sa[k], sb[k].to(sa[k].dtype))]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_file_loads_to_the_folder_it_was_made_from(tiny, family):
    pipe, root, f = tiny[family]
    info = inspect_checkpoint(f)
    assert (info.family, info.config, info.dtype, info.has_raw_and_ema) == (family, FAMILIES[family], "float32", False)
    loaded = load_single_file(f, configs_root=root)
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for part in parts:
        assert _same(getattr(pipe, part), getattr(loaded, part)) == [], part
    assert type(loaded).__name__ == type(pipe).__name__


def test_config_override_loads_from_a_diffusers_folder(tiny):
    pipe, root, f = tiny["sd1"]
    loaded = load_pipeline(f, config=root / "sd1")
    assert _same(pipe.unet, loaded.unet) == []


def test_fp16_file_loads_as_float32_with_the_rounded_weights(tiny, tmp_path):
    pipe, root, _ = tiny["sdxl"]
    f = save_original(pipe, "sdxl", tmp_path / "half.safetensors", dtype=torch.float16)
    assert inspect_checkpoint(f).dtype == "float16"
    loaded = load_single_file(f, configs_root=root)
    w = dict(loaded.unet.named_parameters())["conv_in.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, pipe.unet.conv_in.weight.half().float())
    half = load_single_file(f, configs_root=root, torch_dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16


def test_raw_and_ema_checkpoint_loads_the_ema_copy(tiny, tmp_path):
    pipe, root, _ = tiny["sd1"]
    f = save_original(pipe, "sd1", tmp_path / "train.safetensors", ema_only=False)
    assert inspect_checkpoint(f).has_raw_and_ema
    assert _same(pipe.unet, load_single_file(f, configs_root=root).unet) == []


@pytest.mark.parametrize("name, yaml, override, want", [
    ("v2-1_768-ema-pruned.safetensors", None, None, ("v_prediction", "sd2-v", "file name")),
    ("v2-1_512-ema-pruned.safetensors", None, None, ("epsilon", "sd2-base", "file name")),
    ("model.safetensors", 'model:\n  params:\n    parameterization: "v"\n', None, ("v_prediction", "sd2-v", "sidecar yaml")),
    ("model_768.safetensors", "model:\n  params:\n    linear_start: 0.00085\n", None,
     ("epsilon", "sd2-base", "sidecar yaml")),
    ("v2-1_768.safetensors", None, "epsilon", ("epsilon", "sd2-base", "override")),
    ("model.safetensors", None, None, ("v_prediction", "sd2-v", "default")),
])
def test_sd2_prediction_type(tiny, tmp_path, name, yaml, override, want, caplog):
    _, _, src = tiny["sd2"]
    f = tmp_path / name
    f.write_bytes(src.read_bytes())
    if yaml is not None:
        f.with_suffix(".yaml").write_text(yaml)
    with caplog.at_level(logging.WARNING, logger="uniforget.single_file"):
        info = inspect_checkpoint(f, prediction_type=override)
    assert (info.prediction_type, info.config, info.prediction_source) == want
    assert ("assuming v-prediction" in caplog.text) == (want[2] == "default")


def test_prediction_override_reaches_the_scheduler(tiny):
    _, root, f = tiny["sd1"]
    pipe = load_single_file(f, configs_root=root, prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ModelLoadError, match="prediction type must be one of"):
        inspect_checkpoint(f, prediction_type="flow")


def test_tiny_file_against_shipped_configs_names_the_mismatch(tiny):
    _, _, f = tiny["sd1"]
    with pytest.raises(ModelLoadError, match="cross-attention width 48, but the config .* expects 768"):
        load_single_file(f)


def _write(path, keys: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    return path


@pytest.mark.parametrize("keys, looks_like", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (8, 4)}, "a LoRA"),
    ({"unet.down_blocks.0.attn.to_q.lora_A.weight": (4, 8)}, "a LoRA"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3),
      "quant_conv.weight": (8, 8, 1, 1)}, "a VAE alone"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,), "single_blocks.0.linear1.weight": (8, 8)},
     "a FLUX transformer"),
    ({"conv_in.weight": (8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)},
     "a diffusers-format UNet weights file"),
    ({"text_model.embeddings.token_embedding.weight": (10, 8)}, "a CLIP text encoder alone"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3),
      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 16)},
     "an inpainting UNet"),
    ({"foo.bar": (2,)}, "does not look like a Stable Diffusion checkpoint"),
])
def test_other_kinds_of_file_get_one_line_naming_them(tmp_path, keys, looks_like):
    f = _write(tmp_path / "thing.safetensors", keys)
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(f)
    assert looks_like in str(e.value) and "\n" not in str(e.value)


def test_cli_lora_file_exits_2_with_one_line(tmp_path, capsys):
    from exporter.cli import main

    f = _write(tmp_path / "style.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (8, 4)})
    rc = main(["validate", "--model", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "looks like a LoRA" in err[0]


def test_header_reader_refuses_garbage(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        read_safetensors_header(f)


def test_shipped_tokenizer_is_clips():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER))
    assert len(tok) == 49408 and tok.model_max_length == 77
    # ids of CLIP ViT-L/14's tokenizer (as in every SD1.x/SD2.x/SDXL tokenizer folder)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407
    assert CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER), pad_token="!").pad_token_id == 0


def _meta_pipeline(config: str) -> tuple[dict, dict]:
    """Full-size modules of a shipped config on the meta device: {part: module}, {part: config dict}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = CONFIGS / config
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder"))}
        if (d / "text_encoder_2").is_dir():
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2"))
    return parts, {k: json.loads((d / k / "config.json").read_text()) for k in parts}


@pytest.mark.parametrize("config, family, params", [
    ("sd1", "sd1", 859_520_964), ("sd2-v", "sd2", 865_910_724), ("sd2-base", "sd2", 865_910_724),
    ("sdxl", "sdxl", 2_567_463_684),
])
def test_shipped_configs_are_the_real_geometries(config, family, params):
    """Parameter counts of the published UNets; their original-layout shapes are detected and convert back."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    parts, cfgs = _meta_pipeline(config)
    assert sum(p.numel() for p in parts["unet"].parameters()) == params
    pipe = SimpleNamespace(**parts)
    sd = pipeline_to_original(pipe, family)
    assert detect_family({k: tuple(v.shape) for k, v in sd.items()}) == (family, cfgs["unet"]["cross_attention_dim"])
    for part, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        back = convert(sd, cfgs[part])
        want = {k: tuple(v.shape) for k, v in parts[part].state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items()} == want, part


def test_trusted_pickle_checkpoint_loads_with_allow_pickle(tiny, tmp_path):
    pipe, root, _ = tiny["sd1"]
    f = tmp_path / "model.ckpt"
    torch.save({"state_dict": pipeline_to_original(pipe, "sd1"), "global_step": 1}, f)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_pipeline(f)
    assert inspect_checkpoint(f, allow_pickle=True).family == "sd1"
    assert _same(pipe.unet, load_single_file(f, configs_root=root, allow_pickle=True).unet) == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bookkeeping_tensors_of_real_files_are_ignored(tiny, tmp_path, family):
    """Released files also hold the noise schedule, EMA counters, CLIP position ids and logit scales."""
    pipe, root, _ = tiny[family]
    sd = pipeline_to_original(pipe, family)
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1, dtype=torch.int32),
               "alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000)})
    text = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model.",
            "sdxl": "conditioner.embedders.0.transformer."}[family]
    if family == "sd2":
        sd[text + "logit_scale"] = torch.tensor(4.6)
    else:
        sd[text + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    f = tmp_path / "real.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    assert not inspect_checkpoint(f).has_raw_and_ema
    assert _same(pipe.unet, load_single_file(f, configs_root=root).unet) == []


@pytest.mark.parametrize("config, family, pads", [("sd1", "sd1", {"tokenizer": "<|endoftext|>"}),
                                                  ("sd2-v", "sd2", {"tokenizer": "!"}),
                                                  ("sdxl", "sdxl", {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"})])
def test_shipped_configs_get_the_shipped_tokenizers(config, family, pads):
    """OpenCLIP-trained encoders (SD2.x, SDXL's second) pad with '!' (id 0); CLIP-L pads with its end token."""
    from uniforget.single_file import shipped_tokenizers

    toks = shipped_tokenizers(CONFIGS / config, family)
    assert {k: t.pad_token for k, t in toks.items()} == pads
    assert all(len(t) == 49408 and t.model_max_length == 77 for t in toks.values())


@pytest.fixture
def clean_defaults():
    from uniforget import models

    models._SINGLE_FILE_DEFAULTS.clear()
    yield
    models._SINGLE_FILE_DEFAULTS.clear()


def test_cli_model_config_reaches_every_stage(tiny, tmp_path, capsys, clean_defaults):
    """`--model-config DIR` (a top-level option) makes a stage load the file with that folder's configs: the
    tiny file does not fit the shipped full-size configs, so without it the same command is refused."""
    from exporter.cli import main
    from uniforget.fingerprint import model_fingerprint
    from uniforget.masks import MaskSet
    from uniforget.targets import discover_targets

    pipe, root, f = tiny["sd1"]
    masks = MaskSet({t.key: torch.ones(t.size) for t in discover_targets(pipe.unet)},
                    model_fingerprint(pipe.unet)).save(tmp_path / "m.safetensors")
    cmd = ["prune", "--model", str(f), "--masks", str(masks), "--ratio", "0"]
    assert main(["-q", *cmd, "--out", str(tmp_path / "a")]) == 2
    capsys.readouterr()
    assert main(["-q", "--model-config", str(root / "sd1"), *cmd, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b").is_dir()
    capsys.readouterr()
    assert main(["-q", "--model-config", str(tmp_path), *cmd, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a diffusers pipeline folder" in err[0] and not (tmp_path / "c").exists()
