"""The one-shot on a full-size SD1.5-geometry pipeline with random weights, on CPU, every stage checked.

Why: the tests run the one-shot on tiny UNets; this proves the real-size path (3.4 GB fp32 UNet, ONNX above
protobuf's 2 GB limit, so external data, the ONNX pipeline and the Triton repository) without a download:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/oneshot_fullsize.py --work runs/oneshot_fullsize
    OMP_NUM_THREADS=1 python scripts/oneshot_fullsize.py --tiny --work runs/oneshot_tiny   # the same in ~1 min
    OMP_NUM_THREADS=1 python scripts/oneshot_fullsize.py --work runs/oneshot_fullsize --check-only --serve

1. Build: the shipped SD1.5 config's UNet, VAE and text encoder with N(0, 0.02) weights
   (scripts/single_file_fullsize.random_pipeline), written as ONE original-layout single file
   (`v1-5-random-emaonly.safetensors`, uniforget.ldm_layout), loaded back with no config
   (uniforget.single_file) and checked tensor for tensor against what was written.
2. The loaded pipeline is saved as a diffusers folder whose UNet config has `sample_size` = `--size` (8: 64 px
   images). Only the latent size the one-shot learns, checks and generates at changes; every weight shape is
   SD1.5's. At the native 64x64 latent one mask-learning step (batch 8, 6 sampler steps, CFG, backward) would
   take an estimated several hours on one core (2 steps at 8x8 took ~20 min), which is why the folder and not
   the file goes through the one-shot here.
3. `uniforget-export` runs on it as a subprocess (a few learning steps, a fixed beta, small validation, suspect
   captions without reference images), with its resident memory sampled every 0.5 s.
4. Checks: every stage ran, every parity gate passed, onnx/unet.onnx has external data and is > 2 GB, the ONNX
   pipeline folder and the Triton repository (configs checked against Triton's schema where tritonclient is
   installed) are there, and the verdict says memorization was not measured (random weights memorize
   nothing: there are no reference images, so only Wen's noise norm can be computed, and it means nothing here).

5. `--native SIZE` (64 for SD1.5's 512 px): the published slim UNet (torch, from `out/unet`) against its
   external-data ONNX graph (`out/onnx/unet.onnx`) in ONNX Runtime at that latent size, batch 2 (a CFG call),
   77 tokens, the one-shot's own parity tolerance. The one-shot learned and validated at `--size`; this shows
   the same graph holds parity at the resolution users generate at, with its wall time and peak memory.

6. `--serve`: a real tritonserver (.venv-triton) loads the written repository's `pipeline` model (the 3.3 GB
   external-data UNet among it), answers one request over HTTP, and its image must equal the in-process ONNX
   Runtime pipeline's on the same folder, pixel for pixel.

Prints one JSON object (also written to WORK/result.json): per-stage wall seconds and peak RSS, sizes, parity
maxima, the verdict sentence, and the failed checks (exit 1 when any).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

EVAL_PROMPTS = {  # suspect captions with no reference image: copy rate and the empty-prompt check cannot run
    "neutral": ["a photo of a harbour at dawn", "a bowl of fruit on a wooden table"],
    "memorized": [{"caption": "the famous portrait, as printed on the poster"}],
}
STAGES = ("load model", "masks", "plan", "slim UNet", "ONNX UNet", "ONNX pipeline", "Triton repository",
          "validation", "report")
GB = 1e9


def _rss_gb(pid: int) -> float:
    """Resident set of `pid` and its children (the one-shot runs no workers today, but a tracer might)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total / GB


def _children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _digest(t: Any) -> str:
    """Shape, dtype and bytes of a tensor in 16 bytes: compares 3.4 GB of weights without a second copy."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def build(work: Path, size: int, tiny: bool) -> tuple[Path, dict]:
    """Random SD1.5 pipeline -> original-layout single file -> loaded back -> diffusers folder at latent `size`."""
    import torch

    folder = work / "model"
    info: dict = {}
    t0 = time.perf_counter()
    if tiny:
        from uniforget.geometries import tiny_pipeline

        pipe = tiny_pipeline("sd1")
        info["source"] = "uniforget.geometries.tiny_pipeline('sd1') (no single file: the loader detects real sizes)"
    else:
        from single_file_fullsize import FILE_NAMES, random_pipeline

        from uniforget.ldm_layout import save_original
        from uniforget.single_file import inspect_checkpoint, load_single_file

        parts = random_pipeline("sd1", torch.float32)
        written = {k: _digest(v) for k, v in parts.unet.state_dict().items()}  # what the file must load back to
        f = save_original(parts, "sd1", work / FILE_NAMES["sd1"])
        info["write_s"] = round(time.perf_counter() - t0, 1)
        del parts
        gc.collect()
        t1 = time.perf_counter()
        detected = inspect_checkpoint(f)
        pipe = load_single_file(f)  # no config: the shipped SD1.5 configs
        got = pipe.unet.state_dict()
        bad = [k for k, v in written.items() if k not in got or _digest(got[k]) != v]
        info.update(file=str(f), file_gb=round(f.stat().st_size / GB, 2), detected=detected.config,
                    load_s=round(time.perf_counter() - t1, 1), unet_tensors=len(written),
                    unet_tensors_mismatched=len(bad), pipeline=type(pipe).__name__)
        del written, got
        gc.collect()
    pipe.unet.register_to_config(sample_size=size)
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    info["unet_params"] = sum(p.numel() for p in pipe.unet.parameters())
    info["sample_size"] = size
    info["build_s"] = round(time.perf_counter() - t0, 1)
    info["build_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
    del pipe
    gc.collect()
    return folder, info


def oneshot_argv(model: Path, out: Path, eval_file: Path, learn_steps: int) -> list[str]:
    """The shortest one-shot that still runs every stage: fixed beta (no auto ladder), a few learning steps,
    2 sampler steps, 3 generations per model, no controls, no optimized perturbation, the minimum bench."""
    return ["--model", str(model), "--beta", "2.0", "--learn-steps", str(learn_steps), "--ratio", "0.05",
            "--out", str(out), "--force", "--seeds", "2", "--neutral-prompts", "2", "--steps", "2",
            "--empty-seeds", "2", "--no-controls", "--no-optimized", "--bench-runs", "20",
            "--eval-prompts", str(eval_file)]


def run_oneshot(argv: list[str], log_path: Path) -> dict:
    """Run `uniforget-export` as a child, timestamp its stage lines, sample its RSS; per-stage peak memory."""
    exe = Path(sys.executable).with_name("uniforget-export")
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.time()
    proc = subprocess.Popen([str(exe), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.time() - t0, _rss_gb(proc.pid)))
            stop.wait(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    done: list[tuple[float, str]] = []  # (seconds since start, stage name) when its check-mark line printed
    with log_path.open("w") as log:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = re.match(r"\s*[✓✗]\s+(\S.*?)\s{2,}", line)
            if m and m.group(1) in STAGES:
                done.append((time.time() - t0, m.group(1)))
    rc = proc.wait()
    stop.set()
    th.join()
    peaks, start = {}, 0.0
    for end, name in done:
        window = [r for t, r in samples if start <= t <= end + 0.5]
        peaks[name] = round(max(window, default=0.0), 2)
        start = end
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "stage_peak_rss_gb": peaks,
            "peak_rss_gb": round(max((r for _, r in samples), default=0.0), 2),
            "peak_rss_gb_getrusage": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def check(out: Path, tiny: bool) -> tuple[dict, list[str]]:
    """Every stage's artifact and gate, read back from the published output folder."""
    import onnx

    from exporter.triton_repo import external_data_files, validate_repository

    fails: list[str] = []
    rep = json.loads((out / "report" / "report.json").read_text())
    stages = {s["name"]: s for s in rep["stages"]}
    fails += [f"stage {n} missing" for n in STAGES if n not in stages and n != "report"]  # written during "report"
    for name, g in rep["parity"].items():
        if not g.get("passed", False):
            fails.append(f"parity {name} failed: {g}")
    for rel in ("masks.safetensors", "plan.json", "unet/uniforget_plan.json", "onnx/pipeline/model_index.json",
                "onnx/pipeline/unet/model.onnx", "onnx/pipeline/vae_decoder/model.onnx",
                "onnx/pipeline/text_encoder/model.onnx", "report/report.md"):
        if not (out / rel).is_file():
            fails.append(f"{rel} missing")
    m = onnx.load(str(out / "onnx" / "unet.onnx"), load_external_data=False)
    locations = sorted({e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"})
    onnx_bytes = (out / "onnx" / "unet.onnx").stat().st_size + sum(
        (out / "onnx" / loc).stat().st_size for loc in locations)
    if not tiny and (not locations or onnx_bytes <= 2 * 2**30):
        fails.append(f"onnx/unet.onnx: want external data above 2 GiB, got {locations} and {onnx_bytes} bytes")
    triton = out / "triton"
    models = sorted(p.parent.name for p in triton.glob("*/config.pbtxt"))
    if not {"unet_onnx", "pipeline"} <= set(models):
        fails.append(f"triton/ models {models}")
    for loc in locations:  # the repository's UNet must carry its weights along
        if not (triton / "unet_onnx" / "1" / loc).is_file():
            fails.append(f"triton/unet_onnx/1/{loc} missing")
    # onnx refuses to load external data with more than one hard link: every graph's weights must stand alone
    for data in external_data_files(p for p in out.rglob("*.onnx") if p.is_file()):
        if data.stat().st_nlink > 1:
            fails.append(f"{data.relative_to(out.resolve())} is hard-linked: onnx.load would refuse it")
    if not os.umask(os.umask(0)) & 0o004:  # a server under another user must read every file and folder
        closed = [str(p.relative_to(out)) for p in [out, *triton.rglob("*")] if not p.stat().st_mode & 0o004]
        if closed:
            fails.append(f"not readable by other users: {closed[:3]} ({len(closed)} in all)")
    schema = not any("schema check skipped" in n for n in rep.get("notes", ()))

    try:
        validate_repository(triton)
    except Exception as e:  # any failure is a finding, reported whole
        fails.append(f"triton/ does not validate: {type(e).__name__}: {e}")
    v = rep.get("verdict")
    sentence = v.get("sentence") if isinstance(v, dict) else v
    status = v.get("status") if isinstance(v, dict) else None
    if status != "not measured":
        fails.append(f"verdict should be 'not measured' on a model without references, got {status!r}: {sentence}")
    found = {
        "stages_s": {n: round(s["seconds"], 1) for n, s in stages.items()},
        "stage_summaries": {n: s["summary"] for n, s in stages.items()},
        "parity_max_abs": {n: g.get("max_abs") for n, g in rep["parity"].items()},
        "plan": {k: rep["plan"].get(k) for k in ("ratio_achieved", "params_before", "params_after", "flop_ratio")},
        "onnx_unet_gb": round(onnx_bytes / GB, 3), "onnx_external_data": locations,
        "onnx_pipeline_gb": round(sum(f.stat().st_size for f in (out / "onnx" / "pipeline").rglob("*")
                                      if f.is_file()) / GB, 3),
        "triton_models": models, "triton_schema_checked": schema, "verdict": sentence,
        "notes": rep.get("notes", []),
    }
    return found, fails


def serve(out: Path, steps: int, seed: int = 0) -> tuple[dict, list[str]]:
    """Serve the one-shot's Triton repository with a real tritonserver, request one image over HTTP, and compare
    it with the in-process ONNX Runtime pipeline on the same exported folder (same prompt, seed, steps, guidance).

    Why: writing a repository whose configs validate is not the same as a server loading a 3.3 GB external-data
    UNet from it; this is the server doing so. pytriton's server has the Python backend only, so the `pipeline`
    model (ONNX Runtime inside the Python backend) is what it serves; `unet_onnx` needs the ONNX Runtime backend.
    """
    import numpy as np
    import tritonclient.http as httpclient

    from exporter.onnx_pipeline import OnnxStableDiffusionPipeline
    from exporter.triton_repo import PIPELINE, parse_config
    from exporter.triton_server import ServerOptions, TritonServer

    prompt, guidance, fails = EVAL_PROMPTS["neutral"][0], 7.5, []
    inputs = []
    for name, kind, value in (("prompt", "BYTES", np.array([prompt.encode()], dtype=object)),
                              ("seed", "INT64", np.array([seed], dtype=np.int64)),
                              ("steps", "INT32", np.array([steps], dtype=np.int32)),
                              ("guidance_scale", "FP32", np.array([guidance], dtype=np.float32))):
        t = httpclient.InferInput(name, [1], kind)
        t.set_data_from_numpy(value)
        inputs.append(t)
    found: dict = {"prompt": prompt, "seed": seed, "steps": steps, "guidance_scale": guidance}
    t0 = time.perf_counter()
    with TritonServer(ServerOptions(repo=out / "triton", http_port=0, models=(PIPELINE,),
                                    startup_timeout_s=900)) as server:
        found["startup_s"] = round(time.perf_counter() - t0, 1)
        found["server_rss_gb_ready"] = round(_rss_gb(server.proc.pid), 2)  # the server and its backend stubs
        client = httpclient.InferenceServerClient(server.url, network_timeout=1800.0, connection_timeout=60.0)
        try:
            t1 = time.perf_counter()
            served = client.infer(PIPELINE, inputs).as_numpy("image")
            found["request_s"] = round(time.perf_counter() - t1, 1)
            found["server_rss_gb_after_request"] = round(_rss_gb(server.proc.pid), 2)
        finally:
            client.close()
        found["models_loaded"] = list(server.models)
    served_cfg = parse_config((out / "triton" / PIPELINE / "config.pbtxt").read_text())  # its ORT thread count
    found["ort_threads"] = int(served_cfg.parameters["threads"].string_value or 0)
    local = OnnxStableDiffusionPipeline(out / "onnx" / "pipeline", threads=found["ort_threads"] or None)
    try:
        t2 = time.perf_counter()
        img = local(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed).images
        found["in_process_s"] = round(time.perf_counter() - t2, 1)
    finally:
        local.close()
    ref = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)[0]
    found["image_shape"] = list(served.shape)
    found["identical"] = bool(served.shape == ref.shape and np.array_equal(served, ref))
    found["max_abs_pixels"] = (int(np.abs(served.astype(np.int16) - ref.astype(np.int16)).max())
                               if served.shape == ref.shape else None)
    if not found["identical"]:
        fails.append(f"Triton's image differs from in-process ONNX Runtime: {served.shape} vs {ref.shape}, "
                     f"max abs {found['max_abs_pixels']}")
    return found, fails


def native_parity(out: Path, size: int, batch: int = 2, seq_len: int = 77) -> tuple[dict, list[str]]:
    """The published slim UNet (torch) vs its ONNX graph (ONNX Runtime) at a `size` x `size` latent."""
    import torch

    from exporter.onnx_export import validate_unet

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    t0 = time.perf_counter()
    report = validate_unet(out / "unet", out / "onnx" / "unet.onnx", cases=[(batch, size, size)], seq_len=seq_len,
                           raise_on_failure=False)
    found = {"case": [c.label for c in report.cases], "seq_len": seq_len, "passed": report.passed,
             "max_abs": report.max_abs, "max_rel": report.max_rel,
             "reference_max_abs": report.reference_max_abs, "tolerance": asdict(report.tolerance),
             "wall_s": round(time.perf_counter() - t0, 1),
             "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    return found, ([] if report.passed else [f"native {size}x{size} parity failed: {report.summary()}"])


def check_and_serve(out: Path, args: argparse.Namespace, result: dict) -> list[str]:
    """check() on a finished output (its findings go into `result`), the native-size parity with --native,
    then serve() it with --serve."""
    found, fails = check(out, args.tiny)
    result.update(found)
    if args.native:
        result["native_parity"], more = native_parity(out, args.native)
        fails += more
    if args.serve:
        result["triton_served"], more = serve(out, args.serve_steps)
        fails += more
    return fails


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "oneshot_fullsize")
    ap.add_argument("--size", type=int, default=8, help="latent sample size the one-shot runs at (8: 64 px)")
    ap.add_argument("--learn-steps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny SD1-like geometry: checks the script in a minute")
    ap.add_argument("--reuse", action="store_true", help="keep WORK/model from an earlier build")
    ap.add_argument("--check-only", action="store_true", help="only re-run the checks on WORK/out (WORK/result.json)")
    ap.add_argument("--serve", action="store_true", help="also serve WORK/out/triton with a real tritonserver "
                    "(.venv-triton) and compare its image with in-process ONNX Runtime")
    ap.add_argument("--native", type=int, default=0, metavar="SIZE",
                    help="also check the published slim UNet against its ONNX graph at this latent size "
                         "(64: SD1.5's 512 px), batch 2, 77 tokens")
    ap.add_argument("--serve-steps", type=int, default=4, help="sampler steps of the served request")
    ap.add_argument("--ort-optimize", action="store_true",
                    help="pass --ort-optimize: ONNX Runtime's optimizer fuses the pipeline's UNet (gated against torch)")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"geometry": "tiny sd1" if args.tiny else "SD1.5 (shipped sd1 config), random N(0, 0.02)"}
    if args.check_only:  # re-read a finished run's output (the memory samples are kept from result.json)
        result = json.loads((work / "result.json").read_text())
        fails = [] if result["oneshot"]["rc"] == 0 else [f"uniforget-export exited {result['oneshot']['rc']}"]
        if result["oneshot"]["rc"] == 0:
            fails += check_and_serve(work / "out", args, result)
        result["failed_checks"] = fails
        (work / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 1 if fails else 0
    if args.reuse and (work / "model" / "model_index.json").is_file():
        folder = work / "model"
        result["build"] = json.loads((work / "build.json").read_text()) if (work / "build.json").is_file() else {}
    else:
        folder, result["build"] = build(work, args.size, args.tiny)
        (work / "build.json").write_text(json.dumps(result["build"], indent=1))
    eval_file = work / "eval_prompts.json"
    eval_file.write_text(json.dumps(EVAL_PROMPTS, indent=1))
    out = work / "out"
    cli = oneshot_argv(folder, out, eval_file, args.learn_steps) + (["--ort-optimize"] if args.ort_optimize else [])
    result["command"] = "uniforget-export " + " ".join(cli)
    result["oneshot"] = run_oneshot(cli, work / "oneshot.log")
    fails = [] if result["oneshot"]["rc"] == 0 else [f"uniforget-export exited {result['oneshot']['rc']} "
                                                      f"(log: {work / 'oneshot.log'})"]
    if result["oneshot"]["rc"] == 0:
        fails += check_and_serve(out, args, result)
    if result["build"].get("unet_tensors_mismatched"):
        fails.append(f"single file loaded {result['build']['unet_tensors_mismatched']} UNet tensors differently")
    result["memorization"] = ("not measurable: the weights are random, so nothing is memorized and there are no "
                              "reference images; the one-shot can only compute Wen's noise norm on the suspect "
                              "captions (meaningless here), and says so instead of a verdict")
    result["failed_checks"] = fails
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
