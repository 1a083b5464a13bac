"""Contracts of the sampling core's public surface that the exact-identity tests do not reach:
error messages that name the problem, refused scheduler options, callbacks and extras of the
paper's baselines, and NTRK's whitening options reaching the operator. Tiny analytic models only."""

import pytest
import torch

from core_models import GaussianDenoiser, Linear, identity, scheduler
from ntrk_lightning import DAS, NTRK, RBF, FreeDoM, Plain, PsiSampler, make_sampler, sample
from ntrk_lightning.kernels import check_scheduler
from ntrk_lightning.whitening import whiten

pytestmark = pytest.mark.core

D = 8
F64 = torch.float64


def _den():
    sch = scheduler()
    return GaussianDenoiser(sch, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64)), sch


def test_errors_name_what_is_wrong():
    den, sch = _den()
    with pytest.raises(ValueError, match="needs a reward function"):
        sample(den, sch, None, NTRK(), 4, (2, D), decode=identity)
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; known: \[.*'ntrk'.*\]"):
        make_sampler("nope")


@pytest.mark.parametrize("flag", ["invert_sigmas", "stochastic_sampling", "use_dynamic_shifting"])
def test_flow_scheduler_options_the_kernel_cannot_follow_are_refused(flag):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    check_scheduler(sch)  # the plain configuration is accepted
    sch.register_to_config(**{flag: True})
    with pytest.raises(ValueError, match=flag):
        check_scheduler(sch)


@pytest.mark.parametrize("spec", [FreeDoM(scale=0.1, repeats=1, travel_window=(0.0, 1.0)), RBF(budget=18),
                                  DAS(particles=2, lam=1.0),
                                  PsiSampler(particles=2, chains=1, burn_in=1, mcmc_steps=2, lam=1.0)],
                         ids=lambda s: s.name)
def test_paper_baselines_report_every_step_to_the_callback(spec):
    """Steps 0..S-1 in order, each with the new state and its x0 estimate of the same shape, and the
    sampler's own name."""
    den, sch = _den()
    seen = []
    sample(den, sch, Linear(torch.ones(D, dtype=F64)), spec, 6, (3, D), seed=1, decode=identity,
           callback=lambda info: seen.append(info))
    assert [s["step"] for s in seen] == list(range(6))
    for s in seen:
        assert s["num_steps"] == 6 and s["sampler"] == spec.name
        assert torch.is_tensor(s["x"]) and torch.is_tensor(s["denoised"]) and s["x"].shape == s["denoised"].shape
        assert s["x"].shape[-1] == D and torch.isfinite(s["x"]).all()


def test_freedom_reports_its_time_travel():
    den, sch = _den()
    res = sample(den, sch, Linear(torch.ones(D, dtype=F64)), FreeDoM(scale=0.1, repeats=3, travel_window=(0.0, 0.5)),
                 10, (2, D), seed=1, decode=identity)
    assert res.extras["repeats"] == 3 and res.extras["travel_steps"] == 5


def test_ntrk_whitening_options_reach_the_operator():
    """NTRK(tile=2) whitens with tiles of 2: its guided noise is what whiten(..., tile=2) gives, not
    the default tile's (so a spec that drops its options is caught); tile 2 is a valid size."""
    # structured input (a ramp plus noise), far outside the Gaussian's typical set, so it is projected
    ramp = torch.linspace(-3, 3, 64).view(1, 1, 8, 8)
    g = ramp + 0.3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec2, spec4 = NTRK(tile=2), NTRK(tile=4)
    w2, w4 = spec2._whiten(g), spec4._whiten(g)
    assert torch.allclose(w2, whiten(g, "typical", 1, tile=2)) and torch.allclose(w4, whiten(g, "typical", 1, tile=4))
    assert not torch.allclose(w2, w4)
