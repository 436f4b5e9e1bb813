#!/usr/bin/env python
"""Per-image latency of the whole text-to-image pipeline, four ways, in one interleaved run on the same seeds.

    OMP_NUM_THREADS=1 python scripts/bench_e2e.py --model toy                       # the embedded toy, 20 steps
    OMP_NUM_THREADS=1 python scripts/bench_e2e.py --model sd15 --size 8 --steps 20 --rounds 4   # SD1.5 geometry

What runs, each with `--threads` intra-op threads (torch and ONNX Runtime alike), prompt + classifier-free
guidance, batch 1, the same initial latents per round (drawn from the round's seed the way the ONNX pipeline and
the Triton model draw them):
- `diffusers`: the torch pipeline, eager, under `torch.inference_mode`;
- `ort`: the project's NumPy/ONNX Runtime pipeline (exporter.onnx_pipeline) on the exported folder;
- `optimum`: optimum's `ORTStableDiffusionPipeline` on the *same* exported folder, in its own environment
  (`.venv-optimum`, scripts/setup_optimum_env.sh; optimum pins a transformers that our diffusers cannot share),
  as a worker process that times its own pipeline call;
- `triton`: a real tritonserver (`.venv-triton`, scripts/setup_triton_env.sh) serving the repository's pipeline
  model, timed at the HTTP client over loopback.
A variant whose environment is missing is left out and said so.

Each round calls every variant once, in an order rotated round by round so no variant always goes first.
Ratios are per-round paired (variant_i / ort_i), reported as a median with a 95% bootstrap interval
(exporter.bench.ratio_estimate) and "within noise" when the interval contains 1. Images are compared too:
each variant's against the ORT pipeline's (max abs pixel difference in [0, 1]).

`--model sd15` is SD1.5's geometry with random N(0, 0.02) weights (UNet, VAE, CLIP-L text encoder from the
shipped configs, the shipped CLIP tokenizer, DDIM on SD's schedule) at a `--size` x `--size` latent; every
weight shape is SD1.5's, only the latent is small so that a round takes seconds, not minutes. It needs ~18 GB of
RAM: four copies of the 4.3 GB fp32 pipeline are resident at once (torch, ORT, optimum, Triton).
Writes `--json` (default runs/bench_e2e_<model>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPTIMUM_PY = ROOT / ".venv-optimum" / "bin" / "python"
VARIANTS = ("diffusers", "ort", "optimum", "triton")

# The optimum worker: loads the folder once, then answers one JSON request per line with the call's wall time.
OPTIMUM_WORKER = textwrap.dedent("""
    import json, sys, time
    import numpy as np, onnxruntime as ort, torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    folder, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    t0 = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, export=False, session_options=so)
    pipe.set_progress_bar_config(disable=True)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0,
                      "scheduler": type(pipe.scheduler).__name__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        lat = torch.from_numpy(np.load(req["latents"]))
        t = time.perf_counter()
        img = pipe(req["prompt"], num_inference_steps=req["steps"], guidance_scale=req["guidance_scale"],
                   latents=lat, output_type="np").images
        ms = (time.perf_counter() - t) * 1e3
        np.save(req["out"], np.asarray(img, dtype=np.float32))
        print(json.dumps({"ms": ms}), flush=True)
""")


def sd15_pipeline(size: int) -> Any:
    """SD1.5-geometry StableDiffusionPipeline with random weights and a `size` x `size` latent (see the docstring)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from single_file_fullsize import random_pipeline

    from uniforget.geometries import SD_SCHEDULE
    from uniforget.single_file import CONFIGS, shipped_tokenizers

    parts = random_pipeline("sd1", torch.float32)
    parts.unet.register_to_config(sample_size=size)
    pipe = StableDiffusionPipeline(
        vae=parts.vae.eval(), text_encoder=parts.text_encoder.eval(), unet=parts.unet.eval(),
        scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        **shipped_tokenizers(CONFIGS / "sd1", "sd1"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class OptimumWorker:
    """optimum's pipeline in `.venv-optimum`, one request per line over pipes."""

    def __init__(self, folder: Path, threads: int, work: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        # its own empty cwd: a folder named like a package there (the Triton repository, `triton/`) would shadow it
        self.work = work / "optimum_worker"
        self.work.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([str(OPTIMUM_PY), "-c", OPTIMUM_WORKER, str(folder.resolve()), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.work / "optimum.log", "w"),
                                     text=True, env=env, cwd=self.work)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"optimum worker died: {(self.work / 'optimum.log').read_text()[-2000:]}")
        return json.loads(line)

    def __call__(self, prompt: str, steps: int, guidance_scale: float, latents: np.ndarray) -> tuple[float, np.ndarray]:
        np.save(self.work / "lat.npy", latents)
        out = self.work / "optimum.npy"
        self.proc.stdin.write(json.dumps({"prompt": prompt, "steps": steps, "guidance_scale": guidance_scale,
                                          "latents": str(self.work / "lat.npy"), "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["ms"]), np.load(out)[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def summarize(ms: list[float]) -> dict[str, float]:
    q = np.percentile(ms, [10, 50, 90])
    return {"median_ms": float(q[1]), "p10_ms": float(q[0]), "p90_ms": float(q[2]), "n": len(ms)}


def main() -> int:
    from exporter.cli import quiet_library_warnings

    quiet_library_warnings()  # the libraries' optional-backend notes are not this script's output
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="toy, sd15 (random SD1.5 geometry) or a diffusers folder")
    ap.add_argument("--size", type=int, default=8, help="latent size for --model sd15 (8: 64 px images)")
    ap.add_argument("--prompt", default="a red square on a blue background")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ONNX Runtime, everywhere")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--work", type=Path, help="folder for the exported pipeline and repository (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="result file (default runs/bench_e2e_<model>.json)")
    args = ap.parse_args()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    if bad := sorted(set(wanted) - set(VARIANTS)) or (["ort"] if "ort" not in wanted else []):
        ap.error(f"--variants: unknown or missing {bad} (ort is the reference and must be in)")
    if args.rounds < 2 or args.steps < 1 or args.threads < 1:
        ap.error("--rounds must be >= 2, --steps and --threads >= 1")

    import torch

    from exporter.bench import ratio_estimate
    from exporter.onnx_export import export_pipeline
    from exporter.onnx_pipeline import OnnxStableDiffusionPipeline
    from uniforget.models import load_pipeline

    torch.set_num_threads(args.threads)
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-e2e-"))).resolve()  # workers run in other cwds
    work.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    optimum_scheduler = None
    t0 = time.perf_counter()
    if args.model == "sd15":
        pipe, label = sd15_pipeline(args.size), f"SD1.5 geometry, random weights, {args.size}x{args.size} latent"
    else:
        pipe, label = load_pipeline(args.model), args.model
        pipe.set_progress_bar_config(disable=True)
    onnx_dir = work / "onnx"
    if not (onnx_dir / "model_index.json").is_file():
        print(f"exporting {label} to ONNX ...", flush=True)
        export_pipeline(pipe, onnx_dir, validate=False)
    prep_s = {"build_and_export": time.perf_counter() - t0}
    unet_cfg = json.loads((onnx_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((onnx_dir / "vae_decoder" / "config.json").read_text())
    hw = int(unet_cfg.get("sample_size", 64))
    shape = (1, int(unet_cfg.get("in_channels", 4)), hw, hw)
    px = hw * 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)

    calls: dict[str, Callable[[int], tuple[float, np.ndarray]]] = {}
    closers: list[Callable[[], None]] = []
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)

    def latents(seed: int) -> np.ndarray:  # what OnnxStableDiffusionPipeline (and the Triton model) draw for `seed`
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    if "diffusers" in wanted:
        def run_diffusers(seed: int) -> tuple[float, np.ndarray]:
            lat = torch.from_numpy(latents(seed))
            t = time.perf_counter()
            with torch.inference_mode():
                img = pipe(args.prompt, latents=lat, output_type="np", **kw).images[0]
            return (time.perf_counter() - t) * 1e3, np.asarray(img, dtype=np.float32)
        calls["diffusers"] = run_diffusers
    else:
        del pipe

    t1 = time.perf_counter()
    local = OnnxStableDiffusionPipeline(onnx_dir, threads=args.threads)
    prep_s["ort_load"] = time.perf_counter() - t1
    closers.append(local.close)

    def run_ort(seed: int) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        img = local(args.prompt, seed=seed, **kw).images[0]
        return (time.perf_counter() - t) * 1e3, img
    calls["ort"] = run_ort

    if "optimum" in wanted:
        if not OPTIMUM_PY.exists():
            skipped["optimum"] = "no .venv-optimum (bash scripts/setup_optimum_env.sh)"
        else:
            worker = OptimumWorker(onnx_dir, args.threads, work)
            prep_s["optimum_load"] = worker.info["load_s"]
            optimum_scheduler = worker.info.get("scheduler")
            closers.append(worker.close)
            calls["optimum"] = lambda seed: worker(args.prompt, args.steps, args.guidance_scale, latents(seed))

    server = None
    if "triton" in wanted:
        from exporter.triton_repo import default_python_env
        from exporter.triton_server import ServerOptions, TritonServer

        if default_python_env() is None:
            skipped["triton"] = "no tritonserver environment (bash scripts/setup_triton_env.sh)"
        else:
            import tritonclient.http as httpclient

            from exporter.triton_repo import PIPELINE, TritonRepoOptions, write_repository

            repo = write_repository(TritonRepoOptions(out_dir=work / "triton", pipeline_dir=onnx_dir, overwrite=True,
                                                      steps=args.steps, guidance_scale=args.guidance_scale,
                                                      threads=args.threads)).path
            t1 = time.perf_counter()
            server = TritonServer(ServerOptions(repo=repo, http_port=0, startup_timeout_s=600))
            server.__enter__()
            prep_s["triton_startup"] = time.perf_counter() - t1
            client = httpclient.InferenceServerClient(server.url, connection_timeout=600, network_timeout=600)
            closers.append(client.close)

            def run_triton(seed: int) -> tuple[float, np.ndarray]:
                inputs = [httpclient.InferInput("prompt", [1], "BYTES"), httpclient.InferInput("seed", [1], "INT64")]
                inputs[0].set_data_from_numpy(np.array([args.prompt.encode()], dtype=object))
                inputs[1].set_data_from_numpy(np.array([seed], dtype=np.int64))
                t = time.perf_counter()
                img = client.infer(PIPELINE, inputs).as_numpy("image")
                return (time.perf_counter() - t) * 1e3, img.astype(np.float32) / 255.0
            calls["triton"] = run_triton

    names = [v for v in VARIANTS if v in calls]
    for v in skipped:
        print(f"left out {v}: {skipped[v]}")
    print(f"{label}: {px}x{px} px, {args.steps} steps, guidance {args.guidance_scale}, batch 1, "
          f"{args.threads} thread(s); variants {', '.join(names)}; {args.rounds} rounds", flush=True)
    try:
        for w in range(args.warmup):
            for n in names:
                calls[n](10_000 + w)
        ms: dict[str, list[float]] = {n: [] for n in names}
        diff: dict[str, list[float]] = {n: [] for n in names if n != "ort"}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            imgs = {}
            for n in order:
                t, imgs[n] = calls[n](r)
                ms[n].append(t)
            for n in diff:  # Triton answers uint8 pixels: compare with the ORT image rounded the same way
                ref = np.round(imgs["ort"] * 255) / 255 if n == "triton" else imgs["ort"]
                diff[n].append(float(np.abs(imgs[n].reshape(ref.shape) - ref).max()))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {ms[n][-1]:.0f} ms" for n in names), flush=True)
    finally:
        for c in reversed(closers):
            c()
        if server is not None:
            server.__exit__(None, None, None)

    rows = {}
    for n in names:
        row: dict[str, Any] = {"latency": summarize(ms[n]), "samples_ms": ms[n]}
        if n != "ort":
            e = ratio_estimate(ms["ort"], ms[n])  # variant / ort, paired by round
            row["vs_ort"] = {"ratio": e.ratio, "low": e.low, "high": e.high, "verdict": e.verdict.replace("slim", n)}
            row["max_abs_pixel_vs_ort"] = max(diff[n])
        rows[n] = row
    if "diffusers" in rows:  # the headline: how many times faster the ORT pipeline is than diffusers eager
        e = ratio_estimate(ms["ort"], ms["diffusers"])
        rows["ort"]["speedup_vs_diffusers"] = {"ratio": e.ratio, "low": e.low, "high": e.high}

    print(f"\n{'variant':<11}{'median ms':>11}{'p10':>9}{'p90':>9}   {'x ORT pipeline [95% CI]':<30}{'max|dpx|':>9}")
    for n in names:
        s, row = rows[n]["latency"], rows[n]
        rel = (f"x{row['vs_ort']['ratio']:.3f} [{row['vs_ort']['low']:.3f}, {row['vs_ort']['high']:.3f}]"
               if "vs_ort" in row else "reference")
        dpx = f"{row['max_abs_pixel_vs_ort']:.1e}" if "vs_ort" in row else ""
        print(f"{n:<11}{s['median_ms']:>11.0f}{s['p10_ms']:>9.0f}{s['p90_ms']:>9.0f}   {rel:<30}{dpx:>9}")
    if "speedup_vs_diffusers" in rows["ort"]:
        sp = rows["ort"]["speedup_vs_diffusers"]
        print(f"ORT pipeline vs diffusers eager: {sp['ratio']:.2f}x faster [{sp['low']:.2f}, {sp['high']:.2f}]")
    for n in names:
        if rows[n].get("vs_ort", {}).get("verdict") == "within noise":  # RatioEstimate.verdict's rule
            print(f"{n} vs ORT pipeline: within noise")

    result = {"model": label, "image_px": px, "latent": list(shape), "steps": args.steps,
              "guidance_scale": args.guidance_scale, "prompt": args.prompt, "threads": args.threads,
              "rounds": args.rounds, "warmup": args.warmup, "skipped": skipped, "prepare_s": prep_s,
              "optimum_scheduler": optimum_scheduler, "variants": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": sys.version.split()[0], "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}}
    out = args.json or ROOT / "runs" / f"bench_e2e_{'sd15' if args.model == 'sd15' else Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "scripts"))
    from uniforget.errors import run_script

    run_script(main)
