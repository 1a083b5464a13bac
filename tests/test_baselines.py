"""Baselines on the shared loop: NFE accounting, reductions to plain sampling, the
particle-weight utilities, and reward gains over plain sampling on the exact digits GMM."""

import math

import pytest
import scipy.stats as st
import torch

from ntrk_lightning import DPS, SMC, SVDD, BestOfN, Plain, make_sampler, sample
from ntrk_lightning.noise import derive_seed
from ntrk_lightning.samplers.resampling import (categorical, ess, flat_indices, multinomial_resample,
                                                 normalize_log_weights, systematic_resample)

SHAPE = (1, 8, 8)
S = 25


# ---- NFE accounting and reductions to plain sampling ----------------------------------------------

def test_best_of_n_spends_n_times_s_and_never_loses_to_its_first_trajectory(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    res = sample(model, sch, gmm_reward, BestOfN(n=4), S, (32, *SHAPE), seed=1)
    assert res.nfe == 4 * S and res.grad_evals == 0
    traj = res.extras["trajectory_rewards"]
    assert traj.shape == (32, 4)
    assert torch.all(res.rewards >= traj[:, 0] - 1e-5)
    assert torch.allclose(res.rewards, traj.max(dim=1).values, atol=1e-5)
    # trajectory 0 of sample i is a plain trajectory of its own: not the same stream as plain
    one = sample(model, sch, gmm_reward, BestOfN(n=1), S, (8, *SHAPE), seed=1)
    plain = sample(model, sch, gmm_reward, Plain(), S, (8, *SHAPE), seed=1)
    assert torch.equal(one.samples, plain.samples) and one.nfe == S


def test_svdd_with_one_candidate_is_plain_sampling(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    plain = sample(model, sch, gmm_reward, Plain(), S, (8, *SHAPE), seed=2)
    svdd1 = sample(model, sch, gmm_reward, SVDD(candidates=1), S, (8, *SHAPE), seed=2)
    assert torch.equal(plain.samples, svdd1.samples)
    assert svdd1.nfe == S
    k = 4
    svdd = sample(model, sch, gmm_reward, SVDD(candidates=k), S, (8, *SHAPE), seed=2)
    # one eps for x_T, then every stochastic step (all but DDIM's last, which has sigma = 0)
    # evaluates K candidate eps at the next timestep; the chosen one's eps is reused
    assert svdd.nfe == 1 + k * (S - 1)
    assert svdd.extras["scored_steps"] == S - 1
    assert svdd.extras["mean_selected_gain"] > 0


def test_svdd_nfe_formula(gmm_testbed, gmm_reward):
    """1 eps for x_T + K candidate eps at each of the S - 1 stochastic steps."""
    model, _, sch = gmm_testbed
    for k, steps in ((2, 5), (3, 10)):
        res = sample(model, sch, gmm_reward, SVDD(candidates=k), steps, (3, *SHAPE), seed=0)
        assert res.nfe == 1 + k * (steps - 1), (k, steps, res.nfe)


def test_smc_nfe_and_particles(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    res = sample(model, sch, gmm_reward, SMC(particles=4), S, (6, *SHAPE), seed=3)
    assert res.nfe == 4 * S and res.grad_evals == 0
    assert res.samples.shape == (6, *SHAPE) and res.extras["particles"] == 4
    guided = sample(model, sch, gmm_reward, SMC(particles=3, proposal="guided"), 10, (2, *SHAPE), seed=3)
    assert guided.nfe == 3 * 10 and guided.grad_evals == 3 * 9  # no gradient at the sigma = 0 step
    plain = sample(model, sch, gmm_reward, Plain(), S, (6, *SHAPE), seed=3)
    one = sample(model, sch, gmm_reward, SMC(particles=1), S, (6, *SHAPE), seed=3)
    assert torch.equal(plain.samples, one.samples)


def test_dps_accounting_and_zero_scale_is_plain(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    res = sample(model, sch, gmm_reward, DPS(scale=0.1), S, (4, *SHAPE), seed=4)
    assert res.nfe == S and res.grad_evals == S - 1  # the sigma = 0 step takes no normalized shift
    un = sample(model, sch, gmm_reward, DPS(scale=0.01, form="unnormalized"), S, (4, *SHAPE), seed=4)
    assert un.grad_evals == S
    zero = sample(model, sch, gmm_reward, DPS(scale=0.0), S, (4, *SHAPE), seed=4)
    plain = sample(model, sch, gmm_reward, Plain(), S, (4, *SHAPE), seed=4)
    assert torch.equal(zero.samples, plain.samples) and zero.grad_evals == 0


def test_smc_with_a_constant_reward_is_plain_sampling_in_distribution(gmm_testbed, gmm_judge):
    """A constant reward makes every potential 1: weights stay uniform, the ESS stays K, and the
    returned particle is a plain sample. With resampling forced at every step (multinomial,
    duplicating particles at random) the marginal law must still be the plain one. Independent
    seeds, 512 samples each; KS on the exact log-likelihood and chi-square on the judge's classes
    (p > 1e-3)."""
    model, gmm, sch = gmm_testbed
    const = lambda images: torch.zeros(images.shape[0])  # noqa: E731
    n = 512
    plain = sample(model, sch, const, Plain(), S, (n, *SHAPE), seed=31)
    smc = sample(model, sch, const, SMC(particles=4, ess_threshold=0.5), S, (n, *SHAPE), seed=32)
    assert smc.extras["resampling_events"] == 0 and smc.extras["mean_ess"] == pytest.approx(1.0)
    forced = sample(model, sch, const, SMC(particles=4, ess_threshold=1.0, resampling="multinomial",
                                           select="sample"), S, (n, *SHAPE), seed=33)
    assert forced.extras["resampling_events"] == S
    assert forced.samples.shape == (n, *SHAPE) and forced.extras["particles"] == 4
    lp0 = gmm.log_prob(plain.samples).numpy()
    for res in (smc, forced):
        assert st.ks_2samp(lp0, gmm.log_prob(res.samples).numpy()).pvalue > 1e-3
        ca = torch.bincount(gmm_judge(plain.images).argmax(1), minlength=10)
        cb = torch.bincount(gmm_judge(res.images).argmax(1), minlength=10)
        assert st.chi2_contingency(torch.stack([ca, cb]).numpy() + 1).pvalue > 1e-3


# ---- every baseline beats plain sampling at its budget --------------------------------------

@pytest.mark.parametrize("spec", [DPS(scale=0.05), BestOfN(n=4), SVDD(candidates=4), SVDD(candidates=4, alpha=0.5),
                                  SMC(particles=4, lam=2.0), SMC(particles=4, lam=2.0, potential="max"),
                                  SMC(particles=4, lam=1.0, proposal="guided", tempering="linear")],
                         ids=lambda s: f"{s.name}")
def test_each_baseline_raises_the_reward(gmm_testbed, gmm_reward, spec):
    model, _, sch = gmm_testbed
    n = 128
    plain = sample(model, sch, gmm_reward, Plain(), S, (n, *SHAPE), seed=41)
    res = sample(model, sch, gmm_reward, spec, S, (n, *SHAPE), seed=41)
    diff = res.rewards.mean() - plain.rewards.mean()
    se = math.sqrt(res.rewards.var() / n + plain.rewards.var() / n)
    assert diff > 4 * se, (spec, float(diff), se)


def test_baselines_do_not_depend_on_batch_composition(gmm_testbed, gmm_reward):
    model, _, sch = gmm_testbed
    seeds = [derive_seed(5, 0, i) for i in range(5)]
    for spec in (DPS(scale=0.05), BestOfN(n=3), SVDD(candidates=3, alpha=0.3),
                 SMC(particles=3, lam=2.0, resampling="multinomial", select="sample")):
        whole = sample(model, sch, gmm_reward, spec, 8, seed=seeds)
        parts = [sample(model, sch, gmm_reward, spec, 8, seed=s) for s in (seeds[:2], seeds[2:])]
        assert torch.allclose(whole.samples, torch.cat([p.samples for p in parts]), atol=1e-5), spec.name


@pytest.mark.core
def test_bad_baseline_arguments():
    for name, kw, msg in [("best_of_n", {"n": 0}, "n must"), ("svdd", {"candidates": 0}, "candidates"),
                          ("svdd", {"eta": 0.0}, "eta"), ("smc", {"particles": 0}, "particles"),
                          ("smc", {"potential": "sideways"}, "potential"), ("smc", {"ess_threshold": 2.0}, "ess"),
                          ("dps", {"form": "odd"}, "form"), ("dps", {"scale": float("nan")}, "scale"),
                          ("dps", {"eta": 0.0}, "eta")]:
        with pytest.raises(ValueError, match=msg):
            make_sampler(name, **kw)


# ---- particle-weight utilities ---------------------------------------------------------------

@pytest.mark.core
def test_ess_extremes_and_normalization():
    k = 8
    uniform = torch.full((3, k), 1.0 / k, dtype=torch.float64)
    assert torch.allclose(ess(uniform), torch.full((3,), float(k), dtype=torch.float64))
    onehot = torch.zeros(2, k, dtype=torch.float64)
    onehot[:, 3] = 1
    assert torch.allclose(ess(onehot), torch.ones(2, dtype=torch.float64))
    # ESS is scale invariant and between 1 and K
    w = torch.rand(50, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = ess(w)
    assert torch.allclose(e, ess(w * 7.5)) and (e >= 1 - 1e-12).all() and (e <= k + 1e-12).all()
    lw = torch.tensor([[0.0, float("nan"), float("inf"), -1.0], [float("-inf")] * 4], dtype=torch.float64)
    nw = normalize_log_weights(lw)
    assert torch.allclose(nw.sum(1), torch.ones(2, dtype=torch.float64))
    assert nw[0, 1] == 0 and nw[0, 2] == 0 and nw[0, 0] > nw[0, 3] > 0
    assert torch.allclose(nw[1], torch.full((4,), 0.25, dtype=torch.float64))  # nothing finite: uniform
    with pytest.raises(ValueError):
        ess(torch.tensor([[-0.1, 1.1]]))


@pytest.mark.core
def test_systematic_resampling_copies_floor_or_ceil_of_k_w():
    g = torch.Generator().manual_seed(1)
    k = 7
    w = torch.rand(200, k, dtype=torch.float64, generator=g) ** 3
    w = w / w.sum(1, keepdim=True)
    anc = systematic_resample(w, torch.rand(200, dtype=torch.float64, generator=g))
    counts = torch.nn.functional.one_hot(anc, k).sum(1).double()
    assert (counts >= torch.floor(k * w) - 1e-9).all() and (counts <= torch.ceil(k * w) + 1e-9).all()
    assert (counts.sum(1) == k).all()
    zero = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)
    assert 1 not in systematic_resample(zero, torch.tensor([0.999], dtype=torch.float64)).tolist()[0]


@pytest.mark.core
def test_multinomial_resampling_is_unbiased():
    """E[copies of j] = K w_j: 20000 groups, so each mean count has SE <= sqrt(K w (1-w) / 20000)
    < 0.011; allow 0.05."""
    g = torch.Generator().manual_seed(2)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).expand(20000, 4)
    anc = multinomial_resample(w, torch.rand(20000, 4, dtype=torch.float64, generator=g))
    mean_counts = torch.nn.functional.one_hot(anc, 4).sum(1).double().mean(0)
    assert torch.allclose(mean_counts, 4 * w[0], atol=0.05)
    c = categorical(w, torch.rand(20000, dtype=torch.float64, generator=g))
    freq = torch.bincount(c, minlength=4).double() / 20000
    assert torch.allclose(freq, w[0], atol=0.02)
    with pytest.raises(ValueError):
        multinomial_resample(w[:2], torch.rand(2, 3, dtype=torch.float64))


@pytest.mark.core
def test_flat_indices_stay_in_their_group():
    local = torch.tensor([[0, 0, 2], [1, 2, 2]])
    assert flat_indices(local, 3).tolist() == [0, 0, 2, 4, 5, 5]
