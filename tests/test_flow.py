"""The rectified-flow kernel (DDIM(eta) for alpha = 1 - t, sigma = t) on the exact flow GMM:
the exact velocity, the step's identities, sampling statistics against exact draws, and every
sampler running unchanged on it with the same NFE accounting."""

import math

import pytest
import scipy.stats as st
import torch

from ntrk_lightning import DPS, NTRK, SMC, SVDD, BestOfN, Plain, sample
from ntrk_lightning.backbones.gmm import DIM, load_digits_flow_gmm
from ntrk_lightning.kernels import FlowKernel, make_kernel

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def flow_gmm():
    return load_digits_flow_gmm()


def _class_of(gmm, x):
    """Digit class of the most likely mixture component of each sample (an exact classifier)."""
    xf = x.reshape(x.shape[0], DIM).double()
    one = torch.ones(xf.shape[0], dtype=torch.float64)
    logp, _, _ = gmm._component_terms(xf, one, torch.zeros_like(one))
    return gmm.labels[logp.argmax(1)]


def test_exact_velocity_is_the_conditional_mean_of_eps_minus_x0(flow_gmm):
    """v(x_t) = E[eps - x0 | x_t] is characterised by: the residual (eps - x0) - v has mean zero and
    is uncorrelated with any function of x_t, here v itself and x_t. 4000 pairs per time: the
    sample correlations have SE ~ 1/sqrt(4000 * 64) ~ 0.002, so 0.02 is ~10 SE."""
    _, gmm, _ = flow_gmm
    g = torch.Generator().manual_seed(0)
    x0, _ = gmm.sample_data(4000, g)
    for s in (0.05, 0.5, 0.95, 1.0):
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - s) * x0 + s * eps
        v = gmm.velocity(xt, torch.full((4000,), 1000.0 * s))
        res = ((eps - x0) - v).flatten(1)
        assert res.mean(0).abs().max() < 5 * res.std(0).max() / math.sqrt(4000)
        for f in (v.flatten(1), xt.flatten(1)):
            corr = (res * (f - f.mean(0))).mean() / (res.std() * f.std())
            assert abs(float(corr)) < 0.02, (s, float(corr))
        # dropping the posterior shrinkage term (x0 estimate = component means only) is caught
        if s == 0.5:
            bad = v + 0.1 * xt
            assert abs(float((((eps - x0) - bad).flatten(1) * xt.flatten(1)).mean())) > 0.02


def test_eta_zero_is_the_euler_path_of_the_flow_ode(flow_gmm):
    """With eta = 0 the step is x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i): written out by hand here."""
    model, gmm, sch = flow_gmm
    res = sample(model, sch, None, Plain(eta=0.0), 12, (5, *SHAPE), seed=3)
    ref = sch.__class__.from_config(sch.config)
    ref.set_timesteps(12)
    from ntrk_lightning.noise import NoiseSource, sample_seeds

    x = NoiseSource(sample_seeds(3, 5), SHAPE).randn()
    sig = [float(v) for v in ref.sigmas]
    for i in range(12):
        v = gmm.velocity(x, torch.full((5,), 1000.0 * sig[i]))
        x = x + (sig[i + 1] - sig[i]) * v
    assert torch.allclose(res.samples, x, atol=1e-5)
    # small eta stays close to the ODE path, eta = 1 does not
    near = sample(model, sch, None, Plain(eta=1e-3), 12, (5, *SHAPE), seed=3)
    far = sample(model, sch, None, Plain(eta=1.0), 12, (5, *SHAPE), seed=3)
    assert (near.samples - x).abs().max() < 0.05 < (far.samples - x).abs().max()


def test_flow_step_is_gaussian_around_the_pretrained_mean(flow_gmm):
    """x_s = a_s x0_hat + sqrt(s^2 - c^2) eps_hat + c z: the noise enters with exactly std c, and
    c matches the closed form c = eta s sqrt(1 - ((1 - t) s / ((1 - s) t))^2)."""
    _, gmm, sch = flow_gmm
    for eta in (1.0, 0.5):
        k = make_kernel(sch.__class__.from_config(sch.config), 10, eta)
        assert isinstance(k, FlowKernel)
        x = torch.randn(3, *SHAPE)
        for i in range(10):
            t, s = k.sigmas[i], k.sigmas[i + 1]
            c = 0.0 if s == 0 else eta * s * math.sqrt(max(0.0, 1 - ((1 - t) * s / ((1 - s) * t)) ** 2))
            assert k.std(i) == pytest.approx(c, abs=1e-12)
            v = gmm.velocity(x, torch.full((3,), 1000.0 * t))
            z = torch.randn_like(x)
            base = k.step(v, i, x, torch.zeros_like(x))
            assert torch.allclose(k.step(v, i, x, z) - base, c * z, atol=1e-6)
            # the mean is the DDIM interpolation of the x0 and eps estimates
            x0, e = x - t * v, x + (1 - t) * v
            assert torch.allclose(base, (1 - s) * x0 + math.sqrt(max(0.0, s * s - c * c)) * e, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("steps, var_lo", [(25, 0.75), (100, 0.88)])
def test_plain_stochastic_flow_sampling_reproduces_the_mixture(flow_gmm, steps, var_lo):
    """512 plain samples vs 512 exact draws: per-pixel means within 5 SE of a difference of means
    (max over 64 pixels: a 5-SE excursion has probability < 64 * 6e-7), the digit-class histogram
    by chi-square (p > 1e-3), total variance within [var_lo, 1.1] of the data's (finite-step
    ancestral sampling loses some variance: measured 0.84 at 25 steps and 0.95 at 100)."""
    model, gmm, sch = flow_gmm
    n = 512
    res = sample(model, sch, None, Plain(), steps, (n, *SHAPE), seed=1)
    x0, lab = gmm.sample_data(n, torch.Generator().manual_seed(0))
    xa, xb = res.samples.flatten(1).double(), x0.flatten(1).double()
    se = torch.sqrt(xa.var(0) / n + xb.var(0) / n)
    assert ((xa.mean(0) - xb.mean(0)).abs() < 5 * se).all()
    ca = torch.bincount(_class_of(gmm, res.samples), minlength=10)
    cb = torch.bincount(lab, minlength=10)
    assert st.chi2_contingency(torch.stack([ca, cb]).numpy() + 1).pvalue > 1e-3
    ratio = float(xa.var(0).sum() / xb.var(0).sum())
    assert var_lo < ratio < 1.1, ratio


def test_every_sampler_runs_on_the_flow_kernel_with_the_same_accounting(flow_gmm, gmm_reward):
    model, _, sch = flow_gmm
    S, B = 8, 3
    expect = {  # (sampler, nfe per sample, gradient evaluations per sample)
        "plain": (Plain(), S, 0),
        "ntrk": (NTRK(rho=0.05), S, S - 1),       # the last flow step (sigma 0.001 -> 0) has no noise
        "ntrk_tilt": (NTRK(mode="tilt", gamma=0.1), S, S - 1),
        "dps": (DPS(scale=0.1), S, S - 1),
        "best_of_n": (BestOfN(n=3), 3 * S, 0),
        "ntrk_dagger": (BestOfN(n=2, inner=NTRK(rho=0.05)), 2 * S, 2 * (S - 1)),
        "svdd": (SVDD(candidates=3), 1 + 3 * (S - 1), 0),
        "smc": (SMC(particles=3), 3 * S, 0),
        "smc_guided": (SMC(particles=2, proposal="guided", lam=1.0), 2 * S, 2 * (S - 1)),
    }
    for name, (spec, nfe, grads) in expect.items():
        res = sample(model, sch, gmm_reward, spec, S, (B, *SHAPE), seed=4)
        assert res.samples.shape == (B, *SHAPE) and torch.isfinite(res.samples).all(), name
        assert res.nfe == nfe and res.grad_evals == grads, (name, res.nfe, res.grad_evals)


@pytest.mark.slow
def test_ntrk_raises_the_reward_on_the_flow_gmm(flow_gmm, gmm_reward, gmm_judge):
    model, _, sch = flow_gmm
    n = 192
    plain = sample(model, sch, gmm_reward, Plain(), 25, (n, *SHAPE), seed=21)
    guided = sample(model, sch, gmm_reward, NTRK(rho=0.05), 25, (n, *SHAPE), seed=21)
    diff = guided.rewards.mean() - plain.rewards.mean()
    se = math.sqrt(guided.rewards.var() / n + plain.rewards.var() / n)
    assert diff > 10 * se, (diff, se)
    acc_g = (gmm_judge(guided.images).argmax(1) == 3).float().mean()
    acc_p = (gmm_judge(plain.images).argmax(1) == 3).float().mean()
    assert acc_g > acc_p + 0.3
