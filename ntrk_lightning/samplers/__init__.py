"""Sampler specs: NTRK and the baselines, all on the same loop and the same NFE accounting."""

from __future__ import annotations

from typing import Any

from ntrk_lightning.samplers.base import Sampler, SampleResult, SamplingContext
from ntrk_lightning.samplers.best_of_n import BestOfN
from ntrk_lightning.samplers.das import DAS
from ntrk_lightning.samplers.dps import DPS
from ntrk_lightning.samplers.freedom import FreeDoM
from ntrk_lightning.samplers.loop import TrajectorySampler, run_trajectory
from ntrk_lightning.samplers.ntrk import NTRK
from ntrk_lightning.samplers.plain import Plain
from ntrk_lightning.samplers.psi import PsiSampler
from ntrk_lightning.samplers.rbf import RBF
from ntrk_lightning.samplers.smc import SMC
from ntrk_lightning.samplers.svdd import SVDD

REGISTRY: dict[str, type[Sampler]] = {cls.name: cls for cls in (Plain, NTRK, DPS, BestOfN, SVDD, SMC,
                                                                   FreeDoM, RBF, DAS, PsiSampler)}


def register(cls: type[Sampler]) -> type[Sampler]:
    """Add a sampler class to the registry under ``cls.name`` (usable as a decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def make_sampler(name: str, **kwargs: Any) -> Sampler:
    """Build a sampler by registry name, e.g. ``make_sampler("ntrk", gamma=2.0)``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(REGISTRY)}")
    try:
        sampler = REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for sampler {name!r}: {e}") from None
    sampler.validate()
    return sampler


__all__ = ["Sampler", "SampleResult", "SamplingContext", "TrajectorySampler", "run_trajectory", "NTRK", "Plain", "DPS", "BestOfN", "SVDD", "SMC",
           "FreeDoM", "RBF", "DAS", "PsiSampler", "REGISTRY", "register", "make_sampler"]
