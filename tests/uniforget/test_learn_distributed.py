"""Mask learning on the distributed engine: `accelerate launch --num_processes 2` on CPU (gloo) learns the MaskSet
one process learns with the same global batch. Not slow-marked on purpose: it is the CI proof that the multi-GPU
path runs, and takes well under two minutes on 2 cores (a tiny pipeline, 4 steps).

Tolerance: each process back-propagates its half of the batch; gradients are averaged and the relative
reconstruction term's variance is taken over the global batch (all-reduce), so sums happen in another order
than in one process, which changes float32 results by rounding only (seen: ~3e-6 on the gate logits).
atol 1e-5 on logits that move by > 0.1 here catches a process that used the wrong slice, a missing all-reduce,
or a per-process variance (that one gave 1.9e-2).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.cli import main
from uniforget.gates import GateConfig
from uniforget.geometries import tiny_pipeline
from uniforget.masks import MaskSet

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "a blue square", "green triangle on white", "small yellow star", "two grey dots",
           "a big orange ring"]
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accelerate() -> str | None:
    exe = Path(sys.executable).parent / "accelerate"
    return str(exe) if exe.is_file() else shutil.which("accelerate")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    tiny_pipeline(image_size=8, text_len=32).save_pretrained(str(d), safe_serialization=True)
    return d


def test_accelerate_two_processes_learn_the_one_process_maskset(pipe_dir, tmp_path):
    launcher = _accelerate()
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    prompts = tmp_path / "neutral.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["learn", "--model", str(pipe_dir), "--prompts", str(prompts), "--beta", "5", "--steps", "4",
              "--batch", "4", "--sampler-steps", "2", "--lr", "0.3", "--no-progress", "--checkpoint-every", "0",
              "--drift-prompts", "0", "--device", "cpu", "--guidance-scale", "3"]
    t0 = time.perf_counter()
    assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    one_s = time.perf_counter() - t0

    # a clean accelerate home: no user config file decides the launch; OMP 1 thread per process on 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(_free_port()), "-m", "exporter.cli", *common,
           "--out", str(tmp_path / "two.safetensors")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    two_s = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "over 2 process(es)" in proc.stdout + proc.stderr  # learn_masks logs the world size it ran with

    one, two = MaskSet.load(tmp_path / "one.safetensors"), MaskSet.load(tmp_path / "two.safetensors")
    assert one.logits.keys() == two.logits.keys()
    init = GateConfig().init  # every gate logit starts here
    moved = max(float((v - init).abs().max()) for v in one.logits.values())
    assert moved > 1e-2, "the logits must move, or equality would prove nothing"
    diff = max(float((two.logits[k] - one.logits[k]).abs().max()) for k in one.logits)
    print(f"\n2-process vs 1-process MaskSet: max abs over gate logits {diff:.3g} (atol {ATOL:g}); "
          f"wall: 1 process {one_s:.1f} s, accelerate launch 2 processes {two_s:.1f} s")
    assert diff <= ATOL
    for k in ("beta", "steps", "targets"):
        assert one.meta.get(k) == two.meta.get(k)

