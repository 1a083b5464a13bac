"""Exact identities of the sampling core, checked on tiny analytic models (tests/core_models.py)
through the public API: Tweedie inversion, hand-written DDIM(eta), the reward-gradient scale of
both gradient modes, the DPS shift size, DPS == identity-whitened tilt NTRK, the NaN fallback
with a non-identity whitening, prompts following rows, and the NFE accounting of every sampler.

All comparisons run in float64 where they are exact identities, so tolerances are round-off."""

import math

import pytest
import torch

from core_models import (GaussianDenoiser, Linear, OracleDenoiser, ddim_reference, ddim_schedule, ddim_sigma,
                         identity, scheduler)
from ntrk_lightning import DAS, DPS, NTRK, RBF, SMC, SVDD, BestOfN, FreeDoM, Plain, PsiSampler, sample
from ntrk_lightning.noise import sample_seeds

pytestmark = pytest.mark.core

D = 6
F64 = torch.float64


def _prior(d=D):
    mean = torch.linspace(-0.5, 0.7, d, dtype=F64)
    std = torch.linspace(0.3, 1.2, d, dtype=F64)
    return mean, std


def _direction(d=D):
    return torch.linspace(1.0, -0.6, d, dtype=F64)


class Recorder:
    """Wraps a denoiser and keeps the (detached) x of every call, so trajectories can be read."""

    def __init__(self, fn):
        self.fn, self.xs = fn, []

    def __call__(self, x, t):
        self.xs.append(x.detach().clone())
        return self.fn(x, t)


# ---- Tweedie's estimate inverts the forward noising ------------------------------------------------

@pytest.mark.parametrize("spec", [SMC(particles=3, lam=0.5), SVDD(candidates=3)], ids=["smc", "svdd"])
def test_tweedie_estimate_inverts_forward_noising_at_every_timestep(spec):
    """With the oracle eps (the noise that maps a fixed x0 to x_t) x0_hat(x_t) = x0 exactly, at
    every timestep and for every particle/candidate; the reward sees x0_hat, so it records x0
    every call. Dividing by abar instead of sqrt(abar), or dropping sqrt(1 - abar), breaks this."""
    sch = scheduler()
    x0 = torch.linspace(-0.9, 0.8, D, dtype=F64)[None]
    seen = []

    def reward(images):
        seen.append(images.detach().clone())
        return images.sum(1)

    sample(OracleDenoiser(sch, x0), sch, reward, spec, 12, (4, D), seed=1, decode=identity, dtype=F64)
    assert len(seen) >= 12
    for x in seen:
        assert torch.allclose(x, x0.expand_as(x), atol=1e-7, rtol=0)  # diffusers uses float32 (1 - abar)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("grad", ["tweedie", "denoiser"])
def test_reward_gradient_scale_of_both_modes(grad, eta):
    """Unnormalised DPS adds s * g to the plain step, so (guided - plain state after step 0) / s is
    the reward gradient the core computed at x_T. For r = <a, x0_hat> and the exact Gaussian eps
    (eps = c (x - sqrt(abar) m), diagonal c):
      tweedie mode:  g = grad_x0 r / sqrt(abar) = a / sqrt(abar)
      denoiser mode: g = d<a, x0_hat(x)>/dx = a (1 - sqrt(1 - abar) c) / sqrt(abar)."""
    sch = scheduler()
    mean, std = _prior()
    a = _direction()
    den = GaussianDenoiser(sch, mean, std)
    s = 0.05
    states = {}
    for name, spec in (("plain", Plain(eta=eta)), ("dps", DPS(scale=s, form="unnormalized", grad=grad, eta=eta))):
        rec = Recorder(den)
        sample(rec, sch, Linear(a), spec, 4, (3, D), seed=2, decode=identity, dtype=F64)
        states[name] = rec.xs
    assert torch.equal(states["plain"][0], states["dps"][0])  # same x_T
    t, abar, _ = ddim_schedule(sch, 4)[0]
    root_a, c = den.coef(t)
    expected = a / root_a if grad == "tweedie" else a * (1 - math.sqrt(1 - abar) * c) / root_a
    got = (states["dps"][1] - states["plain"][1]) / s
    assert torch.allclose(got, expected.expand_as(got), rtol=1e-6, atol=1e-6)


def test_denoiser_mode_gradient_matches_autograd_through_the_composition():
    """Same as above with a non-linear reward, against autograd through eps -> x0_hat -> r written
    here (no core code): the core must differentiate the whole composition."""
    sch = scheduler()
    mean, std = _prior()
    den = GaussianDenoiser(sch, mean, std)

    def reward(img):
        return -(img.flatten(1) - 0.3).pow(2).sum(1) + torch.sin(img.flatten(1)).sum(1)

    s = 0.02
    plain, dps = Recorder(den), Recorder(den)
    sample(plain, sch, reward, Plain(), 3, (2, D), seed=5, decode=identity, dtype=F64)
    sample(dps, sch, reward, DPS(scale=s, form="unnormalized"), 3, (2, D), seed=5, decode=identity, dtype=F64)
    t, abar, _ = ddim_schedule(sch, 3)[0]
    x = plain.xs[0].clone().requires_grad_(True)
    eps = den(x, torch.full((2,), t))
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    (g,) = torch.autograd.grad(reward(x0).sum(), x)
    assert torch.allclose((dps.xs[1] - plain.xs[1]) / s, g, rtol=1e-8, atol=1e-9)


# ---- DDIM(eta) against the hand-written loop ----------------------------------------------------

REDUCTIONS = {
    "plain": lambda eta: Plain(eta=eta),
    "dps_zero": lambda eta: DPS(scale=0.0, form="unnormalized", eta=eta),
    "ntrk_zero": lambda eta: NTRK(mode="tilt", gamma=0.0, whitening="identity", eta=eta),
    "best_of_1": lambda eta: BestOfN(n=1, eta=eta),
    "svdd_1": lambda eta: SVDD(candidates=1, eta=eta),
    "smc_1": lambda eta: SMC(particles=1, eta=eta),
    "freedom_zero": lambda eta: FreeDoM(scale=0.0, form="unnormalized", repeats=0, eta=eta),
    "rbf_budget_s": lambda eta: RBF(budget=7, eta=eta),
    "psi_no_chains_1": lambda eta: PsiSampler(particles=1, lam=0.0, burn_in=0, mcmc_steps=0, eta=eta),
}


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_every_sampler_reduces_to_hand_written_ddim_with_its_eta(name, eta):
    """DDIM(eta): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z with
    sigma = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1 - abar_t/abar_prev), written out in
    core_models.ddim_reference. Each sampler at its zero-strength / one-candidate setting must be
    that loop for its own eta (samplers that need noise refuse eta = 0)."""
    try:
        spec = REDUCTIONS[name](eta)
        spec.validate()
    except ValueError:
        assert eta == 0.0 and name in ("ntrk_zero", "svdd_1", "smc_1", "rbf_budget_s", "psi_no_chains_1")
        return
    sch = scheduler()
    mean, std = _prior()
    den = GaussianDenoiser(sch, mean, std)
    res = sample(den, sch, Linear(_direction()), spec, 7, (5, D), seed=3, decode=identity, dtype=F64)
    ref = ddim_reference(den, sch, 7, (5, D), seed=3, eta=eta)
    # diffusers computes its coefficients from float32 alphas: round-off ~1e-7 per step
    assert torch.allclose(res.samples, ref, rtol=1e-5, atol=1e-5)
    assert res.nfe == 7


def test_eta_changes_the_samples_as_the_formula_says():
    """eta = 0.5 and eta = 1 differ, each matching its own reference (not the other's), and with
    leading spacing / set_alpha_to_one=False the last step is stochastic too."""
    sch = scheduler(set_alpha_to_one=False, timestep_spacing="trailing")
    mean, std = _prior()
    den = GaussianDenoiser(sch, mean, std)
    out = {eta: sample(den, sch, None, Plain(eta=eta), 5, (4, D), seed=8, decode=identity, dtype=F64).samples
           for eta in (0.5, 1.0)}
    for eta in (0.5, 1.0):
        ref = ddim_reference(den, sch, 5, (4, D), seed=8, eta=eta)
        assert torch.allclose(out[eta], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0.5], out[1.0], atol=1e-3)


# ---- DPS: shift size, and equality with identity-whitened tilt NTRK ------------------------------

@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_normalized_dps_shift_is_s_sigma_sqrt_d_along_the_gradient(eta):
    """Normalised DPS moves the plain step by s * sigma_t * sqrt(d) * g/||g||; for r = <a, x0_hat>
    with the Gaussian eps, g is parallel to a (both gradient modes), so the displacement after
    step 0 is s * sigma_0 * sqrt(d) * a / ||a||, sigma_0 from the DDIM formula."""
    sch = scheduler()
    mean, std = _prior()
    a = _direction()
    den = GaussianDenoiser(sch, mean, std)
    s = 0.3
    plain, dps = Recorder(den), Recorder(den)
    sample(plain, sch, None, Plain(eta=eta), 6, (3, D), seed=4, decode=identity, dtype=F64)
    sample(dps, sch, Linear(a), DPS(scale=s, grad="tweedie", eta=eta), 6, (3, D), seed=4, decode=identity, dtype=F64)
    _, abar, abar_prev = ddim_schedule(sch, 6)[0]
    expected = s * ddim_sigma(abar, abar_prev, eta) * math.sqrt(D) * a / a.norm()
    assert torch.allclose(dps.xs[1] - plain.xs[1], expected.expand(3, D), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", ["denoiser", "tweedie"])
def test_normalized_dps_equals_identity_whitened_tilt_ntrk(grad):
    """NTRK tilt noise eps + gamma sqrt(d) g_hat, unwhitened, scaled by sigma_t, is DPS's normalised
    shift: sample for sample equal at gamma = s, with the same gradient and NFE counts."""
    sch = scheduler()
    mean, std = _prior()
    den = GaussianDenoiser(sch, mean, std)

    def reward(img):
        return -(img.flatten(1) - 0.4).pow(2).sum(1)

    for eta in (1.0, 0.6):
        a = sample(den, sch, reward, DPS(scale=0.4, grad=grad, eta=eta), 8, (5, D), seed=6, decode=identity, dtype=F64)
        b = sample(den, sch, reward, NTRK(mode="tilt", gamma=0.4, whitening="identity", grad=grad, eta=eta), 8,
                   (5, D), seed=6, decode=identity, dtype=F64)
        assert torch.allclose(a.samples, b.samples, rtol=1e-6, atol=1e-6)
        assert a.nfe == b.nfe == 8 and a.grad_evals == b.grad_evals == 7


# ---- NaN fallback with a real whitening -------------------------------------------------------

@pytest.mark.parametrize("spec", [NTRK(mode="tilt", gamma=0.5, whitening="spectral", block=1),
                                  NTRK(mode="tilt", gamma=0.5, whitening="sphere"),
                                  NTRK(gamma=0.5, whitening="radial", block=2),
                                  DPS(scale=0.3)], ids=["tilt-spectral", "tilt-sphere", "default-radial", "dps"])
def test_nan_gradient_rows_are_exactly_plain_and_counted(spec):
    """Rows whose reward gradient is NaN fall back to the plain step with the unwhitened noise: with
    a non-identity whitening, deleting the fallback whitens those rows' noise, which changes them.
    The other rows are guided (differ from plain) and every (row, step with noise) is counted."""
    sch = scheduler()
    shape = (4, 1, 4, 4)
    mean, std = torch.zeros(1, 4, 4, dtype=F64), torch.full((1, 4, 4), 0.7, dtype=F64)
    den = GaussianDenoiser(sch, mean, std)
    bad_rows = torch.tensor([True, False, True, False])

    def reward(images):
        # a factor, not torch.where: where's backward would also put 0 * NaN into the good rows
        return images.flatten(1).sum(1) * torch.where(bad_rows, float("nan"), 1.0).to(images.dtype)

    steps = 6
    plain = sample(den, sch, None, Plain(), steps, shape, seed=9, decode=identity, dtype=F64)
    res = sample(den, sch, reward, spec, steps, shape, seed=9, decode=identity, dtype=F64)
    assert torch.equal(res.samples[bad_rows], plain.samples[bad_rows])
    for i in (1, 3):
        assert not torch.allclose(res.samples[i], plain.samples[i], atol=1e-3)
    assert res.nan_fallbacks == 2 * (steps - 1)  # DDIM's last step has sigma = 0
    assert res.nan_fallbacks_per_sample.tolist() == [steps - 1, 0, steps - 1, 0]


# ---- prompts follow rows: a paired property over many seeds ------------------------------------

@pytest.mark.parametrize("spec", [NTRK(gamma=0.5), DPS(scale=0.3), BestOfN(n=3), SVDD(candidates=3),
                                  SMC(particles=3, lam=3.0), FreeDoM(scale=0.3, repeats=1), RBF(budget=30),
                                  DAS(particles=3, lam=3.0),
                                  PsiSampler(particles=3, chains=1, burn_in=2, mcmc_steps=3, lam=3.0)],
                         ids=lambda s: s.name)
def test_prompts_steer_their_own_samples(spec):
    """Reward = +mean(x) for prompt "up", -mean(x) for "down". Each seed is sampled twice, once per
    prompt, on the same noise: only the prompt differs, so the paired difference
    mean(x | up) - mean(x | down) is exactly 0 if prompts do not reach the reward, or reach the wrong
    row. Over 24 seeds the mean difference must exceed 4 standard errors (a property of the
    guidance, not of one seed), and every reward call must see the prompt of its rows."""
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.full((D,), 0.8, dtype=F64))
    n = 24
    seeds = sample_seeds(17, n)
    calls = []

    def reward(images, prompts):
        calls.append(list(prompts))
        sign = torch.tensor([1.0 if p == "up" else -1.0 for p in prompts], dtype=images.dtype)
        return images.flatten(1).mean(1) * sign

    prompts = ["up" if i % 2 == 0 else "down" for i in range(n)]
    swapped = ["down" if p == "up" else "up" for p in prompts]
    a = sample(den, sch, reward, spec, 6, (n, D), seed=seeds, prompts=prompts, decode=identity)
    b = sample(den, sch, reward, spec, 6, (n, D), seed=seeds, prompts=swapped, decode=identity)
    up_minus_down = (a.samples.mean(1) - b.samples.mean(1)) * torch.tensor([1.0 if p == "up" else -1.0
                                                                            for p in prompts])
    se = up_minus_down.std() / math.sqrt(n)
    assert up_minus_down.mean() > 4 * se, (float(up_minus_down.mean()), float(se))
    k = spec.rows_per_sample() if not isinstance(spec, SVDD) else 1
    for c in calls:
        if len(c) == n * k:
            assert c in ([p for p in prompts for _ in range(k)], [p for p in swapped for _ in range(k)])
        elif len(c) % n == 0:  # SVDD scores K candidates per sample
            kk = len(c) // n
            assert c in ([p for p in prompts for _ in range(kk)], [p for p in swapped for _ in range(kk)])
        else:  # RBF scores only the samples still searching: an ordered subsequence of the rows
            assert isinstance(spec, RBF)
            assert _subsequence(c, prompts) or _subsequence(c, swapped), c


def _subsequence(short, long):
    it = iter(long)
    return all(q in it for q in short)


# ---- NFE / gradient accounting and the result record -------------------------------------------

@pytest.mark.parametrize("spec,nfe,grads", [
    (Plain(), 10, 0),
    (NTRK(gamma=0.3), 10, 9),
    (NTRK(gamma=0.3, window=(0.0, 0.5)), 10, 5),
    (DPS(scale=0.1), 10, 9),
    (DPS(scale=0.01, form="unnormalized"), 10, 10),
    (BestOfN(n=3), 30, 0),
    (SVDD(candidates=3), 1 + 3 * 9, 0),
    (SMC(particles=3), 30, 0),
    (SMC(particles=3, proposal="guided"), 30, 27),
    # FreeDoM: S + r * (steps in the travel window), each redo of a guided step one more gradient
    (FreeDoM(scale=0.1, repeats=2, travel_window=(0.0, 0.5)), 10 + 2 * 5, 9 + 2 * 5),
    (RBF(budget=25), 25, 0),
    (DAS(particles=3, lam=1.0), 30, 27),
    # Psi: C chains of (1 + burn_in + mcmc_steps) evaluations with a gradient each, then guided SMC
    (PsiSampler(particles=4, chains=2, burn_in=1, mcmc_steps=2, lam=1.0), 2 * 4 + 40, 2 * 4 + 4 * 9),
], ids=lambda v: getattr(v, "name", str(v)))
def test_nfe_and_gradient_accounting(spec, nfe, grads):
    """Counts per returned sample, S = 10 steps, DDIM's last step deterministic: NTRK/DPS take one
    gradient per stochastic step (unnormalised DPS also at the last), best-of-N n*S, SVDD
    1 + K (S - 1) (one eps at x_T, K candidate eps per stochastic step), SMC K*S plus K gradients per
    stochastic step with the guided proposal."""
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return den(x, t)

    res = sample(counted, sch, Linear(_direction()), spec, 10, (4, D), seed=0, decode=identity)
    assert res.nfe == nfe and res.grad_evals == grads
    assert sum(calls) == nfe * 4  # the counter counts what the denoiser really evaluated
    assert res.samples.shape == (4, D) and res.sampler == spec.name
    assert torch.equal(res.images, res.samples)
    assert torch.allclose(res.rewards, Linear(_direction())(res.samples).float())
    assert res.seconds > 0 and res.nan_fallbacks == 0


@pytest.mark.parametrize("spec", [Plain(), NTRK(gamma=0.3), DPS(scale=0.1), BestOfN(n=3),
                                  SVDD(candidates=3, alpha=0.3), SMC(particles=3, lam=2.0, select="sample",
                                                                     resampling="multinomial"),
                                  FreeDoM(scale=0.1, repeats=1), RBF(budget=20), DAS(particles=3, lam=2.0),
                                  PsiSampler(particles=2, chains=1, burn_in=1, mcmc_steps=2, lam=1.0)],
                         ids=lambda s: s.name)
def test_samples_do_not_depend_on_batch_composition(spec):
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    seeds = sample_seeds(4, 5)
    whole = sample(den, sch, Linear(_direction()), spec, 6, seed=seeds, shape=(5, D), decode=identity)
    parts = [sample(den, sch, Linear(_direction()), spec, 6, seed=s, shape=(len(s), D), decode=identity)
             for s in (seeds[:2], seeds[2:])]
    assert torch.allclose(whole.samples, torch.cat([p.samples for p in parts]), atol=1e-6)
    # an int seed is the same as its derived per-sample seeds
    again = sample(den, sch, Linear(_direction()), spec, 6, (5, D), seed=4, decode=identity)
    assert torch.equal(again.samples, whole.samples)


def test_default_decode_maps_minus_one_one_to_unit_interval_and_sampler_defaults_to_ntrk():
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    res = sample(den, sch, Linear(_direction()), None, 4, (2, D), seed=0)
    assert res.sampler == "ntrk" and res.grad_evals == 3
    assert torch.allclose(res.images, (res.samples + 1) / 2)
    plain = sample(den, sch, None, Plain(), 4, (2, D), seed=0)
    assert torch.isnan(plain.rewards).all()  # no reward: NaN rewards, not zeros


# ---- per-step callback, SVDD edge cases ---------------------------------------------------------

@pytest.mark.parametrize("spec", [Plain(), NTRK(rho=0.2), DPS(scale=0.1), BestOfN(n=2), SVDD(candidates=2),
                                  SMC(particles=2)], ids=lambda s: s.name)
def test_callback_reports_every_step_in_order(spec):
    """Every sampler hands the callback steps 0..S-1 in order, each with the new state (working
    rows: trajectories, candidates or particles) and its x0 estimate of the same shape."""
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    got = []
    sample(den, sch, Linear(_direction()), spec, 5, (3, D), seed=0, decode=identity, callback=got.append)
    assert [c["step"] for c in got] == list(range(5))
    name = spec.trajectory_sampler().name if isinstance(spec, BestOfN) else spec.name  # the rule that steps
    assert all(c["num_steps"] == 5 and c["sampler"] == name for c in got)
    assert all(c["x"].shape == c["denoised"].shape and c["x"].shape[1:] == (D,) for c in got)


def test_svdd_scores_a_stochastic_last_step_with_the_final_reward():
    """With set_alpha_to_one=False the last DDIM step has noise, so SVDD chooses there too, scoring
    candidates by the reward of x_0 itself (no extra NFE): 1 + K (S - 1) NFEs, S scored steps, and
    the chosen candidates gain over the candidates' mean."""
    sch = scheduler(set_alpha_to_one=False, timestep_spacing="trailing")
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    res = sample(den, sch, Linear(_direction()), SVDD(candidates=3), 6, (8, D), seed=1, decode=identity, dtype=F64)
    assert res.nfe == 1 + 3 * 5
    assert res.extras["scored_steps"] == 6 and res.extras["candidates"] == 3
    assert res.extras["mean_selected_gain"] > 0


def test_svdd_sampling_survives_a_sample_whose_candidates_all_have_nan_rewards():
    """alpha > 0: a sample whose every candidate reward is NaN falls back to uniform selection,
    without disturbing the other samples (which still follow their own softmax)."""
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    lin = Linear(_direction())

    def reward(images, prompts):
        bad = torch.tensor([p == "nan" for p in prompts])
        return torch.where(bad, torch.full_like(lin(images), float("nan")), lin(images))

    prompts = ["nan", "ok", "ok"]
    res = sample(den, sch, reward, SVDD(candidates=3, alpha=0.5), 6, (3, D), seed=2, prompts=prompts,
                 decode=identity)
    assert torch.isfinite(res.samples).all()
    again = sample(den, sch, reward, SVDD(candidates=3, alpha=0.5), 6, (2, D), seed=sample_seeds(2, 3)[1:],
                   prompts=prompts[1:], decode=identity)
    assert torch.equal(res.samples[1:], again.samples)


@pytest.mark.parametrize("spec", [NTRK(rho=0.0), NTRK(search_k=1), NTRK(mode="tilt", gamma=0.0, whitening="identity"),
                                  DPS(scale=0.0), DPS(scale=0.0, form="unnormalized")],
                         ids=["rho0", "search1", "tilt0", "dps0", "dps0-unnorm"])
def test_zero_strength_takes_no_gradient_and_is_plain(spec):
    """At zero strength (rho = 0, best-of-1 matched, gamma = 0 unwhitened, scale = 0) no reward
    gradient is taken and the samples are exactly the plain sampler's."""
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    res = sample(den, sch, Linear(_direction()), spec, 5, (3, D), seed=2, decode=identity, dtype=F64)
    plain = sample(den, sch, None, Plain(), 5, (3, D), seed=2, decode=identity, dtype=F64)
    assert res.grad_evals == 0 and torch.equal(res.samples, plain.samples)


def test_guidance_refuses_inference_mode_with_a_clear_message():
    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    with torch.inference_mode(), pytest.raises(
            RuntimeError, match=r"^reward-gradient guidance cannot run under torch\.inference_mode\(\); "
                                r"with Lightning use Trainer\(inference_mode=False\)$"):
        sample(den, sch, Linear(_direction()), DPS(scale=0.1), 3, (2, D), seed=0, decode=identity)


@pytest.mark.parametrize("spec", [Plain(), NTRK(rho=0.3, grad="tweedie"), NTRK(rho=0.3, grad="denoiser"),
                                  DPS(scale=0.2, grad="tweedie"), BestOfN(n=2), SVDD(candidates=2),
                                  SMC(particles=2, proposal="guided", grad="tweedie"),
                                  SMC(particles=2, proposal="guided", grad="denoiser")],
                         ids=lambda s: f"{s.name}-{getattr(s, 'grad', '')}")
def test_conditioning_follows_every_row_in_every_gradient_mode(spec):
    """A conditional denoiser (Gaussian prior whose mean is the row's condition) gives exactly the
    samples of the same denoiser with the conditions baked in per sample: every network call,
    with or without gradient, for trajectories, candidates and particles, gets its rows' cond."""
    sch = scheduler()
    std = torch.full((D,), 0.7, dtype=F64)
    means = torch.stack([torch.full((D,), v, dtype=F64) for v in (-0.8, 0.1, 0.9)])
    dens = [GaussianDenoiser(sch, m, std) for m in means]

    def conditional(x, t, c):
        return torch.cat([dens[int(ci)](x[i:i + 1], t[i:i + 1]) for i, ci in enumerate(c.tolist())])

    def baked_for(i):
        return lambda x, t: dens[i](x, t)

    seeds = sample_seeds(6, 3)
    res = sample(conditional, sch, Linear(_direction()), spec, 4, (3, D), seed=seeds, cond=torch.arange(3),
                 decode=identity, dtype=F64)
    for i in range(3):
        alone = sample(baked_for(i), sch, Linear(_direction()), spec, 4, (1, D), seed=seeds[i:i + 1],
                       decode=identity, dtype=F64)
        assert torch.allclose(res.samples[i], alone.samples[0], atol=1e-12), i


def test_errors_name_what_is_wrong():
    from ntrk_lightning.samplers.resampling import normalize_log_weights, systematic_resample

    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    with pytest.raises(ValueError, match=r"^reward must return shape \(2,\), got \(\)$"):
        sample(den, sch, lambda im: im.sum(), DPS(scale=0.1), 3, (2, D), seed=0, decode=identity)
    with pytest.raises(ValueError, match=r"^log-weights must have shape \(B, K\), got \(3,\)$"):
        normalize_log_weights(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^every group needs a positive total weight$"):
        systematic_resample(torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64))


def test_bad_api_input_is_refused_with_one_clear_line():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from ntrk_lightning.denoiser import DiffusionModel
    from ntrk_lightning.kernels import check_scheduler

    sch = scheduler()
    den = GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    cases = [
        (dict(shape=None, seed=[1, 2]), ValueError, r"^shape is required for a plain denoiser callable$"),
        (dict(shape=(3, D), seed=[1, 2]), ValueError, r"^shape has batch 3 but 2 seeds were given$"),
        (dict(shape=(0, D), seed=[]), ValueError, r"^batch must hold at least one sample$"),
        (dict(scheduler=object()), TypeError, r"^object cannot take the caller's noise; use diffusers\.DDIMScheduler "
         r"\(its step\(\.\.\., eta, variance_noise=\.\.\.\) is the injection point NTRK needs\) or, for "
         r"flow-matching models, FlowMatchEulerDiscreteScheduler$"),
        (dict(scheduler=DDPMScheduler()), TypeError, r"^DDPMScheduler cannot take"),
        (dict(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True)), ValueError,
         r"^flow scheduler option invert_sigmas=True is not supported by the flow kernel$"),
        (dict(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)), ValueError,
         r"^flow scheduler has use_dynamic_shifting=True"),
    ]
    for over, exc, msg in cases:
        kw = dict(denoiser=den, scheduler=sch, reward=None, sampler=Plain(), num_steps=3, shape=(2, D), seed=0)
        kw.update(over)
        with pytest.raises(exc, match=msg):
            sample(**kw)
    # a DiffusionModel brings its sample shape: seeds alone give the batch
    model = DiffusionModel(den, decode=identity, sample_shape=(D,))
    assert sample(model, sch, None, Plain(), 3, seed=[4, 5, 6]).samples.shape == (3, D)

    # a duck-typed scheduler: a step taking variance_noise and no prediction_type means epsilon
    class Duck:
        def step(self, model_output, timestep, sample, eta=0.0, variance_noise=None):
            raise NotImplementedError

    check_scheduler(Duck())
    duck = Duck()
    duck.config = SimpleNamespace()
    check_scheduler(duck)


def test_validation_messages_and_describe():
    cases = [(NTRK(window=(0.0, float("nan"))), r"^ntrk: window must be finite"),
             (NTRK(window=(0.5, 0.2)), r"^ntrk: window must satisfy 0 <= start < end <= 1"),
             (DPS(window=(0.2, 1.5)), r"^dps: window must satisfy"),
             (NTRK(eta=0.0), r"^ntrk: eta must be in \(0, 1\] \(the step's noise carries the guidance or the "
                             r"search\), got 0\.0$"),
             (Plain(eta=1.5), r"^plain: eta must be in \[0, 1\], got 1\.5$")]
    for spec, msg in cases:
        with pytest.raises(ValueError, match=msg):
            spec.validate()
    d = BestOfN(n=3, inner=NTRK(rho=0.2)).describe()
    assert d["name"] == "best_of_n" and d["n"] == 3 and d["inner"]["name"] == "ntrk" and d["inner"]["rho"] == 0.2
    assert NTRK(window=(0.1, 0.9)).describe()["window"] == [0.1, 0.9]


# ---- the paper's baselines at their trivial settings -------------------------------------------

def test_freedom_without_time_travel_is_dps_and_time_travel_renoises():
    """repeats = 0: FreeDoM is DPS sample for sample (same gradients); on the deterministic kernel
    (eta = 0) a redo from the step's own x_t would land on the same point, so only the forward
    re-noising can move an unguided time-travelling path off the plain one."""
    sch = scheduler()
    mean, std = _prior()
    den = GaussianDenoiser(sch, mean, std)
    reward = Linear(_direction())
    kw = dict(shape=(4, D), seed=2, decode=identity, dtype=F64)
    dps = sample(den, sch, reward, DPS(scale=0.2), 8, **kw)
    fd = sample(den, sch, reward, FreeDoM(scale=0.2, repeats=0), 8, **kw)
    assert torch.equal(fd.samples, dps.samples) and fd.grad_evals == dps.grad_evals and fd.nfe == dps.nfe
    det = sample(den, sch, reward, Plain(eta=0.0), 8, **kw)
    tt = sample(den, sch, reward, FreeDoM(scale=0.0, form="unnormalized", eta=0.0, repeats=1), 8, **kw)
    assert ((tt.samples - det.samples).norm(dim=1) > 1e-3).all()


def test_das_at_lam_zero_is_plain_sampling_on_the_first_child_stream():
    """lam = 0: no potential and no proposal shift, so the weights stay uniform and DAS returns
    particle 0 (largest weight, first index): a plain trajectory on child stream (sample, 0)."""
    from ntrk_lightning.noise import derive_seed

    sch = scheduler()
    mean, std = _prior()
    den = GaussianDenoiser(sch, mean, std)
    seeds = sample_seeds(7, 5)
    das = sample(den, sch, Linear(_direction()), DAS(particles=4, lam=0.0), 6, (5, D), seed=seeds,
                 decode=identity, dtype=F64)
    plain = sample(den, sch, None, Plain(), 6, (5, D), seed=[derive_seed(s, 0, 0) for s in seeds],
                   decode=identity, dtype=F64)
    assert torch.allclose(das.samples, plain.samples, rtol=1e-10, atol=1e-10) and das.grad_evals == 0
