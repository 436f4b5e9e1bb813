"""Brief neutral retrain: 0 steps == slim bit for bit; resume == uninterrupted bit for bit; the student moves
towards the teacher; bad options and foreign checkpoints are refused; the CLI writes a loadable slim folder."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from exporter.cli import main
from uniforget.flops import ReferenceShape
from uniforget.geometries import TINY, build_unet, tiny_pipeline
from uniforget.masks import mixed_maskset
from uniforget.plan import make_plan
from uniforget.prune import prune_unet
from uniforget.retrain import (
    REPORT_NAME,
    NeutralDrift,
    RetrainConfig,
    RetrainError,
    heldout_indices,
    matching_loss,
    retrain_unet,
    teacher_states,
    trajectory_loss,
)
from uniforget.sampler import encode_prompts, sample
from uniforget.slim_io import PLAN_NAME, load_slim_unet, save_slim_unet

PROMPTS = ["a red circle", "a blue square", "green triangle on white", "small yellow star", "two grey dots",
           "a big orange ring", "a purple cross on black", "three white dots"]
REF = ReferenceShape(batch=1, height=8, width=8, seq_len=7)
FAST = RetrainConfig(steps=6, batch=2, lr=1e-4, sampler_steps=3, guidance_scale=3.0, seed=3)


random_masks = mixed_maskset  # closed, fractional and open gates in every target


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny UNets gain nothing from intra-op threads, and on a loaded machine they cost several times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(image_size=8, text_len=32)  # 1-level VAE: latents are the image size


@pytest.fixture(scope="module")
def cond(pipe):
    return encode_prompts(pipe, PROMPTS)


@pytest.fixture(scope="module")
def slim(pipe):
    plan = make_plan(pipe.unet, random_masks(pipe.unet), "auto", REF, with_flops=False)
    return plan, prune_unet(pipe.unet, plan)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _retrain(pipe, student, cond, cfg, **kw):
    return retrain_unet(student, pipe.unet, pipe.scheduler, cond, cfg, **kw)


def test_zero_steps_returns_slim_bit_for_bit(pipe, cond, slim):
    _, s = slim
    student = copy.deepcopy(s)
    before = _state(student)
    res = _retrain(pipe, student, cond, replace(FAST, steps=0))
    assert res.unet is student and res.history == () and res.resumed_from == 0
    assert _equal(_state(res.unet), before)


def test_teacher_states_are_where_the_sampler_queries(pipe, cond):
    """Each recorded state and timestep is the UNet input sampler.sample feeds at that step; the teacher,
    as its own student, has zero matching loss."""
    cfg = FAST.sampler
    c = cond.select([0, 1, 2])
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append((args[0][:3].clone(), args[1])))
    try:
        sample(pipe.unet, pipe.scheduler, z0, c, cfg)
    finally:
        hook.remove()
    assert len(calls) == cfg.steps
    k = torch.tensor([2, 0, 1])
    st = teacher_states(pipe.unet, pipe.scheduler, z0, c, k, cfg)
    for b in range(3):
        x, t = calls[int(k[b])]
        torch.testing.assert_close(st.x[b], x[b], rtol=0, atol=1e-6)
        assert int(st.t[b]) == int(t)
    with torch.no_grad():
        mse, norm = matching_loss(pipe.unet, st, c)
    assert float(mse.max()) < 1e-10 and float(norm.min()) > 0


def test_resume_equals_uninterrupted(pipe, cond, slim, tmp_path, kill):
    _, s = slim
    full = _retrain(pipe, copy.deepcopy(s), cond, FAST)
    assert not _equal(_state(full.unet), _state(s)), "the run must move weights"

    ckpt = tmp_path / "unet.retrain-ckpt.safetensors"
    with pytest.raises(kill.Killed):
        _retrain(pipe, copy.deepcopy(s), cond, FAST, checkpoint_path=ckpt, checkpoint_every=3, callback=kill.at(4))
    torch.manual_seed(12345)  # a fresh process would not share the global RNG state either
    seen = []
    resumed = _retrain(pipe, copy.deepcopy(s), cond, FAST, checkpoint_path=ckpt, checkpoint_every=3, resume=True,
                       callback=seen.append)
    assert resumed.resumed_from == 3 and [x.step for x in seen] == [4, 5, 6]
    assert resumed.history == full.history
    assert _equal(_state(resumed.unet), _state(full.unet))
    assert not any(p.requires_grad for p in resumed.unet.parameters())


def test_student_moves_towards_teacher(pipe, cond, slim):
    """On fixed held-out draws the normalized noise-prediction error and the final-latent drift both shrink."""
    _, s = slim
    cfg = RetrainConfig(steps=20, batch=4, lr=1e-4, sampler_steps=4, guidance_scale=3.0, seed=1, objective="noise")
    held, train = [0, 4], [1, 2, 3, 5, 6, 7]
    gen = torch.Generator().manual_seed(99)
    idx = torch.tensor([0, 1] * 4)
    z0, k = torch.randn(8, 4, 8, 8, generator=gen), torch.randint(4, (8,), generator=gen)
    c = cond.select(held).select(idx)
    st = teacher_states(pipe.unet, pipe.scheduler, z0, c, k, cfg.sampler)

    def fixed_loss(u):
        with torch.no_grad():
            mse, norm = matching_loss(u, st, c)
        return float((mse / norm).mean())

    probe = NeutralDrift(pipe.unet, pipe.scheduler, cond.select(held), cfg.sampler, seed=5)
    student = copy.deepcopy(s)
    loss0, drift0 = fixed_loss(student), probe(student)
    assert loss0 > 0.01 and drift0["rel"] > 0.05, "the pruned student must differ from the teacher"
    res = _retrain(pipe, student, cond.select(train), cfg)
    loss1, drift1 = fixed_loss(res.unet), probe(res.unet)
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    assert drift1["rel"] < drift0["rel"], (drift0, drift1)
    assert len(res.history) == 20 and res.history[0].lr == pytest.approx(1e-4)
    assert res.history[-1].lr < res.history[0].lr  # cosine annealing


def test_trajectory_objective_lowers_final_latent_drift(pipe, cond, slim):
    """The trajectory objective backpropagates through the N-step sampler: held-out final-latent drift falls,
    and its loss is the normalized final-latent error (the teacher as its own student scores 0)."""
    _, s = slim
    cfg = RetrainConfig(steps=15, batch=4, lr=3e-4, sampler_steps=3, guidance_scale=3.0, seed=1,
                        objective="trajectory")
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    mse, norm = trajectory_loss(pipe.unet, pipe.unet, pipe.scheduler, z0, cond.select([0, 4]), cfg.sampler)
    assert float(mse) == 0.0 and float(norm) > 0
    held, train = [0, 4], [1, 2, 3, 5, 6, 7]
    probe = NeutralDrift(pipe.unet, pipe.scheduler, cond.select(held), cfg.sampler, seed=5)
    student = copy.deepcopy(s)
    drift0 = probe(student)["rel"]
    res = _retrain(pipe, student, cond.select(train), cfg)
    assert probe(res.unet)["rel"] < drift0
    assert res.history[-1].loss < res.history[0].loss


def test_bf16_autocast_runs(pipe, cond, slim):
    _, s = slim
    res = _retrain(pipe, copy.deepcopy(s), cond, replace(FAST, steps=2, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in res.history)
    assert all(p.dtype == torch.float32 for p in res.unet.parameters())  # master weights stay fp32


@pytest.mark.parametrize("bad, message", [
    (dict(steps=-1), "steps"), (dict(batch=0), "batch"), (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(weight_decay=-1.0), "weight decay"), (dict(sampler_steps=0), "sampler steps"),
    (dict(precision="fp16"), "precision"), (dict(lr_min=1.0), "lr floor"), (dict(guidance_scale=-2.0), "guidance"),
])
def test_bad_config(bad, message):
    with pytest.raises(RetrainError, match=message):
        RetrainConfig(**bad)


def test_foreign_checkpoint_refused(pipe, cond, slim, tmp_path):
    _, s = slim
    ckpt = tmp_path / "c.safetensors"
    cfg = replace(FAST, steps=2)
    _retrain(pipe, copy.deepcopy(s), cond, cfg, checkpoint_path=ckpt, checkpoint_every=1)
    retrained = _retrain(pipe, copy.deepcopy(s), cond, replace(FAST, steps=1)).unet
    cases = [
        (dict(cfg=replace(cfg, lr=2e-4)), "retrain options"),
        (dict(student=retrained), "slim UNet"),
        (dict(cond=cond.select([0, 1, 2])), "neutral prompt list"),
        (dict(teacher=build_unet(TINY["sd1"], seed=5)), "original"),
    ]
    for change, what in cases:
        kw = {"cfg": cfg, "cond": cond, "teacher": pipe.unet, "student": s, **change}
        with pytest.raises(RetrainError, match=what) as e:
            retrain_unet(copy.deepcopy(kw["student"]), kw["teacher"], pipe.scheduler, kw["cond"], kw["cfg"],
                         checkpoint_path=ckpt, checkpoint_every=1, resume=True)
        assert "\n" not in str(e.value)

    class TwoProcs:
        device, num_processes, process_index, is_main_process = "cpu", 2, 0, True

    with pytest.raises(RetrainError, match="divisible"):
        _retrain(pipe, copy.deepcopy(s), cond, replace(FAST, batch=3), accelerator=TwoProcs())


def test_heldout_indices_spread():
    assert heldout_indices(96, 4) == [0, 24, 48, 72]
    assert heldout_indices(5, 2) == [0, 2] and heldout_indices(5, 0) == []


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def saved(pipe, slim, tmp_path_factory):
    """The tiny pipeline as a diffusers folder, its slim UNet folder and a neutral prompt file."""
    root = tmp_path_factory.mktemp("retrain_cli")
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    (root / "pipe" / "uniforget_toy.json").write_text('{"guidance_scale": 3.5, "num_inference_steps": 20}')
    plan, s = slim
    save_slim_unet(s, plan, root / "slim")
    (root / "neutral.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _argv(root, out, *extra):
    return ["retrain", "--slim", str(root / "slim"), "--out", str(out), "--model", str(root / "pipe"),
            "--prompts", str(root / "neutral.txt"), "--batch", "2", "--sampler-steps", "2", "--device", "cpu",
            "--drift-prompts", "2", *extra]


def test_cli_retrain_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "retrained"
    assert main(_argv(saved, out, "--steps", "3", "--checkpoint-every", "2", "--no-progress")) == 0
    assert "neutral drift" in capsys.readouterr().out
    original = load_slim_unet(saved / "slim")
    u = load_slim_unet(out)
    a, b = _state(original), _state(u)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not _equal(a, b)
    assert (out / PLAN_NAME).read_text() == (saved / "slim" / PLAN_NAME).read_text()
    rep = json.loads((out / REPORT_NAME).read_text())
    assert rep["config"]["steps"] == 3 and rep["config"]["guidance_scale"] == 3.5  # the model's own default
    assert len(rep["prompts_sha256"]) == 64 and rep["n_prompts"] == 6 and len(rep["heldout_prompts"]) == 2
    assert rep["final_loss"] > 0 and rep["wall_s"] >= 0 and rep["steps_run"] == 3
    assert rep["neutral_drift_before"]["rel"] > 0 and rep["neutral_drift_after"]["rel"] > 0
    assert "parity" in rep
    assert (tmp_path / "retrained.retrain-ckpt.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrained", "retrained.retrain-ckpt.safetensors"]
    # resuming the finished run reproduces the same weights
    assert main(_argv(saved, out, "--steps", "3", "--checkpoint-every", "2", "--resume", "--overwrite")) == 0
    assert _equal(_state(load_slim_unet(out)), b)


def test_cli_zero_steps_copies_slim(saved, tmp_path):
    out = tmp_path / "same"
    assert main(_argv(saved, out, "--steps", "0", "--drift-prompts", "0", "--no-progress")) == 0
    assert _equal(_state(load_slim_unet(out)), _state(load_slim_unet(saved / "slim")))


@pytest.mark.parametrize("extra, message", [
    (["--steps", "-1"], "steps"),
    (["--lr", "0"], "lr"),
    (["--drift-prompts", "8"], "holds out every one"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts file not found"),
])
def test_cli_bad_input_exits_2(saved, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    try:
        rc = main([*_argv(saved, out), "--no-progress", *extra])
    except SystemExit as e:  # refused while parsing
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_cli_refuses_slim_from_another_model(saved, tmp_path, capsys):
    other = build_unet(TINY["sd1"], seed=9)
    plan = make_plan(other, random_masks(other), "auto", REF, with_flops=False)
    save_slim_unet(prune_unet(other, plan), plan, tmp_path / "foreign")
    argv = _argv(saved, tmp_path / "o", "--no-progress")
    argv[argv.index("--slim") + 1] = str(tmp_path / "foreign")
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]  # (diffusers' load bars aside)
    assert len(err) == 1 and "was pruned from model" in err[0], err
    assert not (tmp_path / "o").exists()
    # an existing --out is refused before any weights load
    (tmp_path / "exists").mkdir()
    assert main(_argv(saved, tmp_path / "exists", "--no-progress")) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_data_parallel_two_processes_equals_one(saved, tmp_path):
    """Two CPU processes (torchrun + gloo; `accelerate launch --cpu` starts only one on a single machine) with the
    same global batch end with the one-process weights up to float summation order of the gradient all-reduce:
    max abs <= 2e-5 after 4 steps at lr 1e-4, where Adam moves weights by up to ~4e-4 (measured: 2e-6)."""
    import os
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).is_file():
        pytest.skip("torchrun not found")
    common = ["--steps", "4", "--batch", "4", "--checkpoint-every", "0", "--drift-prompts", "0", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_argv(saved, one, *common)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "exporter.cli",
                           *_argv(saved, two, *common)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((two / REPORT_NAME).read_text())["processes"] == 2
    a, b = _state(load_slim_unet(one)), _state(load_slim_unet(two))
    moved = max(float((a[k].float() - v.float()).abs().max()) for k, v in _state(load_slim_unet(saved / "slim")).items())
    assert moved > 1e-5
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"moved {moved:.3g}, two vs one processes max abs {diff:.3g}")
    assert diff <= 2e-5, (moved, diff)
