"""Memorization and fidelity measured on an exported ONNX pipeline's own images (no torch in the sampling loop).

    python scripts/onnx_memorization.py engines/toy-medium-r0.05/onnx/pipeline --json runs/onnx_memorization.json

Generates every planted caption over --seeds seeds and every held-out neutral prompt once with
exporter.onnx_pipeline (NumPy + ONNX Runtime), then computes the strict copy rate, nearest-neighbour identity
and judge accuracy exactly as `uniforget validate` does. NumPy noise differs from torch's, so images are not
the torch pipeline's; the rates must agree within seed noise with the torch slim / gated evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from exporter.onnx_pipeline import OnnxStableDiffusionPipeline
from uniforget.evaluate import EvalData, judge_accuracy, sampling_defaults, write_json
from uniforget.memorization import detect_copies
from uniforget.models import TOY_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", type=Path, help="exported ONNX pipeline folder (optimum layout)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("runs/onnx_memorization.json"))
    args = ap.parse_args()
    d = sampling_defaults(TOY_DIR)
    steps, guidance = int(d.get("num_inference_steps", 20)), float(d.get("guidance_scale", 7.5))
    pipe = OnnxStableDiffusionPipeline(args.pipeline)
    data = EvalData.from_toy()
    t0 = time.perf_counter()
    mem, expected = [], []
    for cap, item in zip(data.memorized_captions, data.memorized_item, strict=True):
        for seed in range(args.seeds):
            mem.append(pipe(cap, num_inference_steps=steps, guidance_scale=guidance, seed=seed).images[0])
            expected.append(item)
    neu = [pipe(p, num_inference_steps=steps, guidance_scale=guidance, seed=0).images[0]
           for p in data.neutral_prompts]
    seconds = time.perf_counter() - t0
    mem_a, neu_a = np.stack(mem), np.stack(neu)
    copies = detect_copies(mem_a, data.train_images, data.train_item, np.array(expected))
    neutral_copies = detect_copies(neu_a, data.train_images, data.train_item, -1)
    judge, _, _ = judge_accuracy(data, neu_a, range(len(data.neutral_prompts)), 1)
    out = {"pipeline": str(args.pipeline), "steps": steps, "guidance": guidance, "seeds": args.seeds,
           "copy_rate": copies.copy_rate, "nn_identity": copies.nn_identity,
           "neutral_copy_rate": neutral_copies.any_item_copy_rate, "judge_accuracy": judge,
           "n_memorized": len(mem), "n_neutral": len(neu), "seconds_per_image": seconds / (len(mem) + len(neu))}
    write_json(out, args.json)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
