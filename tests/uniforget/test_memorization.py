"""Memorization measures: copy detection, SSIM, drift, AUC, generation, Wen's noise norm, trigger perturbations.

The pipeline tests run a tiny random-init Stable Diffusion pipeline (`tiny_pipeline`, no downloads): the real
diffusers pipeline code path, 32x32 images, a few sampler steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniforget.errors import UniforgetError
from uniforget.generate import (
    encode_latents,
    encode_prompts,
    generate,
    optimize_embeddings,
    perturb_embeddings,
)
from uniforget.geometries import tiny_pipeline
from uniforget.memorization import detect_copies, output_drift, pairwise_l2, rms_drift, roc_auc, ssim
from uniforget.targets import discover_targets
from uniforget.wen import NoiseNormRecorder, noise_norms

# ----------------------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def pipe():
    """32x32 images (3-level VAE, latents 4x8x8), 16-token prompts, DDIM."""
    return tiny_pipeline(image_size=32, text_len=16)


STEPS = 4

# ----------------------------------------------------------------------------------------- copy detection


def _smooth_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Random low-frequency images: more like real pictures than white noise (NN distances not all equal)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, (n, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(small, size // 4, axis=1), size // 4, axis=2)


@pytest.fixture(scope="module")
def refs():
    neutral = _smooth_images(300, seed=1)
    items = _smooth_images(4, seed=2)
    images = np.concatenate([neutral, items])
    index = np.concatenate([np.full(300, -1), np.arange(4)])
    return images, index, items


def test_pairwise_l2_matches_direct():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(5, 8, 8, 3)), rng.uniform(size=(7, 8, 8, 3))
    direct = np.sqrt(((a[:, None] - b[None]) ** 2).reshape(5, 7, -1).sum(-1))
    np.testing.assert_allclose(pairwise_l2(a, b, chunk=2), direct, rtol=1e-6, atol=1e-6)


def test_planted_exact_copy_is_detected(refs):
    images, index, items = refs
    res = detect_copies(items[[2]], images, index, expected_item=2)
    assert res.is_copy.tolist() == [True]
    assert res.ratio[0] < 1e-5  # exact copy: distance ~0 up to the dot-product expansion's rounding
    assert res.copy_rate == 1.0 and res.nn_identity == 1.0


def test_near_copy_detected_and_fresh_image_not(refs):
    images, index, items = refs
    rng = np.random.default_rng(5)
    near = np.clip(items[1] + rng.normal(0, 0.02, items[1].shape), 0, 1)[None]
    fresh = _smooth_images(3, seed=99)
    res = detect_copies(np.concatenate([near, fresh]), images, index, expected_item=[1, 1, 1, 1])
    assert res.is_copy.tolist() == [True, False, False, False]
    assert not res.is_any_item_copy[1:].any()
    assert res.copy_rate == 0.25


def test_faded_copy_is_nearest_to_the_item_but_fails_the_ratio_test(refs):
    images, index, items = refs
    faded = 0.55 * items[[1]] + 0.45 * images[[0]]  # closer to the item, but not much closer than to image 0
    res = detect_copies(faded, images, index, expected_item=1)
    assert res.nn_identity == 1.0 and 0.7 < res.ratio[0] < 0.9
    assert res.copy_rate == 0.0


def test_copy_of_other_item_is_not_a_copy_of_the_expected_one(refs):
    images, index, items = refs
    res = detect_copies(items[[3]], images, index, expected_item=0)
    assert not res.is_copy[0] and res.nn1_group[0] == 3 and res.is_any_item_copy[0]


def test_repeated_planted_copies_count_as_one_reference(refs):
    """Repeats of one planted item in the training set must not serve as each other's NN2."""
    images, index, items = refs
    rep = np.concatenate([images, np.repeat(items[[2]], 5, axis=0)])
    rep_index = np.concatenate([index, np.full(5, 2)])
    res = detect_copies(items[[2]], rep, rep_index, expected_item=2)
    assert res.is_copy[0]


def test_neutral_generation_copying_an_item_is_flagged(refs):
    images, index, items = refs
    res = detect_copies(np.concatenate([items[[0]], images[:2]]), images, index, expected_item=-1)
    assert res.is_any_item_copy.tolist() == [True, False, False]
    assert res.copy_rate == 0.0  # no expected item for neutral prompts


def test_copy_detection_rejects_mismatched_resolution(refs):
    images, index, _ = refs
    with pytest.raises(ValueError, match="resolution"):
        detect_copies(np.zeros((1, 16, 16, 3)), images, index, 0)


# ----------------------------------------------------------------------------------------- SSIM, drift, AUC


def test_ssim_identity_is_one():
    x = _smooth_images(3, seed=3)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)


def test_ssim_of_constant_images_matches_closed_form():
    # constant a vs constant b: variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.7, 0.01**2
    x = np.full((1, 16, 16, 3), a)
    y = np.full((1, 16, 16, 3), b)
    np.testing.assert_allclose(ssim(x, y), (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-10)


def test_ssim_matches_scikit_image_when_installed():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (reference check only)")
    rng = np.random.default_rng(4)
    x = _smooth_images(1, seed=4)[0]
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    ref = metrics.structural_similarity(x, y, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False)
    np.testing.assert_allclose(ssim(x, y)[0], ref, rtol=1e-6)


def test_ssim_low_for_unrelated_images():
    x, y = _smooth_images(2, seed=6)
    assert ssim(x, y)[0] < 0.5


def test_drift_zero_for_identical_and_exact_for_known_difference():
    x = _smooth_images(4, seed=7)
    assert output_drift(x, x) == 0.0
    np.testing.assert_allclose(rms_drift(np.zeros((2, 4, 4, 3)), np.full((2, 4, 4, 3), 0.5)), [0.5, 0.5])
    with pytest.raises(ValueError):
        output_drift(x, x[:2])


def test_auc_identical_sets_is_half_and_separated_sets_one():
    s = np.array([0.3, 1.2, 0.7, 0.7, 2.0])
    assert roc_auc(s, s) == 0.5
    assert roc_auc([5, 6, 7], [1, 2, 3]) == 1.0
    assert roc_auc([1, 2, 3], [5, 6, 7]) == 0.0
    assert roc_auc([1, 2], [2, 0]) == 0.625  # pairs: 0, 1, tie 0.5, 1


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(8)
    p, n = rng.integers(0, 5, 40), rng.integers(0, 5, 30)
    brute = ((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n))
    assert roc_auc(p, n) == pytest.approx(brute, abs=1e-12)


# ----------------------------------------------------------------------------------------- generation


PROMPTS = ["a red circle", "a blue square", "the zorblax mascot"]


def test_generate_shape_range_and_determinism_per_prompt_and_seed(pipe):
    imgs = generate(pipe, PROMPTS, [0, 1], steps=STEPS, guidance=3.0, batch_size=4)
    assert imgs.shape == (6, 32, 32, 3) and imgs.dtype == np.float32
    assert np.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() <= 1
    # row p * n_seeds + s; same (prompt, seed) alone, in another batch position, gives the same image
    alone = generate(pipe, [PROMPTS[1]], [1], steps=STEPS, guidance=3.0, batch_size=1)
    np.testing.assert_allclose(alone[0], imgs[3], atol=1e-5)
    assert np.abs(imgs[2] - imgs[3]).max() > 1e-3  # other seed, other image


def test_generate_from_embeddings_equals_from_prompts(pipe):
    a = generate(pipe, PROMPTS[:2], [0], steps=STEPS, guidance=3.0)
    b = generate(pipe, None, [0], steps=STEPS, guidance=3.0, prompt_embeds=encode_prompts(pipe, PROMPTS[:2]))
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(UniforgetError):
        generate(pipe, PROMPTS, [0], prompt_embeds=encode_prompts(pipe, PROMPTS))


def test_generate_with_gates(pipe):
    base = generate(pipe, PROMPTS[:1], [0], steps=STEPS, guidance=3.0)
    targets = discover_targets(pipe.unet, ["ffn"])
    ones = {t.key: torch.ones(t.size) for t in targets}
    zeros = {t.key: torch.zeros(t.size) for t in targets}
    np.testing.assert_array_equal(generate(pipe, PROMPTS[:1], [0], steps=STEPS, guidance=3.0, gates=ones), base)
    closed = generate(pipe, PROMPTS[:1], [0], steps=STEPS, guidance=3.0, gates=zeros)
    assert output_drift(base, closed) > 1e-4
    # hooks are gone after the call
    np.testing.assert_array_equal(generate(pipe, PROMPTS[:1], [0], steps=STEPS, guidance=3.0), base)


def test_perturb_embeddings_relative_norm(pipe):
    cond = encode_prompts(pipe, PROMPTS)
    p = perturb_embeddings(cond, 0.1, seed=0)
    rel = (p.embeds - cond.embeds).norm(dim=-1) / cond.embeds.norm(dim=-1)
    torch.testing.assert_close(rel, torch.full_like(rel, 0.1), rtol=1e-4, atol=1e-5)
    assert torch.equal(perturb_embeddings(cond, 0.0).embeds, cond.embeds)
    assert torch.equal(p.negative, cond.negative)
    assert not torch.equal(perturb_embeddings(cond, 0.1, seed=1).embeds, p.embeds)


def _denoise_loss(pipe, embeds, z0, n=24, seed=123):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn((n, *z0.shape[1:]), generator=g)
    z = z0.expand(n, -1, -1, -1)
    with torch.no_grad():
        pred = pipe.unet(pipe.scheduler.add_noise(z, noise, t), t,
                         encoder_hidden_states=embeds.expand(n, -1, -1)).sample
    return float(torch.mean((pred - noise) ** 2))


def test_optimized_perturbation_stays_in_ball_and_lowers_the_denoising_loss(pipe):
    cond = encode_prompts(pipe, PROMPTS[:1])
    target = _smooth_images(1, seed=11)
    opt = optimize_embeddings(pipe, cond, target, rel_norm=0.2, iters=6, timesteps_per_iter=4, seed=0)
    delta = (opt.embeds - cond.embeds).norm(dim=-1)
    assert (delta <= 0.2 * cond.embeds.norm(dim=-1) * (1 + 1e-4)).all() and delta.max() > 0
    z0 = encode_latents(pipe, target)
    assert _denoise_loss(pipe, opt.embeds, z0) < _denoise_loss(pipe, cond.embeds, z0)


# ----------------------------------------------------------------------------------------- Wen's noise norm


def test_wen_recorder_matches_a_hand_written_sampling_loop(pipe):
    steps, guidance, seed, prompt = 3, 4.0, 7, PROMPTS[2]
    scores, _ = noise_norms(pipe, [prompt], [seed], steps=steps, guidance=guidance)
    # the same DDIM trajectory, by hand, reading eps(x_t, c) - eps(x_t, '') at every step
    from diffusers.utils.torch_utils import randn_tensor

    cond = encode_prompts(pipe, [prompt])
    ctx = torch.cat([cond.negative, cond.embeds])
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    lat = randn_tensor((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed)) * sched.init_noise_sigma
    norms = []
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps_u, eps_c = pipe.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            norms.append(float((eps_c - eps_u).norm()))
            lat = sched.step(eps_u + guidance * (eps_c - eps_u), t, lat).prev_sample
    assert scores[0] == pytest.approx(np.mean(norms), rel=1e-4)


def test_wen_auc_of_identical_prompt_sets_is_half(pipe):
    """Batching does not change the scores (up to float rounding, which depends on the batch and thread count
    in oneDNN), and one set against itself ties everywhere: AUC exactly 0.5."""
    a, _ = noise_norms(pipe, PROMPTS, [0, 1], steps=STEPS, guidance=3.0)
    b, _ = noise_norms(pipe, PROMPTS, [0, 1], steps=STEPS, guidance=3.0, batch_size=2)
    assert a.shape == (3,) and np.isfinite(a).all() and (a > 0).all()
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert roc_auc(a, a.copy()) == pytest.approx(0.5, abs=1e-12)


def test_wen_needs_guidance(pipe):
    with pytest.raises(UniforgetError, match="guidance"):
        noise_norms(pipe, PROMPTS[:1], [0], steps=2, guidance=1.0)
    with NoiseNormRecorder(pipe.unet) as rec, pytest.raises(UniforgetError, match="guidance"):
        generate(pipe, PROMPTS[:1], [0], steps=2, guidance=1.0, observer=rec)
