"""The analytic digits GMM: exact eps, exact log-density, exact samples, deterministic cached fit."""

import math

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from ntrk_lightning.backbones import gmm as gmm_mod


def test_eps_is_minus_sigma_times_the_exact_score(gmm_testbed):
    _, gmm, _ = gmm_testbed
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (0, 10, 300, 999):
        abar = gmm.alphas_cumprod[t]
        xf = x.reshape(5, 64).clone().requires_grad_(True)
        # log p_t from scipy's densities of the noised components, differentiated numerically below
        logp, _, _ = gmm._component_terms(xf, abar.sqrt().expand(5), (1 - abar).expand(5))
        (score,) = torch.autograd.grad(torch.logsumexp(logp, 1).sum(), xf)
        eps = gmm.eps(x, torch.full((5,), t))
        assert torch.allclose(eps.reshape(5, 64), -(1 - abar).sqrt() * score, atol=1e-8)


def test_log_prob_matches_scipy_and_noised_density_is_a_mixture(gmm_testbed):
    _, gmm, _ = gmm_testbed
    params = gmm_mod.fit_digits_gmm()
    x = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5
    # log-densities are around -1000 here: combine scipy's per-component logpdf with logsumexp
    ref = logsumexp([np.log(w) + multivariate_normal(m, c).logpdf(x.numpy())
                     for w, m, c in zip(params.weights, params.means, params.covariances)], axis=0)
    assert np.allclose(gmm.log_prob(x).numpy(), ref, rtol=1e-8)
    # finite-difference check of eps at t=400 against scipy's noised mixture density
    t = 400
    a, s2 = math.sqrt(float(gmm.alphas_cumprod[t])), 1 - float(gmm.alphas_cumprod[t])

    def logpt(v):
        return logsumexp([np.log(w) + multivariate_normal(a * m, a * a * c + s2 * np.eye(64)).logpdf(v)
                          for w, m, c in zip(params.weights, params.means, params.covariances)])

    x0 = x[0].numpy()
    h = 1e-5
    fd = np.array([(logpt(x0 + h * e) - logpt(x0 - h * e)) / (2 * h) for e in np.eye(64)[:6]])
    eps = gmm.eps(x[:1], torch.tensor([t])).reshape(64).numpy()
    assert np.allclose(eps[:6], -math.sqrt(s2) * fd, rtol=1e-4, atol=1e-6)


def test_samples_from_the_mixture(gmm_testbed, gmm_judge):
    _, gmm, _ = gmm_testbed
    x, labels = gmm.sample_data(4000, torch.Generator().manual_seed(0))
    params = gmm_mod.fit_digits_gmm()
    mean = torch.from_numpy((params.weights[:, None] * params.means).sum(0)).float()
    # 4000 samples, pixel std <= 1: mean within 5 SE (5 / sqrt(4000) = 0.08)
    assert (x.flatten(1).mean(0) - mean).abs().max() < 0.08
    # components are class-specific: the held-out judge recognises the component's digit
    acc = (gmm_judge((x + 1) / 2).argmax(1) == labels).float().mean()
    assert acc > 0.85


def test_fit_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NTRK_CACHE", str(tmp_path))
    gmm_mod._fit_cached.cache_clear()
    a = gmm_mod.fit_digits_gmm(components_per_class=2)
    assert list(tmp_path.glob("digits-gmm-*.npz"))
    gmm_mod._fit_cached.cache_clear()
    monkeypatch.setenv("NTRK_CACHE", str(tmp_path / "other"))
    b = gmm_mod.fit_digits_gmm(components_per_class=2)
    assert np.allclose(a.means, b.means) and np.allclose(a.covariances, b.covariances)
    assert a.weights.sum() == np.float64(a.weights.sum()) and abs(a.weights.sum() - 1) < 1e-12
    gmm_mod._fit_cached.cache_clear()
