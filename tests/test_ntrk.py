"""The NTRK step and the sampler loop on the exact digits GMM."""

import math

import pytest
import scipy.stats as st
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ntrk_lightning import NTRK, ClassifierFreeGuidance, Plain, make_sampler, sample
from ntrk_lightning.noise import derive_seed, sample_seeds
from ntrk_lightning.schedules import strength

SHAPE = (1, 8, 8)


CALLS: list = []  # module level: sample() deep-copies the scheduler, so instance state would not come back


class RecordingDDIM(DDIMScheduler):
    """Records every step call with the eps and noise it was handed."""

    def step(self, model_output, timestep, sample, eta=0.0, variance_noise=None, **kw):
        out = super().step(model_output, timestep, sample, eta=eta, variance_noise=variance_noise, **kw)
        if model_output.numel() > 1:  # skip the sigma probe of the context
            CALLS.append((model_output.clone(), int(timestep), sample.clone(), eta,
                               variance_noise.clone(), out.prev_sample.clone()))
        return out


def _recording(scheduler):
    CALLS.clear()
    return RecordingDDIM.from_config(scheduler.config)


def test_ntrk_changes_only_the_noise_the_mean_is_pretrained(gmm_testbed, gmm_reward):
    model, gmm, sch = gmm_testbed
    rec = _recording(sch)
    res = sample(model, rec, gmm_reward, NTRK(mode="tilt", gamma=0.5, whitening="spectral"), num_steps=10, shape=(6, *SHAPE), seed=3)
    assert len(CALLS) == 10 and res.nfe == 10
    plain_sched = DDIMScheduler.from_config(sch.config)
    plain_sched.set_timesteps(10)
    tilted_steps = 0
    for eps, t, x, eta, z, prev in CALLS:
        assert eta == 1.0
        # the model output handed to the scheduler is exactly the pretrained eps at x_t
        tt = torch.full((x.shape[0],), t)
        assert torch.allclose(eps, gmm.eps(x, tt), atol=1e-6)
        # x_{t-1} = pretrained mean + sigma_t * z
        mean = plain_sched.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        unit = plain_sched.step(torch.zeros(1), t, torch.zeros(1), eta=1.0, variance_noise=torch.ones(1)).prev_sample
        assert torch.allclose(prev, mean + unit * z, atol=1e-5)
        if unit.item() > 0:
            tilted_steps += 1
            # whitened per-frequency noise: flat unit spectrum, norm sqrt(d)
            assert torch.allclose(torch.fft.fft2(z, norm="ortho").abs(), torch.ones_like(z), atol=1e-4)
    assert tilted_steps == 9  # the last DDIM step has sigma = 0
    assert res.grad_evals == 9


def test_gamma_zero_identity_whitening_is_exactly_plain(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    a = sample(model, sch, gmm_reward, Plain(), 12, (8, *SHAPE), seed=5)
    b = sample(model, sch, gmm_reward, NTRK(mode="tilt", gamma=0.0, whitening="identity"), 12, (8, *SHAPE), seed=5)
    c = sample(model, sch, gmm_reward, NTRK(rho=0.0), 12, (8, *SHAPE), seed=5)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.samples, c.samples)
    assert b.grad_evals == 0 and b.nfe == a.nfe == 12


def test_gamma_zero_matches_plain_in_distribution(gmm_testbed, gmm_reward, gmm_judge):
    """With gamma = 0 the step noise is W(eps): no longer exactly Gaussian, but statistically white
    noise, so the sample distribution must match plain sampling. Independent seeds, 768 samples
    each; two-sample KS on the exact log-likelihood and the reward (p > 1e-3), chi-square on the
    judge's class histogram (p > 1e-3), per-pixel means within 5 SE of a difference of means."""
    model, gmm, sch = gmm_testbed
    n = 768
    plain = sample(model, sch, gmm_reward, Plain(), 25, (n, *SHAPE), seed=11)
    ntrk0 = sample(model, sch, gmm_reward, NTRK(mode="tilt", gamma=0.0), 25, (n, *SHAPE), seed=12)
    assert ntrk0.grad_evals == 0
    lp_a, lp_b = gmm.log_prob(plain.samples), gmm.log_prob(ntrk0.samples)
    assert st.ks_2samp(lp_a.numpy(), lp_b.numpy()).pvalue > 1e-3
    assert st.ks_2samp(plain.rewards.numpy(), ntrk0.rewards.numpy()).pvalue > 1e-3
    ca = torch.bincount(gmm_judge(plain.images).argmax(1), minlength=10)
    cb = torch.bincount(gmm_judge(ntrk0.images).argmax(1), minlength=10)
    assert st.chi2_contingency(torch.stack([ca, cb]).numpy() + 1).pvalue > 1e-3
    xa, xb = plain.samples.flatten(1), ntrk0.samples.flatten(1)
    se = torch.sqrt(xa.var(0) / n + xb.var(0) / n)
    assert ((xa.mean(0) - xb.mean(0)).abs() < 5 * se + 1e-6).all()


def test_ntrk_raises_reward_far_beyond_seed_noise(gmm_testbed, gmm_reward, gmm_judge):
    model, gmm, sch = gmm_testbed
    n = 256
    plain = sample(model, sch, gmm_reward, Plain(), 25, (n, *SHAPE), seed=21)
    for spec in (NTRK(mode="tilt", gamma=0.2), NTRK(mode="tilt", gamma=0.2, whitening="radial", block=2),
                 NTRK(rho=0.09), NTRK(mode="tilt", gamma=0.3, grad="tweedie")):
        guided = sample(model, sch, gmm_reward, spec, 25, (n, *SHAPE), seed=21)
        diff = guided.rewards.mean() - plain.rewards.mean()
        se = math.sqrt(guided.rewards.var() / n + plain.rewards.var() / n)
        assert diff > 10 * se, (spec, diff, se)
        # the independent judge agrees that more samples are the target digit
        acc_g = (gmm_judge(guided.images).argmax(1) == 3).float().mean()
        acc_p = (gmm_judge(plain.images).argmax(1) == 3).float().mean()
        assert acc_g > acc_p + 0.3
        assert guided.nfe == 25 and guided.grad_evals == 24


def test_nan_gradient_falls_back_to_plain_noise_and_is_counted(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed

    def reward(images):
        r = gmm_reward(images)
        return torch.cat([r[:1] * float("nan"), r[1:]])  # sample 0 always gets a NaN gradient

    plain = sample(model, sch, None, Plain(), 10, (4, *SHAPE), seed=7)
    res = sample(model, sch, reward, NTRK(mode="tilt", gamma=0.5, whitening="identity"), 10, (4, *SHAPE), seed=7)
    assert res.nan_fallbacks == 9  # one sample x the 9 steps that have noise
    assert res.nan_fallbacks_per_sample.tolist() == [9, 0, 0, 0]
    assert torch.allclose(res.samples[0], plain.samples[0], atol=1e-6)
    assert not torch.allclose(res.samples[1:], plain.samples[1:], atol=1e-3)
    assert torch.isfinite(res.samples).all()


def test_tweedie_mode_does_not_backprop_through_the_denoiser(gmm_testbed, gmm_reward):
    model, gmm, sch = gmm_testbed
    seen = []

    def eps(x, t):
        seen.append(x.requires_grad)
        return gmm.eps(x, t)

    sample(eps, sch, gmm_reward, NTRK(mode="tilt", gamma=0.3, grad="tweedie"), 5, (2, *SHAPE), seed=0)
    assert seen and not any(seen)
    seen.clear()
    sample(eps, sch, gmm_reward, NTRK(mode="tilt", gamma=0.3, grad="denoiser"), 5, (2, *SHAPE), seed=0)
    assert sum(seen) == 4  # every step with noise differentiates through the denoiser


@pytest.mark.core
def test_window_and_linear_schedule():
    assert strength(0, 10, 2.0, 0.0) == 2.0 and strength(9, 10, 2.0, 0.0) == 0.0
    assert strength(3, 10, 1.0, None, (0.0, 0.3)) == 0.0 and strength(2, 10, 1.0, None, (0.0, 0.3)) == 1.0
    spec = NTRK(mode="tilt", gamma=1.0, gamma_end=0.0, window=(0.2, 0.6))
    assert [spec.strength_at(i, 10) for i in range(10)] == pytest.approx(
        [0, 0, 1 - 2 / 9, 1 - 3 / 9, 1 - 4 / 9, 1 - 5 / 9, 0, 0, 0, 0])


def test_window_limits_gradient_work(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    res = sample(model, sch, gmm_reward, NTRK(mode="tilt", gamma=0.3, window=(0.0, 0.5)), 25, (2, *SHAPE), seed=0)
    assert res.grad_evals == 13 and res.nfe == 25  # steps 0..12 have i/25 < 0.5


def test_samples_do_not_depend_on_batch_composition(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    seeds = [derive_seed(9, 0, i) for i in range(6)]
    for spec in (Plain(), NTRK(mode="tilt", gamma=0.3)):
        whole = sample(model, sch, gmm_reward, spec, 8, seed=seeds)
        parts = [sample(model, sch, gmm_reward, spec, 8, seed=s) for s in (seeds[:2], seeds[2:5], seeds[5:])]
        assert torch.allclose(whole.samples, torch.cat([p.samples for p in parts]), atol=1e-5)
    assert sample_seeds(9, 6) == seeds


def test_guidance_refuses_inference_mode(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        sample(model, sch, gmm_reward, NTRK(), 3, (2, *SHAPE), seed=0)


@pytest.mark.core
def test_classifier_free_guidance_with_conditioning():
    """A toy conditional denoiser: eps = x - c. CFG must combine branches and cond must follow rows."""
    sch = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")

    def net(x, t, c):
        return 0.1 * x - c[:, :, None, None]

    cfg = ClassifierFreeGuidance(net, scale=3.0)
    x = torch.randn(2, 1, 4, 4)
    c, u = torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1)
    manual = net(x, None, u) + 3.0 * (net(x, None, c) - net(x, None, u))
    assert torch.allclose(cfg(x, torch.zeros(2, dtype=torch.long), (c, u)), manual)
    reward = lambda img: img.mean((1, 2, 3))  # noqa: E731
    res = sample(cfg, sch, reward, NTRK(mode="tilt", gamma=0.2), 6, (2, 1, 4, 4), seed=0, cond=(c, u))
    res_swapped = sample(cfg, sch, reward, NTRK(mode="tilt", gamma=0.2), 6, (2, 1, 4, 4), seed=0, cond=(c.flip(0), u))
    assert not torch.allclose(res.samples, res_swapped.samples)
    assert res.nfe == 6


@pytest.mark.core
def test_prompts_reach_the_reward():
    """Reward +mean for prompt "up", -mean for "down". Every seed is sampled twice on the same noise,
    once with each prompt, so the paired difference mean(up) - mean(down) is exactly 0 unless the
    prompt reaches the reward of its own row; over 32 seeds its mean must exceed 4 standard errors
    (a property of the guidance: the single-pair version of this check held for ~62% of seeds)."""
    sch = DDIMScheduler(clip_sample=False)
    got = []

    def reward(images, prompts):
        got.append(list(prompts))
        return images.mean((1, 2, 3)) * torch.tensor([1.0 if p == "up" else -1.0 for p in prompts])

    n = 32
    prompts = ["up", "down"] * (n // 2)
    swapped = ["down", "up"] * (n // 2)
    runs = [sample(lambda x, t: 0.1 * x, sch, reward, NTRK(mode="tilt", gamma=0.5), 4, (n, 1, 4, 4), seed=0, prompts=p)
            for p in (prompts, swapped)]
    assert got and all(g in (prompts, swapped) for g in got)
    sign = torch.tensor([1.0 if p == "up" else -1.0 for p in prompts])
    diff = (runs[0].images.mean((1, 2, 3)) - runs[1].images.mean((1, 2, 3))) * sign
    assert diff.mean() > 4 * diff.std() / math.sqrt(n), (float(diff.mean()), float(diff.std()))


def test_bad_input_is_refused_early(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    calls = []

    def eps(x, t):
        calls.append(1)
        return x

    bad = [
        (dict(sampler=NTRK(mode="sideways")), ValueError, "mode"),
        (dict(sampler=NTRK(eta=0.0)), ValueError, "eta"),
        (dict(sampler=NTRK(window=(0.5, 0.2))), ValueError, "window"),
        (dict(sampler=NTRK(whitening="pink")), ValueError, "whitening"),
        (dict(sampler=NTRK(rho=1.5)), ValueError, "rho"),
        (dict(scheduler=DDPMScheduler()), TypeError, "DDIMScheduler"),
        (dict(scheduler=DDIMScheduler(prediction_type="v_prediction")), ValueError, "epsilon"),
        (dict(reward=None), ValueError, "needs a reward"),
        (dict(prompts=["a"]), ValueError, "prompts"),
        (dict(num_steps=0), ValueError, "num_steps"),
    ]
    for over, exc, msg in bad:
        kw = dict(denoiser=eps, scheduler=sch, reward=gmm_reward, sampler=NTRK(), num_steps=3,
                  shape=(2, *SHAPE), seed=0)
        kw.update(over)
        with pytest.raises(exc, match=msg):
            sample(**kw)
    assert not calls  # refused before any model work
    with pytest.raises(ValueError, match="shape"):
        sample(eps, sch, lambda im: im.mean(), NTRK(), 3, (2, *SHAPE), seed=0)  # reward of wrong shape
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("nope")
    assert make_sampler("ntrk", gamma=2.0).gamma == 2.0
