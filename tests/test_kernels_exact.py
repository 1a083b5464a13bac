"""The shared loop's kernels written out by hand: NTRK's mixing and tilt noise (exact identities and
the Gaussianity of the mixed noise), the search-matched rho, BestOfN(inner) as n inner runs on child
streams, and the rectified-flow DDIM(eta) step (eta = 0: Euler on the flow ODE) with its Tweedie
estimate, on tiny analytic models."""

import math

import pytest
import scipy.stats as st
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from core_models import GaussianDenoiser, Linear, OracleDenoiser, identity, scheduler
from ntrk_lightning import DPS, NTRK, SMC, SVDD, BestOfN, Plain, sample
from ntrk_lightning.noise import NoiseSource, derive_seed, sample_seeds
from ntrk_lightning.samplers.ntrk import expected_max_of_normals
from ntrk_lightning.whitening import whiten

pytestmark = pytest.mark.core

F64 = torch.float64
NOISE: list = []  # module level: sample() deep-copies the scheduler


class RecordingDDIM(DDIMScheduler):
    """Keeps the variance_noise of every real step (not the 1-element sigma probe)."""

    def step(self, model_output, timestep, sample, eta=0.0, variance_noise=None, **kw):
        if model_output.numel() > 1:
            NOISE.append(variance_noise.clone())
        return super().step(model_output, timestep, sample, eta=eta, variance_noise=variance_noise, **kw)


def _recording():
    NOISE.clear()
    return RecordingDDIM(clip_sample=False)


SHAPE = (1, 8, 8)


def _per_sample_direction_reward(n, seed=0):
    """r_i(x) = <a_i, x> with a random direction a_i per sample (chosen by the prompt "i"): with an
    isotropic Gaussian prior the reward gradient at x_t is a positive multiple of a_i."""
    a = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)

    def reward(images, prompts):
        idx = torch.tensor([int(p) for p in prompts])
        return (images.flatten(1) * a[idx].flatten(1).to(images.dtype)).sum(1)

    return a, reward, [str(i) for i in range(n)]


def _step0_noise_and_eps(spec, n, seed):
    sch = _recording()
    den = GaussianDenoiser(sch, torch.zeros(SHAPE, dtype=F64), torch.full(SHAPE, 0.6, dtype=F64))
    a, reward, prompts = _per_sample_direction_reward(n)
    sample(den, sch, reward, spec, 2, (n, *SHAPE), seed=seed, prompts=prompts, decode=identity, dtype=F64)
    src = NoiseSource(sample_seeds(seed, n), SHAPE, dtype=F64)
    src.randn()  # x_T
    return NOISE[0], src.randn(), a


@pytest.mark.parametrize("rho", [0.3, 1.0])
def test_mixing_kernel_noise_is_sqrt_rho_w_plus_sqrt_one_minus_rho_eps(rho):
    n = 6
    z, eps, a = _step0_noise_and_eps(NTRK(rho=rho, whitening="spectral", block=1, grad="tweedie"), n, 3)
    d = a[0].numel()
    w = whiten(math.sqrt(d) * a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1), "spectral", 1)
    assert torch.allclose(z, math.sqrt(rho) * w + math.sqrt(1 - rho) * eps, atol=1e-9)


def test_tilt_kernel_noise_is_whitened_tilted_eps():
    n = 6
    gamma = 0.4
    z, eps, a = _step0_noise_and_eps(NTRK(mode="tilt", gamma=gamma, whitening="radial", block=2), n, 4)
    d = a[0].numel()
    g_hat = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(z, whiten(eps + gamma * math.sqrt(d) * g_hat, "radial", 2), atol=1e-9)


def test_search_matched_rho():
    """rho_i = min(1, (m_K / <w_i, g_hat_i>)^2), m_K = E[max of K standard normals]; the known values
    m_2 = 1/sqrt(pi), m_3 = 3/(2 sqrt(pi)) check the quadrature."""
    assert expected_max_of_normals(1) == 0.0
    assert expected_max_of_normals(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-8)
    assert expected_max_of_normals(3) == pytest.approx(3 / (2 * math.sqrt(math.pi)), abs=1e-8)
    draws = torch.randn(200000, 5, generator=torch.Generator().manual_seed(0), dtype=F64).max(1).values
    assert expected_max_of_normals(5) == pytest.approx(float(draws.mean()), abs=5 * float(draws.std()) / 447)
    n, k = 6, 4
    z, eps, a = _step0_noise_and_eps(NTRK(search_k=k, whitening="spectral", block=1, grad="tweedie"), n, 5)
    d = a[0].numel()
    g_hat = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    w = whiten(math.sqrt(d) * g_hat, "spectral", 1)
    along = (w * g_hat).flatten(1).sum(1)
    rho = (expected_max_of_normals(k) / along).pow(2).clamp(max=1.0).view(-1, 1, 1, 1)
    assert torch.allclose(z, rho.sqrt() * w + (1 - rho).sqrt() * eps, atol=1e-9)


def test_mixed_noise_is_statistically_standard_gaussian():
    """With a random gradient direction per sample, sqrt(rho) W(g) + sqrt(1 - rho) eps must look like
    N(0, I) noise, by the same checks as the whitening operator's (tests/test_whitening.py), on
    N = 1500 samples of 8x8: pooled mean within 0.01 (SE 0.0005) and variance within 0.02
    (SE sqrt(2 / 96000) = 0.0046); kurtosis within 0.05 of 3 (SE 0.016, plus O(1/d) from the
    projection); off-diagonal pixel covariances < 6 / sqrt(N) (max of 2016 Gaussian pairs ~4 SE);
    one pixel vs N(0, 1) by KS (p > 1e-3). Plain noise passes the same checks."""
    n = 1500
    z, eps, _ = _step0_noise_and_eps(NTRK(rho=0.5, whitening="spectral", block=1, grad="tweedie"), n, 6)
    for noise in (eps, z):
        p = noise.flatten()
        assert abs(float(p.mean())) < 0.01
        assert abs(float(p.var()) - 1) < 0.02
        kurt = float(((p - p.mean()) ** 4).mean() / p.var() ** 2)
        assert abs(kurt - 3.0) < 0.05
        cov = torch.cov(noise.flatten(1).T)
        off = cov - torch.diag(torch.diag(cov))
        assert off.abs().max() < 6 / math.sqrt(n)
        assert st.kstest(noise[:, 0, 3, 5].numpy(), "norm").pvalue > 1e-3


# ---- BestOfN(inner) ----------------------------------------------------------------------------

def test_best_of_n_runs_the_inner_sampler_on_child_streams():
    """Trajectory j of sample i is the inner sampler run alone on seed derive_seed(seed_i, 0, j)
    (NoiseSource.spawn), so its final reward is that run's; the returned sample is the best one;
    NFE and gradients are n times the inner sampler's. n = 1 is the inner sampler itself."""
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64))
    reward = Linear(torch.linspace(-1, 1, 6, dtype=F64))
    inner = NTRK(rho=0.3, grad="tweedie")
    seeds = sample_seeds(2, 3)
    res = sample(den, sch, reward, BestOfN(n=4, inner=inner), 5, (3, 6), seed=seeds, decode=identity, dtype=F64)
    assert res.nfe == 4 * 5 and res.grad_evals == 4 * 4
    child = [derive_seed(s, 0, j) for s in seeds for j in range(4)]
    alone = sample(den, sch, reward, inner, 5, (12, 6), seed=child, decode=identity, dtype=F64)
    assert torch.allclose(res.extras["trajectory_rewards"].double(), alone.rewards.view(3, 4).double(), atol=1e-6)
    best = alone.rewards.view(3, 4).argmax(1)
    assert torch.equal(res.extras["chosen"], best)
    assert torch.allclose(res.samples, alone.samples.view(3, 4, 6)[torch.arange(3), best], atol=1e-12)
    one = sample(den, sch, reward, BestOfN(n=1, inner=inner), 5, (3, 6), seed=seeds, decode=identity, dtype=F64)
    direct = sample(den, sch, reward, inner, 5, (3, 6), seed=seeds, decode=identity, dtype=F64)
    assert torch.equal(one.samples, direct.samples) and one.nfe == direct.nfe


# ---- rectified flow ----------------------------------------------------------------------------

class GaussianVelocity:
    """Exact velocity E[eps - x0 | x_t] for x0 ~ N(m, s^2), x_t = (1 - t) x0 + t eps; the network
    time is the scheduler's timestep (t * 1000)."""

    def __init__(self, mean: float, std: float) -> None:
        self.m, self.s2 = mean, std * std

    def __call__(self, x, t):
        tt = (t.double() / 1000.0).view(-1, *([1] * (x.dim() - 1)))
        a, s = 1 - tt, tt
        x0 = self.m + a * self.s2 / (a * a * self.s2 + s * s) * (x - a * self.m)
        eps = (x - a * x0) / s
        return (eps - x0).to(x.dtype)


def _flow_reference(v, sigmas, x, eta, noise):
    """x_s = (1 - s) x0_hat + sqrt(s^2 - c^2) eps_hat + c z, c = eta s sqrt(1 - ((1-t) s / ((1-s) t))^2)."""
    for i in range(len(sigmas) - 1):
        t, s = sigmas[i], sigmas[i + 1]
        out = v(x, torch.full((x.shape[0],), t * 1000.0))
        x0, eps = x - t * out, x + (1 - t) * out
        if s == 0:
            x = x0
            continue
        c = eta * s * math.sqrt(max(0.0, 1 - ((1 - t) * s / ((1 - s) * t)) ** 2))
        x = (1 - s) * x0 + math.sqrt(s * s - c * c) * eps + c * noise.randn()
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_flow_step_against_the_hand_written_formula(eta):
    """eta = 0 is the Euler path x_s = x_t + (s - t) v(x_t) of the flow ODE; eta > 0 the DDIM(eta)
    step of the (1 - t, t) schedule, written out here."""
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    v = GaussianVelocity(0.2, 0.7)
    n, steps = 5, 8
    res = sample(v, sch, None, Plain(eta=eta), steps, (n, 6), seed=1, decode=identity, dtype=F64)
    ref_sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref_sch.set_timesteps(steps)
    sigmas = [float(s) for s in ref_sch.sigmas]
    noise = NoiseSource(sample_seeds(1, n), (6,), dtype=F64)
    x = noise.randn()
    ref = _flow_reference(v, sigmas, x.clone(), eta, noise)
    assert torch.allclose(res.samples, ref, atol=1e-9)
    if eta == 0.0:
        x_e = x.clone()
        for t, s in zip(sigmas[:-1], sigmas[1:]):
            x_e = x_e + (s - t) * v(x_e, torch.full((n,), t * 1000.0))
        assert torch.allclose(res.samples, x_e, atol=1e-9)


def test_flow_tweedie_estimate_and_gradient_scale():
    """x0_hat = x_t - t v inverts the flow noising for the oracle velocity (x_t - x0) / t, at every
    step; the tweedie-mode gradient of <a, x0_hat> is a itself (d x0_hat / d x_t = 1 with v fixed)."""
    sch = FlowMatchEulerDiscreteScheduler()
    x0 = torch.linspace(-0.7, 0.9, 6, dtype=F64)[None]

    def oracle(x, t):
        tt = (t.double() / 1000.0).view(-1, 1)
        return (x - x0) / tt

    seen = []

    def reward(images):
        seen.append(images.clone())
        return images.sum(1)

    sample(oracle, sch, reward, SVDD(candidates=2), 6, (3, 6), seed=2, decode=identity, dtype=F64)
    assert len(seen) >= 5 and all(torch.allclose(s, x0.expand_as(s), atol=1e-9) for s in seen)
    a = torch.linspace(1.0, -0.5, 6, dtype=F64)
    v = GaussianVelocity(0.0, 0.8)
    xs = {}
    for name, spec in (("plain", Plain()), ("dps", DPS(scale=0.05, form="unnormalized", grad="tweedie"))):
        rec = []

        def model(x, t, rec=rec):
            rec.append(x.detach().clone())
            return v(x, t)

        sample(model, sch, Linear(a), spec, 4, (2, 6), seed=3, decode=identity, dtype=F64)
        xs[name] = rec
    assert torch.allclose((xs["dps"][1] - xs["plain"][1]) / 0.05, a.expand(2, 6), atol=1e-9)


@pytest.mark.parametrize("spec,nfe,grads", [(Plain(), 6, 0), (NTRK(rho=0.2), 6, 5), (DPS(scale=0.1), 6, 5),
                                            (SVDD(candidates=2), 1 + 2 * 5, 0), (SMC(particles=2), 12, 0),
                                            (BestOfN(n=2, inner=NTRK(rho=0.2)), 12, 10)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_flow_accounting_matches_ddim(spec, nfe, grads):
    """The flow kernel's last step (s = 0) is deterministic like DDIM's: the same counts."""
    sch = FlowMatchEulerDiscreteScheduler()
    res = sample(GaussianVelocity(0.0, 0.8), sch, Linear(torch.ones(6, dtype=F64)), spec, 6, (3, 6), seed=0,
                 decode=identity, dtype=F64)
    assert res.nfe == nfe and res.grad_evals == grads


def test_callback_sees_every_step_with_its_x0_estimate():
    sch = scheduler()
    x0 = torch.linspace(-0.5, 0.5, 6, dtype=F64)[None]
    got = []
    res = sample(OracleDenoiser(sch, x0), sch, None, Plain(), 5, (2, 6), seed=0, decode=identity, dtype=F64,
                 callback=got.append)
    assert [c["step"] for c in got] == list(range(5)) and all(c["num_steps"] == 5 for c in got)
    assert all(torch.allclose(c["denoised"], x0.expand(2, 6), atol=1e-7) for c in got)
    assert torch.equal(got[-1]["x"], res.samples)


@pytest.mark.parametrize("k,rho", [(2, 1 / math.pi), (4, 1.0)])
def test_search_matched_rho_at_unit_alignment(k, rho):
    """One coordinate, identity whitening: w = sign(g), so <w, g_hat> = 1 and rho = min(1, m_K^2):
    1/pi for K = 2 (m_2 = 1/sqrt(pi)), capped at 1 for K = 4 (m_4 = 1.029 > 1)."""
    sch = _recording()
    den = GaussianDenoiser(sch, torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64))
    n = 5
    sample(den, sch, Linear(torch.ones(1, dtype=F64)), NTRK(search_k=k, whitening="identity", grad="tweedie"), 2,
           (n, 1), seed=7, decode=identity, dtype=F64)
    src = NoiseSource(sample_seeds(7, n), (1,), dtype=F64)
    src.randn()
    eps = src.randn()
    assert torch.allclose(NOISE[0], math.sqrt(rho) * 1.0 + math.sqrt(1 - rho) * eps, atol=1e-9)


def test_ntrk_validation_of_the_new_options():
    NTRK(whiten_alpha=0.5).validate()
    for bad, match in ((dict(whiten_alpha=1.5), "whiten_alpha"), (dict(whiten_alpha=0.0), "whiten_alpha"),
                       (dict(search_k=3, mode="tilt"), "search_k"), (dict(search_k=0), "search_k"),
                       (dict(rho=1.5), "rho"), (dict(mode="sideways"), "mode"), (dict(eta=0.0), "eta"),
                       (dict(whitening="pink"), "whitening"), (dict(gamma=-1.0), "gamma")):
        with pytest.raises(ValueError, match=match):
            NTRK(**bad).validate()
