"""Mask learning: gates close under a large beta and stay at beta 0; resume == uninterrupted; wrong model refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from exporter.cli import main  # noqa: E402
from uniforget.controls import (  # noqa: E402
    closed_counts,
    gates_to_logits,
    match_drift,
    random_removal,
    removed_mass,
    shuffled_gates,
)
from uniforget.errors import MaskSetError, UniforgetError  # noqa: E402
from uniforget.fingerprint import model_fingerprint  # noqa: E402
from uniforget.gating import attach_gates  # noqa: E402
from uniforget.geometries import TINY, build_unet, tiny_pipeline  # noqa: E402
from uniforget.learn import (  # noqa: E402
    LearnConfig,
    LearnError,
    latent_drift,
    learn_masks,
    parse_beta,
    prompts_sha256,
)
from uniforget.masks import MaskSet  # noqa: E402
from uniforget.prompts import DEFAULT_PROMPTS, read_prompt_file  # noqa: E402
from uniforget.sampler import SamplerConfig, encode_prompts, sample  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "green triangle on white", "small yellow star", "two grey dots",
           "a big orange ring"]
FAST = LearnConfig(steps=6, batch=2, lr=0.1, sampler=SamplerConfig(steps=2, guidance_scale=3.0), seed=7)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(image_size=8, text_len=32)  # 1-level VAE: latents are the image size


@pytest.fixture(scope="module")
def cond(pipe):
    return encode_prompts(pipe, PROMPTS)


def _learn(pipe, cond, cfg, **kw):
    return learn_masks(pipe.unet, pipe.scheduler, cond, cfg, prompts_sha=prompts_sha256(PROMPTS), **kw)


def test_large_beta_closes_gates_beta_zero_keeps_them(pipe, cond):
    ref = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    open_run = _learn(pipe, cond, replace(FAST, beta=0.0, steps=4))
    vals = open_run.maskset.gate_values()
    assert all(torch.equal(v, torch.ones_like(v)) for v in vals.values()), "beta 0 must keep every gate at 1"
    assert all(s.closed[k] == 0 for s in open_run.history for k in s.closed)

    shut = _learn(pipe, cond, replace(FAST, beta=50.0, steps=12, lr=0.2))
    closed = shut.history[-1].closed
    assert set(closed) == {"heads", "ffn", "norm"}
    assert closed["ffn"] > 0.5 and closed["norm"] > 0.5, closed
    assert shut.history[-1].l1 < shut.history[0].l1
    # the UNet's own weights never change
    assert all(torch.equal(v, ref[k]) for k, v in pipe.unet.state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


@pytest.mark.parametrize("recon", ["relative", "absolute"])
def test_loss_is_reconstruction_plus_beta_l1(pipe, cond, recon):
    """The logged loss is rec + beta * mean relaxed mask, rec = mse (absolute) or mse / var(original latents)
    (relative, the default), and the reconstruction part becomes non-zero."""
    cfg = replace(FAST, beta=0.5, steps=15, lr=0.1, recon=recon)
    learned = _learn(pipe, cond, cfg)
    last = learned.history[-1]
    assert last.mse > 0 and any(s.mse > 0 for s in learned.history)
    assert last.loss == pytest.approx(last.rec + 0.5 * last.l1, rel=1e-5)
    if recon == "absolute":
        assert last.rec == pytest.approx(last.mse, rel=1e-6)
    else:
        assert last.rec != pytest.approx(last.mse, rel=1e-3)  # divided by the batch's latent variance
    assert learned.maskset.meta["recon"] == recon


def test_resume_equals_uninterrupted(pipe, cond, tmp_path, kill):
    cfg = replace(FAST, beta=5.0, steps=6)
    full = _learn(pipe, cond, cfg).maskset

    ckpt = tmp_path / "m.ckpt.safetensors"

    with pytest.raises(kill.Killed):
        _learn(pipe, cond, cfg, checkpoint_path=ckpt, checkpoint_every=3, callback=kill.at(4))
    torch.manual_seed(12345)  # a fresh process would not share the global RNG state either
    resumed = _learn(pipe, cond, cfg, checkpoint_path=ckpt, checkpoint_every=3, resume=True)
    assert resumed.resumed_from == 3 and len(resumed.history) == 3
    assert full.logits.keys() == resumed.maskset.logits.keys()
    for k in full.logits:
        assert torch.equal(full.logits[k], resumed.maskset.logits[k]), k
    assert any(not torch.equal(v, torch.ones_like(v)) for v in full.logits.values()), "the run must move gates"


def test_resume_refuses_other_model_or_options(pipe, cond, tmp_path):
    ckpt = tmp_path / "m.ckpt.safetensors"
    _learn(pipe, cond, replace(FAST, steps=2), checkpoint_path=ckpt, checkpoint_every=1)
    with pytest.raises(LearnError, match="learning options"):
        _learn(pipe, cond, replace(FAST, steps=2, beta=3.0), checkpoint_path=ckpt, checkpoint_every=1, resume=True)
    other = build_unet(TINY["sd1"], seed=1)
    with pytest.raises(MaskSetError, match=model_fingerprint(other)):
        learn_masks(other, pipe.scheduler, cond, replace(FAST, steps=2), prompts_sha=prompts_sha256(PROMPTS),
                    checkpoint_path=ckpt, checkpoint_every=1, resume=True)


def test_maskset_roundtrip_and_fingerprint_refusal(pipe, cond, tmp_path):
    ms = _learn(pipe, cond, replace(FAST, steps=2, kinds=("ffn", "norm"))).maskset
    assert {k.rsplit("/", 1)[1] for k in ms.logits} == {"ffn", "norm"}
    for key in ("beta", "steps", "sampler_steps", "prompts_sha256", "lr", "optimizer", "guidance_scale"):
        assert key in ms.meta, key
    assert ms.meta["prompts_sha256"] == prompts_sha256(PROMPTS)
    path = ms.save(tmp_path / "masks.safetensors")
    back = MaskSet.load(path, expect_fingerprint=model_fingerprint(pipe.unet))
    assert all(torch.equal(back.logits[k], ms.logits[k]) for k in ms.logits)
    other_fp = model_fingerprint(build_unet(TINY["sd1"], seed=3))
    with pytest.raises(MaskSetError) as e:
        MaskSet.load(path, expect_fingerprint=other_fp)
    assert other_fp in str(e.value) and ms.model_fingerprint in str(e.value)


def test_latent_drift_zero_at_init_and_positive_when_closed(pipe, cond):
    cfg = SamplerConfig(steps=2, guidance_scale=3.0)
    ms = _learn(pipe, cond, replace(FAST, beta=0.0, steps=1)).maskset
    assert latent_drift(pipe.unet, pipe.scheduler, cond, ms.gate_values(), cfg)["mse"] == 0.0
    closed = {k: torch.zeros_like(v) for k, v in ms.gate_values().items() if k.endswith("/ffn")}
    d = latent_drift(pipe.unet, pipe.scheduler, cond, closed, cfg)
    assert d["mse"] > 0 and d["rel"] > 0 and d["rel_se"] > 0 and d["rel_median"] > 0
    zero = latent_drift(pipe.unet, pipe.scheduler, cond, ms.gate_values(), cfg)
    assert zero["rel_se"] == 0.0 == zero["rel_median"]


def test_drift_standard_error_is_the_spread_over_prompts():
    """The bootstrap s.e. of the pooled relative drift: zero when every prompt drifts alike, about halved by
    four times the prompts, deterministic, and on the scale of the per-prompt spread."""
    import numpy as np

    from uniforget.learn import bootstrap_rel_se

    ref = [1.0, 2.0, 0.5, 1.5, 3.0, 1.0]
    assert bootstrap_rel_se([0.04 * r for r in ref], ref) == pytest.approx(0.0, abs=1e-12)
    sq = [0.01, 0.09, 0.0025, 0.2, 0.5, 0.04]
    se = bootstrap_rel_se(sq, ref)
    assert se == bootstrap_rel_se(sq, ref) > 0
    assert bootstrap_rel_se(sq * 4, ref * 4) == pytest.approx(se / 2, rel=0.25)
    per_prompt = np.sqrt(np.array(sq) / np.array(ref))
    assert 0.2 * per_prompt.std() / np.sqrt(len(sq)) < se < 5 * per_prompt.std() / np.sqrt(len(sq))
    assert bootstrap_rel_se([0.3], [1.0]) == 0.0  # one prompt: no spread to estimate


def test_median_standard_error_ignores_one_flipped_prompt():
    """The median's bootstrap s.e.: zero when every prompt drifts alike, and, unlike the pooled statistic's, barely
    moved by one prompt whose trajectory flipped to another object (the case section 0l of the docs measured)."""
    from uniforget.learn import bootstrap_rel_se

    ref = [1.0] * 12
    assert bootstrap_rel_se([0.01] * 12, ref, statistic="median") == pytest.approx(0.0, abs=1e-12)
    sq = [0.01 * (1 + 0.1 * i) for i in range(12)]
    flipped = sq[:-1] + [4.0]
    p0, p1 = (bootstrap_rel_se(x, ref) for x in (sq, flipped))
    median = [bootstrap_rel_se(x, ref, statistic="median") for x in (sq, flipped)]
    assert p1 > 5 * p0  # the pooled s.e. explodes with the flipped prompt
    assert median[1] < 2 * median[0] and median[1] < p1 / 5
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_rel_se(sq, ref, statistic="mean")  # a typo is not silently the pooled statistic


def test_drift_of_the_original_under_a_sampler_change(pipe, cond):
    """DriftMeter.of(unet, sampler_cfg): the original against its own cached reference is 0 with the reference's
    sampler and positive with more steps (the neutral scale heldout_drift.py --sampler-refs reads a budget on)."""
    from uniforget.learn import DriftMeter

    cfg = SamplerConfig(steps=2, guidance_scale=3.0)
    meter = DriftMeter(pipe.unet, pipe.scheduler, cond, cfg)
    same = meter.of(pipe.unet, cfg)
    assert same["rel"] == 0.0 == same["rel_median"]
    finer = meter.of(pipe.unet, replace(cfg, steps=4))
    assert finer["rel"] > 0 and finer["rel_median"] > 0
    assert meter.of(pipe.unet)["rel"] == 0.0  # the cached reference's own sampler by default


def test_drift_over_several_start_noises_per_prompt(pipe, cond):
    """seeds_per_prompt K: K = 1 is the single-noise meter exactly; K = 4 keeps that draw as its first, pools each
    prompt's K noises (so the statistics still count prompts) and equals the per-prompt sums done by hand."""
    from uniforget.learn import DriftMeter, bootstrap_rel_se

    cfg = SamplerConfig(steps=2, guidance_scale=3.0)
    ms = _learn(pipe, cond, replace(FAST, beta=0.0, steps=1)).maskset
    closed = {k: torch.zeros_like(v) for k, v in ms.gate_values().items() if k.endswith("/ffn")}
    one = DriftMeter(pipe.unet, pipe.scheduler, cond, cfg, seed=5)
    assert one(closed) == DriftMeter(pipe.unet, pipe.scheduler, cond, cfg, seed=5, seeds_per_prompt=1)(closed)
    four = DriftMeter(pipe.unet, pipe.scheduler, cond, cfg, seed=5, seeds_per_prompt=4, batch=3)
    n = len(PROMPTS)
    assert len(four.batches[0][1]) == 3 and sum(len(b[1]) for b in four.batches) == 4 * n
    assert torch.equal(torch.cat([b[1] for b in one.batches]), torch.cat([b[1] for b in four.batches])[:n])
    sq, ref_sq = [0.0] * n, [0.0] * n
    with attach_gates(pipe.unet, closed):
        j = 0
        for c, z0, ref in four.batches:
            out = sample(pipe.unet, pipe.scheduler, z0, c, cfg)
            for row in range(len(z0)):
                sq[j % n] += float((out[row] - ref[row]).pow(2).sum())
                ref_sq[j % n] += float(ref[row].pow(2).sum())
                j += 1
    d = four(closed)
    assert d["rel"] == pytest.approx((sum(sq) / sum(ref_sq)) ** 0.5, rel=1e-5)
    assert d["rel_se"] == pytest.approx(bootstrap_rel_se(sq, ref_sq), rel=1e-4)
    assert d["rel"] != one(closed)["rel"]
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        DriftMeter(pipe.unet, pipe.scheduler, cond, cfg, seeds_per_prompt=0)


def test_median_prompt_drift_ignores_a_flipped_prompt():
    """The median statistic: one prompt whose image flips dominates the pooled drift, not the median's."""
    import math

    from uniforget.learn import median_rel

    ref = [1.0] * 5
    calm = [0.01, 0.01, 0.04, 0.04, 0.04]  # per prompt 0.1, 0.1, 0.2, 0.2, 0.2
    flipped = calm[:4] + [4.0]  # the last prompt drifts 2.0
    assert median_rel(calm, ref) == pytest.approx(0.2) == median_rel(flipped, ref)
    assert math.sqrt(sum(flipped) / 5) > 4 * math.sqrt(sum(calm) / 5) / 2
    assert median_rel([0.09, 0.36], [1.0, 4.0]) == pytest.approx(0.3)  # relative to each prompt's own scale
    assert median_rel([], []) == 0.0


def test_controls_match_counts_and_drift():
    vals = {"a/ffn": torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]), "b/norm": torch.tensor([1.0, 0.0, 1.0, 1.0])}
    assert closed_counts(vals) == {"a/ffn": 2, "b/norm": 1}
    assert removed_mass(vals) == {"a/ffn": 2.5, "b/norm": 1.0}
    rnd = random_removal(vals, seed=1, counts=closed_counts(vals))
    assert closed_counts(rnd) == {"a/ffn": 2, "b/norm": 1}
    assert set(torch.unique(torch.cat(list(rnd.values()))).tolist()) <= {0.0, 1.0}
    again = random_removal(vals, seed=1, counts=closed_counts(vals))
    assert all(torch.equal(rnd[k], again[k]) for k in vals)
    sh = shuffled_gates(vals, seed=2)
    for k in vals:
        assert torch.equal(sh[k].sort().values, vals[k].sort().values)
    assert any(not torch.equal(sh[k], vals[k]) for k in vals)
    half = shuffled_gates(vals, seed=2, strength=0.5)
    assert torch.allclose(half["a/ffn"], 1 - 0.5 * (1 - sh["a/ffn"]))

    def drift(g):  # a monotone stand-in: drift = share of units removed
        return float(sum((1 - v).sum() for v in g.values()) / 12)

    m = match_drift(lambda s: random_removal(vals, seed=0, scale=s), drift, target=0.5, lo=0.0, hi=1.0)
    assert abs(m.drift - 0.5) <= 1 / 12 and m.knob > 1.0  # needed more units than the learned gates close


def test_beta_presets_and_bad_options():
    assert [parse_beta(b) for b in ("weak", "medium", "strong", "0.3")] == [1.0, 2.0, 5.0, 0.3]
    for bad in ("huge", "-1", "nan"):
        with pytest.raises(LearnError):
            parse_beta(bad)
    with pytest.raises(LearnError, match="steps"):
        LearnConfig(steps=0)
    with pytest.raises(LearnError, match="targets"):
        LearnConfig(kinds=("heads", "convs"))


def test_default_prompt_list():
    prompts = read_prompt_file(DEFAULT_PROMPTS)
    assert len(prompts) >= 256 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)


def test_prompt_file_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# only a comment\n\n")
    with pytest.raises(UniforgetError, match="no prompts"):
        read_prompt_file(f)
    with pytest.raises(UniforgetError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def pipe_dir(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(str(d), safe_serialization=True)
    return d


def test_cli_learn_end_to_end(pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "neutral.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    (pipe_dir / "uniforget_toy.json").write_text('{"guidance_scale": 3.5, "num_inference_steps": 20}')
    out = tmp_path / "out" / "masks.safetensors"
    argv = ["learn", "--model", str(pipe_dir), "--out", str(out), "--prompts", str(prompts), "--beta", "strong",
            "--steps", "3", "--batch", "2", "--sampler-steps", "2", "--checkpoint-every", "2", "--device", "cpu",
            "--targets", "ffn,norm", "--no-progress", "--history", str(tmp_path / "h.jsonl")]
    assert main(argv) == 0
    ms = MaskSet.load(out)
    lines = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and set(lines[-1]["closed"]) == {"ffn", "norm"}
    assert float(ms.meta["neutral_drift_rel"]) >= 0 and ms.meta["neutral_drift_prompts"] == "6"
    assert ms.meta["beta"] == "5.0" and ms.meta["steps"] == "3" and ms.meta["targets"] == "ffn,norm"
    assert ms.meta["guidance_scale"] == "3.5", "guidance must default to the model's own sampling setting"
    assert (out.parent / "masks.ckpt.safetensors").is_file()
    assert not list(out.parent.glob("*.partial"))
    # resuming a finished run reproduces the same MaskSet
    assert main([*argv, "--resume"]) == 0
    again = MaskSet.load(out)
    assert all(torch.equal(again.logits[k], ms.logits[k]) for k in ms.logits)


@pytest.mark.parametrize("extra, message", [
    (["--beta", "loud"], "beta"),
    (["--targets", "ffn,convs"], "targets"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts file not found"),
    (["--sampler-steps", "0"], "argument --sampler-steps: must be >= 1"),
])
def test_cli_bad_input_exits_2(pipe_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "masks.safetensors"
    try:
        rc = main(["learn", "--model", str(pipe_dir), "--out", str(out), "--steps", "1", "--batch", "2",
                   "--no-progress", "--device", "cpu", *extra])
    except SystemExit as e:  # refused while parsing
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_cli_explicit_guidance_wins(pipe_dir, tmp_path):
    prompts = tmp_path / "neutral.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "masks.safetensors"
    assert main(["learn", "--model", str(pipe_dir), "--out", str(out), "--prompts", str(prompts), "--steps", "1",
                 "--batch", "2", "--sampler-steps", "1", "--guidance-scale", "2", "--device", "cpu",
                 "--checkpoint-every", "0"]) == 0
    ms = MaskSet.load(out)
    assert ms.meta["guidance_scale"] == "2.0"
    assert not (tmp_path / "masks.ckpt.safetensors").exists()


def test_control_gates_roundtrip_through_logits():
    from uniforget.gates import hard_concrete

    vals = {"a/ffn": torch.tensor([0.0, 0.03, 0.25, 0.5, 0.9, 0.999, 1.0]), "b/norm": torch.tensor([1.0, 0.0])}
    logits = gates_to_logits(vals)
    for k, v in vals.items():
        torch.testing.assert_close(hard_concrete(logits[k]), v, rtol=0, atol=1e-5)
    assert torch.equal(hard_concrete(logits["b/norm"]), torch.tensor([1.0, 0.0]))


def test_cli_controls_match_learned_drift(pipe_dir, tmp_path):
    prompts = tmp_path / "neutral.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "masks.safetensors"
    assert main(["learn", "--model", str(pipe_dir), "--out", str(out), "--prompts", str(prompts), "--beta", "20",
                 "--lr", "0.2", "--steps", "8", "--batch", "2", "--sampler-steps", "2", "--device", "cpu",
                 "--targets", "ffn", "--checkpoint-every", "0", "--controls", "--no-progress"]) == 0
    learned = MaskSet.load(out)
    target = float(learned.meta["neutral_drift_mse"])
    assert target > 0
    for name in ("random", "shuffled"):
        c = MaskSet.load(tmp_path / f"masks.control-{name}.safetensors", expect_fingerprint=learned.model_fingerprint)
        assert c.meta["control"] == name and c.logits.keys() == learned.logits.keys()
        assert abs(float(c.meta["control_drift_mse"]) - target) <= 0.25 * target, (name, c.meta)
        same = all(torch.equal(c.gate_values()[k], learned.gate_values()[k]) for k in c.logits)
        assert not same, f"the {name} control must differ from the learned gates"


def test_joint_weight_tuning_tunes_a_copy_and_resumes_exactly(pipe, cond, tmp_path, kill):
    """--tune-weights: the original stays untouched, the MaskSet belongs to the tuned copy, and a killed run
    resumed from its checkpoint ends with the same gates and the same tuned weights, bit for bit."""
    assert "weight_lr" not in LearnConfig().to_json(), "the frozen recipe must keep the identity of earlier runs"
    ref = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = replace(FAST, beta=5.0, steps=6, weight_lr=1e-3)
    full = _learn(pipe, cond, cfg)
    assert all(torch.equal(v, ref[k]) for k, v in pipe.unet.state_dict().items()), "the original must not change"
    assert full.unet is not None and _learn(pipe, cond, replace(cfg, weight_lr=0.0)).unet is None
    assert any(not torch.equal(v, ref[k]) for k, v in full.unet.state_dict().items()), "the copy must be tuned"
    assert full.maskset.model_fingerprint == model_fingerprint(full.unet) != model_fingerprint(pipe.unet)
    assert full.maskset.meta["teacher_fingerprint"] == model_fingerprint(pipe.unet)

    ckpt = tmp_path / "j.ckpt.safetensors"
    with pytest.raises(kill.Killed):
        _learn(pipe, cond, cfg, checkpoint_path=ckpt, checkpoint_every=3, callback=kill.at(4))
    torch.manual_seed(12345)
    resumed = _learn(pipe, cond, cfg, checkpoint_path=ckpt, checkpoint_every=3, resume=True)
    assert resumed.resumed_from == 3
    for k in full.maskset.logits:
        assert torch.equal(full.maskset.logits[k], resumed.maskset.logits[k]), k
    tuned = resumed.unet.state_dict()
    for k, v in full.unet.state_dict().items():
        assert torch.equal(v, tuned[k]), k

    # a run continuing from tuned weights (calibration's next rung) starts there, not from the original, and a
    # checkpoint of a run from other weights is not resumed into it
    with pytest.raises(LearnError, match="checkpoint .* was made with another"):
        _learn(pipe, cond, cfg, start_unet=full.unet, checkpoint_path=ckpt, resume=True)
    cont = _learn(pipe, cond, cfg, start_unet=full.unet)
    assert cont.maskset.meta["weights_start_fingerprint"] == model_fingerprint(full.unet)
    assert cont.maskset.meta["teacher_fingerprint"] == model_fingerprint(pipe.unet)
    assert cont.maskset.model_fingerprint == model_fingerprint(cont.unet) != model_fingerprint(full.unet)
    with pytest.raises(LearnError, match="start_unet is for joint runs"):
        _learn(pipe, cond, replace(cfg, weight_lr=0.0), start_unet=full.unet)


def test_cli_tune_weights_writes_a_unet_prune_accepts(pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "neutral.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "masks.safetensors"
    common = ["learn", "--model", str(pipe_dir), "--out", str(out), "--prompts", str(prompts), "--steps", "3",
              "--batch", "2", "--sampler-steps", "2", "--device", "cpu", "--no-progress", "--tune-weights", "1e-3"]
    auto = tmp_path / "auto.safetensors"
    assert main([*common, "--out", str(auto), "--beta", "auto", "--ladder", "5,50", "--budget", "1e9",
                 "--drift-prompts", "0", "--budget-statistic", "median"]) == 0  # the later --out wins
    assert "on the median drift, chose beta 50" in capsys.readouterr().out
    ams = MaskSet.load(auto)  # the ladder tuned the weights too: its masks come with their UNet
    assert ams.meta["beta_mode"] == "auto" and ams.meta["weight_lr"] == "0.001"
    assert ams.meta["calibration_statistic"] == "median"
    assert (tmp_path / "auto.unet" / "config.json").is_file()
    assert main([*common, "--beta", "50", "--lr", "0.3", "--controls"]) == 0
    unet_dir = tmp_path / "masks.unet"
    assert (unet_dir / "config.json").is_file() and not list(tmp_path.glob("*.partial"))
    ms = MaskSet.load(out)
    assert ms.meta["weight_lr"] == "0.001" and float(ms.meta["neutral_drift_rel"]) > 0
    for name in ("random", "shuffled"):  # controls gate the original, not the tuned copy
        assert MaskSet.load(tmp_path / f"masks.control-{name}.safetensors").model_fingerprint == \
            ms.meta["teacher_fingerprint"]
    slim = tmp_path / "slim"
    assert main(["prune", "--unet", str(unet_dir), "--masks", str(out), "--ratio", "0.05", "--out", str(slim)]) == 0
    assert "parity slim vs gated" in capsys.readouterr().out
    # the retrain's teacher is the original the tuned copy came from
    assert main(["retrain", "--slim", str(slim), "--out", str(tmp_path / "rt"), "--model", str(pipe_dir),
                 "--prompts", str(prompts), "--steps", "1", "--batch", "2", "--sampler-steps", "1",
                 "--drift-prompts", "2", "--device", "cpu", "--no-progress"]) == 0
    # the original pipeline refuses the tuned run's masks: they belong to the tuned weights
    capsys.readouterr()
    assert main(["prune", "--model", str(pipe_dir), "--masks", str(out), "--ratio", "0.05",
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["validate", "--model", str(pipe_dir), "--masks", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--tune-weights" in err[-1] and "--slim" in err[-1]


def test_heldout_drift_rescales_gates_binary_and_to_a_drift_target():
    """scripts/heldout_drift.py --scale (docs section 0n): binary keeps closed gates closed and opens the rest; lerp
    finds the t whose 1 - t (1 - g) meets the target drift."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "heldout_drift.py"
    spec = importlib.util.spec_from_file_location("heldout_drift", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    gates = {"a/ffn": torch.tensor([0.0, 0.3, 1.0]), "b/norm": torch.tensor([0.5, 0.0])}
    binary, knob = mod.rescale_gates(gates, "binary", lambda g: 0.0, 0.2)
    assert knob == 1.0 and binary["a/ffn"].tolist() == [0.0, 1.0, 1.0] and binary["b/norm"].tolist() == [1.0, 0.0]

    def closed_mass(g: dict) -> float:  # a drift that grows as the gates close
        return float(sum((1 - v).sum() for v in g.values()))

    full = closed_mass(gates)
    lerp, t = mod.rescale_gates(gates, "lerp", closed_mass, full / 2)
    assert t == pytest.approx(0.5, abs=2e-3) and closed_mass(lerp) == pytest.approx(full / 2, rel=1e-2)
    assert torch.allclose(lerp["a/ffn"], 1 - t * (1 - gates["a/ffn"]))
