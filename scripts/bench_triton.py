#!/usr/bin/env python
"""Request latency of the whole text-to-image pipeline: through a real tritonserver (HTTP, loopback) vs in-process
ONNX Runtime, same exported pipeline, same prompt/seed/steps. Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python scripts/bench_triton.py [--pipeline ONNX_PIPELINE_DIR | --model toy|PATH]
        [--steps 20] [--requests 20] [--threads 1] [--json engines/bench/triton_latency.json]

Without --pipeline/--model it exports the embedded toy when it is present, else a tiny random SD1-style pipeline
(stated in the output). Needs .venv-triton (scripts/setup_triton_env.sh) and tritonclient[http].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def stats(ms: list[float]) -> dict[str, float]:
    q = np.percentile(ms, [10, 50, 90])
    return {"median_ms": statistics.median(ms), "p10_ms": float(q[0]), "p90_ms": float(q[2]),
            "mean_ms": statistics.fmean(ms), "n": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", type=Path, help="exported ONNX pipeline folder")
    ap.add_argument("--model", help="toy or a diffusers folder: exported to ONNX first")
    ap.add_argument("--prompt", default="a red square on a blue background")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both sides")
    ap.add_argument("--json", type=Path, default=ROOT / "engines" / "bench" / "triton_latency.json")
    args = ap.parse_args()

    import tritonclient.http as httpclient

    from exporter.onnx_export import export_pipeline
    from exporter.onnx_pipeline import OnnxStableDiffusionPipeline
    from exporter.triton_repo import PIPELINE, TritonRepoOptions, write_repository
    from exporter.triton_server import ServerOptions, TritonServer
    from uniforget.geometries import tiny_pipeline
    from uniforget.models import TOY_DIR

    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    if args.pipeline:
        onnx_dir, source = args.pipeline, str(args.pipeline)
    else:
        model = args.model or ("toy" if (TOY_DIR / "model_index.json").is_file() else None)
        source = model or "tiny random SD1-style pipeline (16x16)"
        pipe = model if model else tiny_pipeline()
        print(f"exporting {source} to ONNX ...", flush=True)
        onnx_dir = export_pipeline(pipe, work / "onnx", validate=False).folder
    repo = write_repository(TritonRepoOptions(out_dir=work / "triton", pipeline_dir=onnx_dir, steps=args.steps,
                                              guidance_scale=args.guidance_scale, threads=args.threads)).path

    local = OnnxStableDiffusionPipeline(onnx_dir, threads=args.threads)

    def run_local() -> np.ndarray:
        out = local(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
        return np.round(np.clip(out.images, 0, 1) * 255).astype(np.uint8)[0]

    inputs = [httpclient.InferInput("prompt", [1], "BYTES"), httpclient.InferInput("seed", [1], "INT64")]
    inputs[0].set_data_from_numpy(np.array([args.prompt.encode()], dtype=object))
    inputs[1].set_data_from_numpy(np.array([args.seed], dtype=np.int64))

    t0 = time.perf_counter()
    with TritonServer(ServerOptions(repo=repo, http_port=0)) as server:
        startup_s = time.perf_counter() - t0
        client = httpclient.InferenceServerClient(server.url)
        try:
            for _ in range(args.warmup):
                served = client.infer(PIPELINE, inputs).as_numpy("image")
                ref = run_local()
            # interleaved, so both paths see the same machine load (the cores may be shared)
            triton_ms, local_ms = [], []
            for _ in range(args.requests):
                t = time.perf_counter()
                served = client.infer(PIPELINE, inputs).as_numpy("image")
                triton_ms.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                ref = run_local()
                local_ms.append((time.perf_counter() - t) * 1e3)
        finally:
            client.close()
    local.close()

    tri, loc = stats(triton_ms), stats(local_ms)
    result = {
        "model": source, "image_shape": list(ref.shape), "steps": args.steps, "guidance_scale": args.guidance_scale,
        "threads": args.threads, "requests": args.requests, "warmup": args.warmup,
        "identical_images": bool(np.array_equal(served, ref)),
        "triton_http": tri, "in_process": loc,
        "overhead_median_ms": tri["median_ms"] - loc["median_ms"], "server_startup_s": startup_s,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    print(f"\n{source}: {result['image_shape']} image, {args.steps} steps, guidance {args.guidance_scale}, "
          f"{args.requests} requests after {args.warmup} warm-up; ORT threads {args.threads}")
    print(f"{'path':<28}{'median ms':>12}{'p10 ms':>10}{'p90 ms':>10}")
    for name, s in (("in-process ONNX Runtime", loc), ("Triton HTTP (loopback)", tri)):
        print(f"{name:<28}{s['median_ms']:>12.1f}{s['p10_ms']:>10.1f}{s['p90_ms']:>10.1f}")
    print(f"{'overhead (median)':<28}{result['overhead_median_ms']:>12.1f}")
    print(f"images identical: {result['identical_images']}; server startup {startup_s:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if result["identical_images"] else 1


if __name__ == "__main__":
    from uniforget.errors import run_script

    run_script(main)
