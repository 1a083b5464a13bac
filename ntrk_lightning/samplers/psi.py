"""Psi-Sampler (Yoon et al. 2025, "Psi-Sampler: Initial Particle Sampling for SMC-Based
Inference-Time Reward Alignment in Score Models", arXiv:2506.01320): SMC whose initial particles
are drawn from the reward-tilted prior instead of the prior.

The initial target is pi(x_T) ∝ N(x_T; 0, I) exp(Phi(x_T)), Phi = lam_mcmc * r(x0_hat(x_T)), with
x0_hat(x_T) the Tweedie estimate from one denoiser call at the first reverse step (as in the
reference implementation; a few-step estimate would cost more NFEs per chain step). It is sampled
by preconditioned Crank–Nicolson Langevin (pCNL) chains, which suit a Gaussian prior in high
dimension because their proposal leaves the prior itself invariant:

    x' = rho x + sqrt(1 - rho^2) (z + (sqrt(h) / 2) grad Phi(x)),   rho = (1 - h/4) / (1 + h/4)

(the Crank–Nicolson discretisation, step h, of dx = -(x - grad Phi) dt / 2 + dW), accepted with
the Metropolis–Hastings probability min(1, exp(J(x', x) - J(x, x'))),

    J(a, b) = Phi(a) + (sqrt(h) / 2) <(b - rho a) / sqrt(1 - rho^2), grad Phi(a)> - (h / 8) |grad Phi(a)|^2,

which is log pi(a) q(b | a) up to a term symmetric in (a, b). For linear Phi the proposal is exact
(acceptance 1). Each chain step costs one NFE and one reward gradient; a chain also evaluates its
start. K particles per sample are thinned evenly from C chains' last ``mcmc_steps`` states (after
``burn_in``), then the SMC of :class:`SMC` runs from them.

Initial weights: the particles already follow p(x_T) exp(lam_mcmc r_T), so their importance weight
against prior draws is exp(-lam_mcmc r_T); with the difference potential and no tempering the first
SMC weight is then exp((lam - lam_mcmc) r_T), uniform when lam_mcmc = lam. (The reference code's
default instead weights the initial particles by exp(r_T / alpha) once more.)

Cost per sample: C (1 + burn_in + mcmc_steps) NFEs (and gradients) for the chains + K S for the SMC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Optional

import torch
from torch import Tensor

from ntrk_lightning.noise import NoiseSource, derive_seed
from ntrk_lightning.samplers.base import SamplingContext
from ntrk_lightning.samplers.smc import SMC

#: tag of the per-sample chain streams (initial states, proposals, acceptance uniforms)
PSI_CHAIN_TAG = 107

#: Phi and grad Phi of a batch of states: (B,) and the shape of x
Potential = Callable[[Tensor], tuple[Tensor, Tensor]]


def pcnl_rho(step_size: float) -> float:
    """The autoregression coefficient rho = (1 - h/4) / (1 + h/4) of pCNL with step ``h``."""
    h = float(step_size)
    return (1.0 - h / 4.0) / (1.0 + h / 4.0)


def pcnl_propose(x: Tensor, grad: Tensor, z: Tensor, step_size: float) -> Tensor:
    """The pCNL proposal x' = rho x + sqrt(1 - rho^2) (z + (sqrt(h)/2) grad Phi(x))."""
    rho = pcnl_rho(step_size)
    return rho * x + math.sqrt(1.0 - rho * rho) * (z + 0.5 * math.sqrt(step_size) * grad)


def pcnl_log_joint(a: Tensor, b: Tensor, phi_a: Tensor, grad_a: Tensor, step_size: float) -> Tensor:
    """J(a, b) = log pi(a) + log q(b | a) up to a term symmetric in (a, b), per row (float64)."""
    rho = pcnl_rho(step_size)
    a, b, g = a.flatten(1).double(), b.flatten(1).double(), grad_a.flatten(1).double()
    drift = (b - rho * a) / math.sqrt(1.0 - rho * rho)
    return phi_a.double() + 0.5 * math.sqrt(step_size) * (drift * g).sum(1) - step_size / 8.0 * (g * g).sum(1)


def pcnl_chain(x: Tensor, potential: Potential, steps: int, step_size: float,
               randn: Callable[[], Tensor], rand: Callable[[], Tensor], keep: int = 0,
               start: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, list[Tensor], float]:
    """Run ``steps`` pCNL steps of independent chains (one per row of ``x``) targeting
    N(0, I) exp(Phi).

    ``potential(x)`` returns (Phi, grad Phi); a non-finite Phi or gradient at a proposal rejects it
    (at the start: Phi = -inf, gradient 0, so the first finite proposal is accepted). ``randn``
    gives standard normal noise shaped like ``x``, ``rand`` one uniform per row. ``start`` may hand
    in (Phi, grad) of ``x`` if already known. Returns the final states, the states after each of the
    last ``keep`` steps (oldest first) and the mean acceptance probability."""
    phi, grad = potential(x) if start is None else start
    phi, grad = _sanitize(phi, grad)
    kept: list[Tensor] = []
    acc_sum, acc_n = 0.0, 0
    for it in range(int(steps)):
        xp = pcnl_propose(x, grad, randn(), step_size).to(x.dtype)
        phi_p, grad_p = potential(xp)
        finite = torch.isfinite(phi_p.double()) & torch.isfinite(grad_p.flatten(1)).all(1)
        phi_p, grad_p = _sanitize(phi_p, grad_p)
        log_a = pcnl_log_joint(xp, x, phi_p, grad_p, step_size) - pcnl_log_joint(x, xp, phi, grad, step_size)
        log_a = torch.where(finite.to(log_a.device), log_a, torch.full_like(log_a, float("-inf")))
        u = rand().to(log_a.device)
        accept = torch.log(u) < log_a  # NaN (both ends unusable) rejects
        acc_sum += float(torch.exp(log_a.clamp(max=0.0)).nan_to_num(0.0).sum())
        acc_n += log_a.shape[0]
        m = accept.view(-1, *([1] * (x.dim() - 1))).to(x.device)
        x = torch.where(m, xp, x)
        grad = torch.where(m.to(grad.device), grad_p, grad)
        phi = torch.where(accept.to(phi.device), phi_p, phi)
        if it >= int(steps) - keep:
            kept.append(x)
    return x, kept, acc_sum / max(1, acc_n)


def _sanitize(phi: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Phi with NaN -> -inf (an unusable state is never preferred) and non-finite gradients -> 0."""
    phi = phi.double()
    phi = torch.where(torch.isnan(phi), torch.full_like(phi, float("-inf")), phi)
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    grad = torch.where(bad.view(-1, *([1] * (grad.dim() - 1))).to(grad.device), torch.zeros_like(grad), grad)
    return phi, grad


@dataclass
class PsiSampler(SMC):
    """SMC from pCNL draws of the reward-tilted prior (Psi-Sampler).

    Args:
        particles: K particles per sample.
        chains: C pCNL chains per sample (default K; must divide K).
        burn_in: chain steps discarded first.
        mcmc_steps: chain steps kept after the burn-in; K / C particles are thinned evenly from
            each chain's kept states, its last state included. ``burn_in = mcmc_steps = 0``: no
            chains, the particles are prior draws and this is exactly :class:`SMC`.
        step_size: pCNL step h (> 0); rho = (1 - h/4) / (1 + h/4).
        mcmc_lam: strength of the tilt the chains sample (default ``lam``).
        lam, potential, tempering, resampling, ess_threshold, proposal, guidance, grad, select,
            eta: the SMC, as :class:`SMC` (defaults: the reference's guided proposal, no tempering,
            best final reward).

    Chain c of sample i draws its start, proposals and acceptance uniforms from its own stream
    (seeded from the sample's seed, ``PSI_CHAIN_TAG`` and c), so results do not depend on the batch.
    ``ctx.extras`` adds ``mcmc_acceptance`` (mean acceptance probability), ``mcmc_nfe`` (chain
    NFEs per sample) and ``chains``.
    """

    particles: int = 4
    proposal: Literal["prior", "guided"] = "guided"
    chains: Optional[int] = None
    burn_in: int = 10
    mcmc_steps: int = 10
    step_size: float = 0.5
    mcmc_lam: Optional[float] = None

    name: ClassVar[str] = "psi"
    nfe_formula: ClassVar[str] = "C * (1 + burn_in + mcmc_steps) + K * S (+ as many backward for the chains)"
    source: ClassVar[str] = ("Yoon et al. 2025, Psi-Sampler: Initial Particle Sampling for SMC-Based Inference-Time "
                             "Reward Alignment in Score Models (arXiv:2506.01320)")
    positive_ints: ClassVar[tuple] = ("particles", "chains")
    nonnegative: ClassVar[tuple] = ("lam", "guidance", "burn_in", "mcmc_steps", "mcmc_lam")

    @property
    def needs_gradient(self) -> bool:  # type: ignore[override]
        return self.runs_chains() or self.proposal == "guided"

    def n_chains(self) -> int:
        return int(self.particles) if self.chains is None else int(self.chains)

    def runs_chains(self) -> bool:
        return int(self.burn_in) + int(self.mcmc_steps) > 0

    def tilt(self) -> float:
        """lam_mcmc, the strength of the tilt the initial particles follow (0 without chains)."""
        if not self.runs_chains():
            return 0.0
        return float(self.lam if self.mcmc_lam is None else self.mcmc_lam)

    def check(self) -> None:
        for opt in ("burn_in", "mcmc_steps"):
            v = getattr(self, opt)
            if isinstance(v, bool) or int(v) != v:
                raise ValueError(f"psi: {opt} must be an integer >= 0, got {v!r}")
        if not self.step_size > 0:
            raise ValueError(f"psi: step_size must be > 0, got {self.step_size!r}")
        k, c = int(self.particles), self.n_chains()
        if k % c:
            raise ValueError(f"psi: chains ({c}) must divide particles ({k})")
        if self.runs_chains() and int(self.mcmc_steps) < k // c:
            raise ValueError(f"psi: mcmc_steps must be >= particles / chains = {k // c} (the kept states the "
                             f"particles are thinned from), got {self.mcmc_steps}")

    def initial_log_weights(self, r: Tensor) -> Tensor:
        return -self.tilt() * r

    def thinned(self, kept: int, per_chain: int) -> list[int]:
        """Indices into a chain's ``kept`` last states of the ``per_chain`` particles it gives:
        evenly spaced, the last state included (oldest first)."""
        stride = kept // per_chain
        return sorted(kept - 1 - j * stride for j in range(per_chain))

    def initial_particles(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        """Replace the prior draws ``x`` (B*K rows) by thinned pCNL draws of the tilted prior."""
        k, c, b = int(self.particles), self.n_chains(), ctx.batch_size
        group_seeds = ctx.noise.seeds[::k]
        streams = NoiseSource([derive_seed(s, PSI_CHAIN_TAG, j) for s in group_seeds for j in range(c)],
                              ctx.noise.shape, ctx.noise.device, ctx.noise.dtype)
        rows_c = torch.arange(b).repeat_interleave(c)
        lam_m = self.tilt()

        def potential(xc: Tensor) -> tuple[Tensor, Tensor]:
            _, g, r = ctx.eps_and_grad(xc, 0, rows_c, self.grad)
            bad = ~(torch.isfinite(r.to(g.device)) & torch.isfinite(g.flatten(1)).all(1))
            ctx.count_fallbacks(bad)
            return lam_m * r.double(), lam_m * g

        x0 = ctx.initial_noise(streams)
        before = ctx.model.forward_rows
        _, kept, acc = pcnl_chain(x0, potential, int(self.burn_in) + int(self.mcmc_steps), float(self.step_size),
                                  streams.randn, streams.rand, keep=int(self.mcmc_steps))
        states = torch.stack(kept, dim=1)  # (B*C, M, ...)
        picks = self.thinned(len(kept), k // c)
        parts = states[:, picks].reshape(b, c * len(picks), *x.shape[1:])  # chain-major per sample
        ctx.extras.update(mcmc_acceptance=acc, mcmc_nfe=(ctx.model.forward_rows - before) / b, chains=c)
        return parts.reshape(b * k, *x.shape[1:]).to(x.dtype)

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        if self.runs_chains():
            x = self.initial_particles(ctx, x)
        else:
            ctx.extras.update(mcmc_acceptance=float("nan"), mcmc_nfe=0.0, chains=0)
        return super().run(ctx, x, rows)
