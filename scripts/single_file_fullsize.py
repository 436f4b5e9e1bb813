"""Full-size single-file loads, offline, against the diffusers UNet folder each file was made from.

Why: the default tests load tiny files; this proves the shipped SD1.5 / SD2.1-768-v / SDXL-base configs load
real-size original-layout files (random weights, no download) to exactly the UNet tensors that were written,
and measures the load time. One process per config keeps the peak memory readable:

    OMP_NUM_THREADS=1 python scripts/single_file_fullsize.py sd1 --work /tmp/sf
    OMP_NUM_THREADS=1 python scripts/single_file_fullsize.py sd2-v --work /tmp/sf
    OMP_NUM_THREADS=1 python scripts/single_file_fullsize.py sdxl --dtype float16 --work /tmp/sf

Prints one JSON line: file size, write and load seconds (load: the file was just written, so it is in the
page cache; touch: reading every weight page once afterwards), tensors compared, mismatches, peak RSS.
`--drop-cache` first evicts the file from the page cache (posix_fadvise) for a cold-read load time.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from uniforget.ldm_layout import save_original
from uniforget.single_file import CONFIGS, inspect_checkpoint, load_single_file

FILE_NAMES = {"sd1": "v1-5-random-emaonly.safetensors", "sd2-v": "v2-1_768-random-ema-pruned.safetensors",
              "sd2-base": "v2-1_512-random-ema-pruned.safetensors", "sdxl": "sd_xl_base_random.safetensors"}
FAMILY = {"sd1": "sd1", "sd2-v": "sd2", "sd2-base": "sd2", "sdxl": "sdxl"}


def random_pipeline(config: str, dtype: torch.dtype, seed: int = 0) -> SimpleNamespace:
    """The shipped config's UNet, VAE and text encoder(s) with N(0, 0.02) weights, built without a float32 copy."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = CONFIGS / config
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder"))}
        if (d / "text_encoder_2").is_dir():
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2"))
    g = torch.Generator().manual_seed(seed)
    for m in parts.values():
        m.to(dtype).to_empty(device="cpu")  # cast on meta: no float32 copy of SDXL
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            for name, b in m.named_buffers():  # to_empty left them uninitialized; CLIP's are its position ids
                if not name.endswith("position_ids"):
                    raise RuntimeError(f"{type(m).__name__}.{name}: no rule to initialize this buffer")
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return SimpleNamespace(**parts)


def main() -> None:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", choices=sorted(FILE_NAMES))
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="weights in the file and as loaded (SDXL fp32 needs ~28 GB for both copies)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/single_file_fullsize"))
    ap.add_argument("--keep", action="store_true", help="keep the written files")
    ap.add_argument("--drop-cache", action="store_true", help="evict the file from the page cache before loading")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    work = args.work / args.config
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    t0 = time.perf_counter()
    pipe = random_pipeline(args.config, dtype)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.unet.save_pretrained(work / "unet")  # the diffusers folder the file is made from
    f = save_original(pipe, FAMILY[args.config], work / FILE_NAMES[args.config])
    write_s = time.perf_counter() - t0
    del pipe
    gc.collect()

    if args.drop_cache:
        import os

        with f.open("rb") as fh:
            os.fsync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    info = inspect_checkpoint(f)
    t0 = time.perf_counter()
    loaded = load_single_file(f, torch_dtype=dtype)
    load_s = time.perf_counter() - t0
    # safetensors maps the file: pages are read on first use, so also time touching every weight once
    t0 = time.perf_counter()
    with torch.no_grad():
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            for p in getattr(loaded, part, torch.nn.Identity()).parameters():
                p.view(-1)[:: max(1, 4096 // p.element_size())].sum()  # one element per page
    touch_s = time.perf_counter() - t0

    from safetensors import safe_open

    got = loaded.unet.state_dict()
    bad, n = [], 0
    with safe_open(str(work / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as ref:
        for k in ref.keys():
            n += 1
            if k not in got or not torch.equal(ref.get_tensor(k), got[k]):
                bad.append(k)
    out = {"config": args.config, "detected": info.config, "prediction_type": info.prediction_type,
           "pipeline": type(loaded).__name__, "dtype": args.dtype, "file_gb": round(f.stat().st_size / 1e9, 2),
           "build_s": round(build_s, 1), "write_s": round(write_s, 1), "load_s": round(load_s, 1),
           "touch_s": round(touch_s, 1),
           "pad_tokens": [getattr(loaded, t).pad_token for t in ("tokenizer", "tokenizer_2") if hasattr(loaded, t)],
           "unet_tensors": n, "unet_tensors_in_model": len(got), "mismatched": len(bad), "first_mismatch": bad[:3],
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}
    print(json.dumps(out))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if bad or n != len(got) or info.config != args.config:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
