"""DPS-style reward guidance: shift the reverse *mean* along the reward gradient.

This is the mean-shift family (DPS, Chung et al. 2023; FreeDoM, Yu et al. 2023; universal
guidance, Bansal et al. 2023, without its recurrence/backward-universal extras), run on the same
loop, with the same reward gradient and the same NFE accounting as NTRK:

    eps, g  = ctx.eps_and_grad(x_t)                       (g = grad_{x_t} r(x0_hat(x_t)))
    x_{t-1} = step(eps, x_t, z) + s_t * direction,       z ~ N(0, I)
    direction = sigma_t * sqrt(d) * g / ||g||            ("normalized": a shift of s_t noise norms)
              | g                                        ("unnormalized": raw gradient ascent)

With ``form="normalized"`` this equals NTRK's tilt with the identity whitening, which makes it the
natural ablation: the two differ only by NTRK's whitening of the tilted noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext, unit_direction
from ntrk_lightning.schedules import check_window, strength


@dataclass
class DPS(Sampler):
    """Mean-shift reward guidance.

    Args:
        scale: step size s. ``normalized``: in units of the step's noise norm sigma_t * sqrt(d);
            ``unnormalized``: multiplies the raw reward gradient.
        scale_end: if set, s goes linearly from ``scale`` (first step) to ``scale_end`` (last).
        form: ``"normalized"`` (default) or ``"unnormalized"``.
        grad: ``"denoiser"`` (backprop through the denoiser) or ``"tweedie"`` (no denoiser backward).
        window: fraction (start, end) of the trajectory where guidance is on.
        eta: DDIM eta of the underlying step (``normalized`` needs eta > 0: it scales with sigma_t).
    """

    scale: float = 0.1
    scale_end: Optional[float] = None
    form: Literal["normalized", "unnormalized"] = "normalized"
    grad: Literal["denoiser", "tweedie"] = "denoiser"
    window: tuple[float, float] = (0.0, 1.0)
    eta: float = 1.0

    name: ClassVar[str] = "dps"
    needs_gradient: ClassVar[bool] = True

    def validate(self) -> None:
        if self.form not in ("normalized", "unnormalized"):
            raise ValueError(f"dps: form must be 'normalized' or 'unnormalized', got {self.form!r}")
        if self.grad not in ("denoiser", "tweedie"):
            raise ValueError(f"dps: grad must be 'denoiser' or 'tweedie', got {self.grad!r}")
        for s in (self.scale, self.scale_end):
            if s is not None and not (math.isfinite(s) and s >= 0):
                raise ValueError(f"dps: scale must be finite and >= 0, got {s}")
        self.window = check_window(self.window)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"dps: eta must be in [0, 1], got {self.eta}")
        if self.form == "normalized" and self.eta == 0.0:
            raise ValueError("dps: form='normalized' scales the shift by sigma_t, which is 0 for eta=0; "
                             "use eta > 0 or form='unnormalized'")

    def shift(self, g: Tensor, s: float, sigma: float) -> tuple[Tensor, Tensor]:
        """The mean shift for gradient ``g`` at step size ``s``; rows with an unusable gradient
        (non-finite, or zero in the normalized form) get no shift. Returns (shift, bad-row mask)."""
        if self.form == "normalized":
            g_hat, bad = unit_direction(g)
            return s * sigma * math.sqrt(g[0].numel()) * g_hat, bad
        bad = ~torch.isfinite(g.flatten(1)).all(1)
        return torch.where(bad.view(-1, *([1] * (g.dim() - 1))), torch.zeros_like(g), s * g), bad

    def run(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0])
        for i in range(ctx.num_steps):
            sigma = ctx.std(i)
            s = strength(i, ctx.num_steps, self.scale, self.scale_end, self.window)
            active = s > 0 and (self.form == "unnormalized" or sigma > 0)
            if active:
                eps, g, _ = ctx.eps_and_grad(x, i, rows, self.grad)
            else:
                eps = ctx.eps(x, i, rows)
            x_next = ctx.step(eps, i, x, ctx.noise.randn())
            if active:
                d, bad = self.shift(g, s, sigma)
                ctx.count_fallbacks(bad)
                x_next = x_next + d.to(x_next.dtype)
            x = x_next
        return x
