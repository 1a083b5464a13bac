"""FreeDoM: mean-shift energy guidance with time-travel (Yu et al. 2023, "FreeDoM: Training-Free
Energy-Guided Conditional Diffusion Model", arXiv:2303.09833), on the shared loop and accounting.

Every step is the DPS step (:mod:`ntrk_lightning.samplers.dps`): the pretrained stochastic step plus
a shift along g = grad_{x_t} r(x0_hat(x_t)). Inside ``travel_window`` the step is then repeated
``repeats`` times ("time-travel", FreeDoM's resampling strategy):

    x_{t-1} = step(x_t) + shift(g(x_t))                          (first pass, the sample's own noise)
    repeat r times:
        x_t     = (alpha_t / alpha_s) x_{t-1} + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z
                  (the forward transition q(x_t | x_{t-1}); sqrt(abar_t / abar_{t-1}) x_{t-1} +
                  sqrt(1 - abar_t / abar_{t-1}) z for DDPM, the (1 - t, t) analogue for rectified flow)
        x_{t-1} = step(x_t) + shift(g(x_t))                      (redone on the re-noised x_t)

so guidance acts several times at the steps where it matters while the sample is pulled back
towards the noised data manifold in between. Cost per sample: S + r * (steps in the travel window)
NFEs, and as many reward gradients at the steps where guidance is on.

FreeDoM scales its gradient step by a per-step norm ratio; here the step size follows DPS's
``form`` ("normalized": s noise norms along the unit gradient; "unnormalized": s times the raw
gradient), which keeps FreeDoM and DPS comparable option for option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import SamplingContext
from ntrk_lightning.samplers.dps import DPS
from ntrk_lightning.schedules import check_window, in_window

#: tag of the child streams that feed the re-noising and the redone steps (``NoiseSource.spawn``),
#: so the first pass of every step draws from the sample's own stream exactly as plain sampling does
FREEDOM_TRAVEL_TAG = 105


@dataclass
class FreeDoM(DPS):
    """Mean-shift guidance with time-travel.

    Args:
        scale, scale_end, form, grad, window, eta: the guided step, as in :class:`DPS`.
        repeats: r, how many times a step inside ``travel_window`` is re-noised and redone
            (0 = no time-travel: exactly DPS).
        travel_window: fraction (start, end) of the trajectory whose steps time-travel.

    The re-noising noise and the noise of the redone steps come from the sample's child stream
    (``NoiseSource.spawn(1, tag=FREEDOM_TRAVEL_TAG)``), so a sample's result does not depend on its
    batch. ``ctx.extras`` gets ``travel_steps`` (steps that time-travelled) and ``repeats``.
    """

    repeats: int = 1
    travel_window: tuple[float, float] = (0.2, 0.6)

    name: ClassVar[str] = "freedom"
    nfe_formula: ClassVar[str] = "S + r * (steps in travel_window) (+ as many backward where guidance is on)"
    source: ClassVar[str] = ("Yu et al. 2023, FreeDoM: Training-Free Energy-Guided Conditional Diffusion Model "
                             "(arXiv:2303.09833)")
    nonnegative: ClassVar[tuple] = ("scale", "scale_end", "repeats")

    def check(self) -> None:
        super().check()
        if isinstance(self.repeats, bool) or int(self.repeats) != self.repeats:
            raise ValueError(f"freedom: repeats must be an integer >= 0, got {self.repeats!r}")
        try:
            self.travel_window = check_window(self.travel_window)
        except ValueError as e:
            raise ValueError(f"freedom: travel_{e}") from None

    def travels(self, step: int, num_steps: int) -> bool:
        """Does reverse step ``step`` time-travel?"""
        return self.repeats > 0 and in_window(step, num_steps, self.travel_window)

    def guided_step(self, ctx: SamplingContext, step: int, x: Tensor, rows: Tensor,
                    z: Tensor) -> tuple[Tensor, Tensor]:
        """One DPS step from ``x`` with noise ``z``: (x_next, network output). The same work, in the
        same order, as the shared loop's step (so zero guidance is bit-for-bit plain sampling)."""
        s = self.strength(ctx, step)
        g: Optional[Tensor] = None
        if self.wants_gradient(s):
            out, g, _ = ctx.eps_and_grad(x, step, rows, self.grad)
        else:
            out = ctx.eps(x, step, rows)
        x_next = ctx.step(out, step, x, z)
        if s is not None:
            d, bad = self.shift_mean(ctx, step, s, g)
            if d is not None:
                x_next = x_next + d.to(x_next.dtype)
            if bad is not None:
                ctx.count_fallbacks(bad)
        return x_next, out

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        rows = torch.arange(x.shape[0]) if rows is None else rows
        n_steps = ctx.num_steps
        travel_steps = [i for i in range(n_steps) if self.travels(i, n_steps)]
        travel = ctx.noise.spawn(1, tag=FREEDOM_TRAVEL_TAG) if travel_steps else None
        for i in range(n_steps):
            x_next, out = self.guided_step(ctx, i, x, rows, ctx.noise.randn())
            if travel is not None and i in travel_steps:
                for _ in range(int(self.repeats)):
                    x = ctx.kernel.renoise(x_next, i, travel.randn()).to(x_next.dtype)
                    x_next, out = self.guided_step(ctx, i, x, rows, travel.randn())
            ctx.step_done(i, x_next, out, x, self.name)
            x = x_next
        ctx.extras.update(travel_steps=len(travel_steps), repeats=int(self.repeats))
        return x
