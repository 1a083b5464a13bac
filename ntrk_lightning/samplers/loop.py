"""The one sampling loop every single-trajectory sampler runs on.

A reverse step is ``x_{i+1} = step(out, x_i, z) + d``: the pretrained kernel (:mod:`ntrk_lightning.
kernels`) fed the network output ``out`` and a standard Gaussian ``z``, plus an optional mean shift
``d``. Plain sampling, DPS and NTRK differ only in what they change in that step, so each is a
:class:`TrajectorySampler` that answers three questions per step:

* :meth:`TrajectorySampler.strength` — is guidance on at this step, and how strong (``None``: off,
  the step is the plain one and no gradient is taken)?
* :meth:`TrajectorySampler.perturb_noise` — the noise actually fed to the kernel (NTRK);
* :meth:`TrajectorySampler.shift_mean` — a shift added to the kernel's output (DPS).

The loop owns the order of work, the NFE accounting (through the counting denoiser), the NaN
fallbacks and the per-step ``callback``; search and particle samplers (SVDD, SMC) use the same
context methods (``ctx.eps``, ``ctx.eps_and_grad``, ``ctx.step``, ``ctx.step_done``).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext


class TrajectorySampler(Sampler):
    """A sampler that moves one trajectory per working row with the shared loop."""

    #: gradient mode handed to ``ctx.eps_and_grad`` (subclasses with a ``grad`` field override it)
    grad: str = "denoiser"
    single_trajectory: ClassVar[bool] = True

    def strength(self, ctx: SamplingContext, step: int) -> Optional[float]:
        """Guidance strength at ``step``; ``None`` = this step is the plain one."""
        return None

    def wants_gradient(self, s: Optional[float]) -> bool:
        return s is not None and s > 0

    def perturb_noise(self, ctx: SamplingContext, step: int, s: float, z: Tensor,
                      g: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The noise for the kernel and a mask of rows whose gradient was unusable (or None)."""
        return z, None

    def shift_mean(self, ctx: SamplingContext, step: int, s: float,
                   g: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """A shift added after the kernel step (or None) and a mask of unusable rows (or None)."""
        return None, None

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        return run_trajectory(ctx, x, self, rows)


def run_trajectory(ctx: SamplingContext, x: Tensor, rule: TrajectorySampler,
                   rows: Optional[Tensor] = None) -> Tensor:
    """Run all reverse steps of ``ctx`` from ``x`` (= x_T), changing each step as ``rule`` says.

    ``rows`` maps working rows to requested samples (default: one row per sample); noise comes
    from ``ctx.noise``, one draw per step for every row."""
    rows = torch.arange(x.shape[0]) if rows is None else rows
    for i in range(ctx.num_steps):
        s = rule.strength(ctx, i)
        g: Optional[Tensor] = None
        if rule.wants_gradient(s):
            out, g, _ = ctx.eps_and_grad(x, i, rows, rule.grad)
        else:
            out = ctx.eps(x, i, rows)
        z = ctx.noise.randn()
        bad = None
        if s is not None:
            z, bad = rule.perturb_noise(ctx, i, s, z, g)
        x_next = ctx.step(out, i, x, z)
        if s is not None:
            d, bad_shift = rule.shift_mean(ctx, i, s, g)
            if d is not None:
                x_next = x_next + d.to(x_next.dtype)
            bad = bad_shift if bad is None else (bad if bad_shift is None else bad | bad_shift)
            if bad is not None:
                ctx.count_fallbacks(bad)
        ctx.step_done(i, x_next, out, x, rule.name)
        x = x_next
    return x


def broadcast_rows(mask: Tensor, like: Tensor) -> Tensor:
    """A (rows,) mask shaped to broadcast over ``like`` (rows, ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))
