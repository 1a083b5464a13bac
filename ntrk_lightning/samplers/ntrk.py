"""NTRK: the Noise-Tilted Reverse Kernel (Hwang, Min, Kim, Shen, Sung, arXiv:2606.18066).

Each stochastic reverse step keeps the pretrained mean and sigma_t and replaces only its Gaussian
noise by a whitened, reward-gradient-tilted noise (one sample per step, no candidate search):

    tilt:  z = W(eps + gamma * sqrt(d) * g_hat)
    mix:   z = sqrt(1 - rho^2) * eps + rho * W(sqrt(d) * g_hat)
    x_{t-1} = scheduler.step(eps_theta, t, x_t, eta, variance_noise=z)

``eps + gamma*sqrt(d)*g_hat`` is a draw from the exponentially tilted law N(0,I)*exp(<c g, z>);
the whitening W keeps the injected vector on the set of vectors that look like white noise, so the
perturbation never exceeds the size and spectrum of the noise the model was trained to remove.
See DESIGN.md §1; every choice the paper may have made differently is an option here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext, unit_direction
from ntrk_lightning.schedules import check_window, strength
from ntrk_lightning.whitening import canonical_kind, whiten


@dataclass
class NTRK(Sampler):
    """Noise-Tilted Reverse Kernel.

    Args:
        gamma: tilt strength (``mode="tilt"``), in units of the noise norm sqrt(d).
        gamma_end: if set, gamma goes linearly from ``gamma`` (first step) to ``gamma_end`` (last).
        rho: mixing weight of the whitened gradient (``mode="mix"``), in [0, 1].
        rho_end: linear schedule end for rho.
        mode: ``"tilt"`` (default) or ``"mix"``.
        grad: ``"denoiser"`` (backprop through the denoiser) or ``"tweedie"`` (no denoiser backward).
        whitening: whitening kind (``spectral``, ``radial``, ``sphere``, ``standardize``, ``identity``).
        block: tile size / ring width of the whitening partition.
        window: fraction (start, end) of the trajectory where guidance is on; outside it the step
            is the plain one and no gradient is computed.
        eta: DDIM eta of the underlying stochastic step (must be > 0: the noise is the channel).
    """

    gamma: float = 1.0
    gamma_end: Optional[float] = None
    rho: float = 0.5
    rho_end: Optional[float] = None
    mode: Literal["tilt", "mix"] = "tilt"
    grad: Literal["denoiser", "tweedie"] = "denoiser"
    whitening: str = "spectral"
    block: int = 1
    window: tuple[float, float] = (0.0, 1.0)
    eta: float = 1.0

    name: ClassVar[str] = "ntrk"
    needs_gradient: ClassVar[bool] = True

    def validate(self) -> None:
        if self.mode not in ("tilt", "mix"):
            raise ValueError(f"ntrk: mode must be 'tilt' or 'mix', got {self.mode!r}")
        if self.grad not in ("denoiser", "tweedie"):
            raise ValueError(f"ntrk: grad must be 'denoiser' or 'tweedie', got {self.grad!r}")
        canonical_kind(self.whitening)
        if int(self.block) < 1:
            raise ValueError(f"ntrk: block must be >= 1, got {self.block}")
        self.window = check_window(self.window)
        if not 0.0 < self.eta <= 1.0:
            raise ValueError(f"ntrk: eta must be in (0, 1] (the noise carries the guidance), got {self.eta}")
        if self.gamma < 0 or (self.gamma_end is not None and self.gamma_end < 0):
            raise ValueError("ntrk: gamma must be >= 0")
        for r in (self.rho, self.rho_end):
            if r is not None and not 0.0 <= r <= 1.0:
                raise ValueError(f"ntrk: rho must be in [0, 1], got {r}")

    def strength_at(self, step: int, num_steps: int) -> float:
        if self.mode == "tilt":
            return strength(step, num_steps, self.gamma, self.gamma_end, self.window)
        return strength(step, num_steps, self.rho, self.rho_end, self.window)

    def tilted_noise(self, eps_noise: Tensor, g: Optional[Tensor], s: float) -> tuple[Tensor, Tensor]:
        """The NTRK noise for gradient ``g`` at strength ``s`` (``g=None``: no tilt, the whitened
        noise alone). Rows with an unusable gradient get ``eps_noise`` unchanged, as in a plain
        step. Returns (noise, bad-row mask)."""
        if g is None:
            bad = torch.zeros(eps_noise.shape[0], dtype=torch.bool, device=eps_noise.device)
            z = whiten(eps_noise, self.whitening, self.block) if self.mode == "tilt" else eps_noise
            return z, bad
        g_hat, bad = unit_direction(g)
        d = g[0].numel()
        if self.mode == "tilt":
            z = whiten(eps_noise + s * math.sqrt(d) * g_hat, self.whitening, self.block)
        else:
            z = math.sqrt(1.0 - s * s) * eps_noise + s * whiten(math.sqrt(d) * g_hat, self.whitening, self.block)
        z = torch.where(bad.view(-1, *([1] * (z.dim() - 1))), eps_noise, z)
        return z, bad

    def run(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0])
        for i in range(ctx.num_steps):
            # The NTRK kernel acts inside the window on steps that have noise (the last DDIM step
            # has sigma = 0); the gradient is only needed when the strength is non-zero.
            active = ctx.std(i) > 0 and self.window[0] <= i / ctx.num_steps < self.window[1]
            s = self.strength_at(i, ctx.num_steps) if active else 0.0
            if s > 0:
                eps, g, _ = ctx.eps_and_grad(x, i, rows, self.grad)
            else:
                eps, g = ctx.eps(x, i, rows), None
            eps_noise = ctx.noise.randn()
            if active:
                z, bad = self.tilted_noise(eps_noise, g, s)
                ctx.count_fallbacks(bad)
            else:
                z = eps_noise
            x = ctx.step(eps, i, x, z)
        return x
