"""Tiny analytic models for the fast `core` tests: everything here is written from the formulas,
independently of the sampling core, so the core can be checked against it.

* ``GaussianDenoiser``: the exact eps prediction E[eps | x_t] of a diagonal Gaussian prior
  x_0 ~ N(m, diag(s^2)). With x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps the noised marginal is
  N(sqrt(abar) m, abar s^2 + 1 - abar), so eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar).
* ``OracleDenoiser``: knows the clean x_0 and returns the eps that maps it to x_t exactly, so the
  Tweedie estimate of any x_t must give x_0 back.
* ``ddim_reference``: a hand-written DDIM(eta) loop drawing its noise in the documented order
  (x_T first, then one draw per step, from each sample's own stream).
* ``tilted_gaussian``: mean and variance of p_0(x) exp(lam <a, x>) for the Gaussian prior.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from ntrk_lightning.noise import NoiseSource, sample_seeds


def scheduler(**kw) -> DDIMScheduler:
    """A DDIM scheduler with no clipping (the formulas below have none)."""
    kw.setdefault("clip_sample", False)
    return DDIMScheduler(**kw)


class GaussianDenoiser:
    """Exact eps of a diagonal Gaussian prior N(mean, std^2) over vectors (B, D) or any (B, ...)."""

    def __init__(self, sch: DDIMScheduler, mean: Tensor, std: Tensor) -> None:
        self.abar = sch.alphas_cumprod.double()
        self.mean = mean.double()
        self.std = std.double()

    def coef(self, t: int) -> tuple[float, Tensor]:
        """(sqrt(abar), c) with eps = c * (x - sqrt(abar) m): c = sqrt(1-abar) / (abar s^2 + 1 - abar)."""
        a = float(self.abar[int(t)])
        return math.sqrt(a), math.sqrt(1 - a) / (a * self.std ** 2 + 1 - a)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.abar[t.long()].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        m, s2 = self.mean.to(x.dtype), (self.std ** 2).to(x.dtype)
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * m) / (a * s2 + 1 - a)


class OracleDenoiser:
    """Returns the eps with x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for a fixed clean ``x0``."""

    def __init__(self, sch: DDIMScheduler, x0: Tensor) -> None:
        self.abar = sch.alphas_cumprod.double()
        self.x0 = x0.double()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.abar[t.long()].view(-1, *([1] * (x.dim() - 1)))
        x0 = self.x0.expand(x.shape[0], *self.x0.shape[1:])
        return ((x.double() - torch.sqrt(a) * x0) / torch.sqrt(1 - a)).to(x.dtype)


def ddim_schedule(sch: DDIMScheduler, num_steps: int) -> list[tuple[int, float, float]]:
    """(t, abar_t, abar_prev) per reverse step; the step after the last uses the final alpha
    (1 with set_alpha_to_one, else abar_0), as in Song et al.'s DDIM."""
    s = DDIMScheduler.from_config(sch.config)
    s.set_timesteps(num_steps)
    ts = [int(t) for t in s.timesteps]
    abar = sch.alphas_cumprod.double()
    final = 1.0 if sch.config.set_alpha_to_one else float(abar[0])
    out = []
    for i, t in enumerate(ts):
        prev = t - sch.config.num_train_timesteps // num_steps
        out.append((t, float(abar[t]), float(abar[prev]) if prev >= 0 else final))
    return out


def ddim_sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    """DDIM's sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)."""
    return eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)


def ddim_reference(eps_fn: Callable[[Tensor, Tensor], Tensor], sch: DDIMScheduler, num_steps: int,
                   shape: Sequence[int], seed: int, eta: float,
                   on_step: Optional[Callable[[int, Tensor], None]] = None) -> Tensor:
    """DDIM(eta) written out, in float64 (the noise: float32 draws of each sample's own stream)."""
    noise = NoiseSource(sample_seeds(seed, shape[0]), shape[1:])
    x = noise.randn().double()
    for i, (t, a, a_prev) in enumerate(ddim_schedule(sch, num_steps)):
        eps = eps_fn(x, torch.full((shape[0],), t)).double()
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = ddim_sigma(a, a_prev, eta)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * noise.randn().double()
        if on_step is not None:
            on_step(i, x)
    return x


def tilted_gaussian(mean: Tensor, std: Tensor, a: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """N(m, s^2) * exp(lam <a, x>) is N(m + lam s^2 a, s^2) (complete the square per coordinate)."""
    return mean + lam * std ** 2 * a, std ** 2


class Linear:
    """r(x) = <a, x> over the flattened sample (the decode is the identity in these tests)."""

    def __init__(self, a: Tensor) -> None:
        self.a = a

    def __call__(self, images: Tensor) -> Tensor:
        return (images.flatten(1) * self.a.to(images.dtype).flatten()).sum(1)


def identity(x: Tensor) -> Tensor:
    return x


def plain_ddim_law(den: GaussianDenoiser, sch: DDIMScheduler, num_steps: int, eta: float) -> tuple[Tensor, Tensor]:
    """Exact per-coordinate mean and variance of what DDIM(eta) with the exact Gaussian eps returns.

    Each step is affine in x plus independent Gaussian noise, x_prev = A x + B + sigma z, so the law
    stays Gaussian: mean' = A mean + B, var' = A^2 var + sigma^2, starting from N(0, 1). (Coarse
    DDIM does not return the prior exactly; samplers targeting "the model tilted by the reward" target
    this law, tilted.)"""
    mean = torch.zeros_like(den.mean)
    var = torch.ones_like(den.mean)
    for t, a, a_prev in ddim_schedule(sch, num_steps):
        _, c = den.coef(t)
        sigma = ddim_sigma(a, a_prev, eta)
        k = math.sqrt(1 - a_prev - sigma ** 2)

        def step(x: Tensor) -> Tensor:
            eps = c * (x - math.sqrt(a) * den.mean)
            return math.sqrt(a_prev) * (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + k * eps

        slope = step(torch.ones_like(mean)) - step(torch.zeros_like(mean))
        mean, var = step(mean), slope ** 2 * var + sigma ** 2
    return mean, var
