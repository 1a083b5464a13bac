"""DPS-style reward guidance: shift the reverse *mean* along the reward gradient.

This is the mean-shift family (DPS, Chung et al. 2023; universal guidance, Bansal et al. 2023,
without its recurrence/backward-universal extras), run on the shared loop, with the same reward
gradient and the same NFE accounting as NTRK:

    out, g  = ctx.eps_and_grad(x_t)                      (g = grad_{x_t} r(x0_hat(x_t)))
    x_{t-1} = step(out, x_t, z) + s_t * direction,      z ~ N(0, I)
    direction = sigma_t * sqrt(d) * g / ||g||           ("normalized": a shift of s_t noise norms)
              | g                                       ("unnormalized": raw gradient ascent)

With ``form="normalized"`` this equals NTRK's ``tilt`` kernel with the identity whitening
(``sigma_t * (z + s sqrt(d) g_hat)``), which makes it the natural ablation of the whitening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import SamplingContext, unit_direction
from ntrk_lightning.samplers.loop import TrajectorySampler, broadcast_rows
from ntrk_lightning.schedules import strength


@dataclass
class DPS(TrajectorySampler):
    """Mean-shift reward guidance.

    Args:
        scale: step size s. ``normalized``: in units of the step's noise norm sigma_t * sqrt(d);
            ``unnormalized``: multiplies the raw reward gradient.
        scale_end: if set, s goes linearly from ``scale`` (first step) to ``scale_end`` (last).
        form: ``"normalized"`` (default) or ``"unnormalized"``.
        grad: ``"denoiser"`` (backprop through the denoiser) or ``"tweedie"`` (no denoiser backward).
        window: fraction (start, end) of the trajectory where guidance is on.
        eta: eta of the underlying step (``normalized`` needs eta > 0: it scales with sigma_t).
    """

    scale: float = 0.1
    scale_end: Optional[float] = None
    form: Literal["normalized", "unnormalized"] = "normalized"
    grad: Literal["denoiser", "tweedie"] = "denoiser"
    window: tuple[float, float] = (0.0, 1.0)
    eta: float = 1.0

    name: ClassVar[str] = "dps"
    needs_gradient: ClassVar[bool] = True
    nfe_formula: ClassVar[str] = "S (+ S backward)"
    source: ClassVar[str] = "Chung et al. 2023, Diffusion Posterior Sampling (arXiv:2209.14687)"
    choices: ClassVar[dict] = {"form": ("normalized", "unnormalized"), "grad": ("denoiser", "tweedie")}
    nonnegative: ClassVar[tuple] = ("scale", "scale_end")

    def check(self) -> None:
        if self.form == "normalized" and self.eta == 0.0:
            raise ValueError("dps: form='normalized' scales the shift by sigma_t, which is 0 for eta=0; "
                             "use eta > 0 or form='unnormalized'")

    def strength(self, ctx: SamplingContext, step: int) -> Optional[float]:
        s = strength(step, ctx.num_steps, self.scale, self.scale_end, self.window)
        if s > 0 and (self.form == "unnormalized" or ctx.std(step) > 0):
            return s
        return None

    def shift(self, g: Tensor, s: float, sigma: float) -> tuple[Tensor, Tensor]:
        """The mean shift for gradient ``g`` at step size ``s``; rows with an unusable gradient
        (non-finite, or zero in the normalized form) get no shift. Returns (shift, bad-row mask)."""
        if self.form == "normalized":
            g_hat, bad = unit_direction(g)
            return s * sigma * math.sqrt(g[0].numel()) * g_hat, bad
        bad = ~torch.isfinite(g.flatten(1)).all(1)
        return torch.where(broadcast_rows(bad, g), torch.zeros_like(g), s * g), bad

    def shift_mean(self, ctx: SamplingContext, step: int, s: float,
                   g: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        assert g is not None  # strength() is only non-None when a gradient is taken
        return self.shift(g, s, ctx.std(step))
