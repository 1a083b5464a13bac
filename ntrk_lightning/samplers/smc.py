"""SMC: particle filtering towards the reward-tilted law p_0(x) exp(lam * r(x)).

The Feynman-Kac steering / twisted diffusion sampler / DAS family (Singhal et al., 2025; Wu et al.,
2023; Kim et al., 2025), on the same loop and accounting. Each sample owns K particles; at every
step each particle's Tweedie estimate is scored by the reward (no extra NFE: the eps of the step is
reused), a potential G_i updates its log-weight, the group is resampled when its effective sample
size drops below ``ess_threshold * K``, and the particles move with the pretrained kernel
("prior") or a gradient-tilted one ("guided") whose bias is removed by an importance weight.

Potentials (r_i = reward of x0_hat(x_i), lam_i the possibly tempered strength):

    difference:  log G_i = lam_i r_i - lam_{i-1} r_{i-1}   (telescopes to lam * r(x_0): the
                 intermediate targets are p(x_i) exp(lam_i r_i); the only unbiased choice)
    max:         log G_i = lam_i * max_{s <= i} r_s          (heuristic, FK steering)
    sum:         log G_i = lam_i * sum_{s <= i} r_s          (heuristic, FK steering)

(i counts reverse steps, 0 = x_T; the final potential is taken on x_0 itself.)

Guided proposal (TDS-style): x_{i+1} = mu + sigma^2 * guidance * lam_i * grad_x r(x0_hat(x_i))
+ sigma z, with log-weight correction log N(x'; mu, sigma^2) - log N(x'; mu + shift, sigma^2).

Cost: K NFEs per sample and step (K * S in all), plus K backward passes per step with the guided
proposal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext
from ntrk_lightning.samplers.resampling import (SMC_RESAMPLE_TAG, SMC_SELECT_TAG, GroupStreams, categorical, ess,
                                                 flat_indices, multinomial_resample, normalize_log_weights,
                                                 systematic_resample)


@dataclass
class SMC(Sampler):
    """Sequential Monte Carlo over K particles per sample.

    Args:
        particles: K particles per sample (K=1 with the prior proposal is the plain sampler on a
            child stream).
        lam: inverse temperature lambda of the target p_0(x) exp(lam * r(x)).
        potential: ``"difference"`` (default), ``"max"`` or ``"sum"`` (see module docstring).
        tempering: ``"none"`` (lam at every step) or ``"linear"`` (lam_i = lam * (i+1)/(S+1) over the
            reverse steps, lam on x_0).
        resampling: ``"systematic"`` (default) or ``"multinomial"``.
        ess_threshold: resample a sample's particles when ESS < ess_threshold * K; 0 = never,
            1 = at every step.
        proposal: ``"prior"`` (pretrained kernel) or ``"guided"`` (gradient-tilted mean with an
            importance-weight correction).
        guidance: multiplier of the guided proposal's mean shift sigma_t^2 * lam_i * grad r.
        grad: gradient mode of the guided proposal, ``"denoiser"`` or ``"tweedie"``.
        select: which particle is returned: ``"best"`` (highest final reward) or ``"sample"``
            (drawn from the final importance weights: a draw from the SMC approximation of the target).
        eta: DDIM eta of the underlying step (> 0).

    ``ctx.extras`` gets ``particles``, ``resampling_events`` (mean per sample), ``mean_ess``
    (ESS / K before resampling, averaged over samples and steps) and ``final_ess`` (ESS / K of
    the final weights).
    """

    particles: int = 4
    lam: float = 1.0
    potential: Literal["difference", "max", "sum"] = "difference"
    tempering: Literal["none", "linear"] = "none"
    resampling: Literal["systematic", "multinomial"] = "systematic"
    ess_threshold: float = 0.5
    proposal: Literal["prior", "guided"] = "prior"
    guidance: float = 1.0
    grad: Literal["denoiser", "tweedie"] = "denoiser"
    select: Literal["best", "sample"] = "best"
    eta: float = 1.0

    name: ClassVar[str] = "smc"
    nfe_formula: ClassVar[str] = "K * S (+ K backward per guided step)"
    source: ClassVar[str] = ("Wu et al. 2023 (TDS); Singhal et al. 2025 (FK steering); Kim et al. 2025 (DAS, "
                             "arXiv:2501.05803)")
    choices: ClassVar[dict] = {"potential": ("difference", "max", "sum"), "tempering": ("none", "linear"),
                               "resampling": ("systematic", "multinomial"), "proposal": ("prior", "guided"),
                               "grad": ("denoiser", "tweedie"), "select": ("best", "sample")}
    positive_ints: ClassVar[tuple] = ("particles",)
    nonnegative: ClassVar[tuple] = ("lam", "guidance")
    unit_interval: ClassVar[tuple] = ("ess_threshold",)
    eta_min_open: ClassVar[bool] = True

    @property
    def needs_gradient(self) -> bool:  # type: ignore[override]
        return self.proposal == "guided"

    def rows_per_sample(self) -> int:
        return int(self.particles)

    def lam_at(self, step: int, num_steps: int) -> float:
        """lam_i for reverse step ``step`` (0 = x_T); ``step == num_steps`` is x_0."""
        if self.tempering == "none" or step >= num_steps:
            return float(self.lam)
        return float(self.lam) * (step + 1) / (num_steps + 1)

    def proposal_lam(self, step: int, num_steps: int) -> float:
        """Strength in the guided proposal's shift at reverse step ``step`` (here lam_i; a subclass
        may aim the proposal at the next step's target)."""
        return self.lam_at(step, num_steps)

    def initial_log_weights(self, r: Tensor) -> Tensor:
        """Log importance weights (B, K) of the initial particles relative to draws from the prior,
        given their rewards at x_T (B, K); zero here (x_T is drawn from the prior)."""
        return torch.zeros_like(r)

    def choose(self, ctx: SamplingContext, r0: Tensor, w: Tensor) -> Tensor:
        """Index (B,) of the returned particle, from the final rewards ``r0`` and weights ``w`` (B, K)."""
        k = r0.shape[1]
        if self.select == "best":
            return torch.where(torch.isnan(r0), torch.full_like(r0, float("-inf")), r0).argmax(dim=1)
        if k == 1:
            return torch.zeros(r0.shape[0], dtype=torch.long)
        return categorical(w, GroupStreams.for_groups(ctx.noise.seeds, k, SMC_SELECT_TAG).uniform(1)[:, 0])

    def _update(self, log_w: Tensor, state: Tensor, r: Tensor, lam: float, first: bool) -> tuple[Tensor, Tensor]:
        """Add this step's log-potential to ``log_w``; ``state`` carries lam_{i-1} r_{i-1}
        (difference) or the running max/sum of rewards. All (B, K) float64."""
        if self.potential == "difference":
            cur = lam * r
            return log_w + (cur - state), cur
        if self.potential == "max":
            state = r if first else torch.maximum(state, r)
        else:
            state = r if first else state + r
        return log_w + lam * state, state

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        k = int(self.particles)
        b = ctx.batch_size
        if x.shape[0] != b * k:
            raise ValueError(f"smc expected {b * k} rows, got {x.shape[0]}")
        s_steps = ctx.num_steps
        rows = torch.arange(b).repeat_interleave(k)
        streams = GroupStreams.for_groups(ctx.noise.seeds, k, SMC_RESAMPLE_TAG) if k > 1 else None
        log_w = torch.zeros(b, k, dtype=torch.float64)
        state = torch.zeros(b, k, dtype=torch.float64)
        events = torch.zeros(b, dtype=torch.float64)
        ess_fracs: list[float] = []
        keep = torch.arange(k)[None].expand(b, k)
        for i in range(s_steps):
            sigma = ctx.std(i)
            lam_i = self.lam_at(i, s_steps)
            lam_prop = self.proposal_lam(i, s_steps)
            guided = self.proposal == "guided" and sigma > 0 and self.guidance > 0 and lam_prop > 0
            g: Optional[Tensor] = None
            if guided:
                eps, g, r = ctx.eps_and_grad(x, i, rows, self.grad)
            else:
                eps = ctx.eps(x, i, rows)
                r = ctx.reward_nograd(ctx.x0_hat(x, eps, i), rows)
            r = r.double().cpu().view(b, k)
            if i == 0:
                log_w = log_w + self.initial_log_weights(r)
            log_w, state = self._update(log_w, state, r, lam_i, first=i == 0)
            if streams is not None:
                w = normalize_log_weights(log_w)
                e = ess(w)
                ess_fracs.append(float((e / k).mean()))
                need = (e < self.ess_threshold * k) if self.ess_threshold < 1.0 else torch.ones(b, dtype=torch.bool)
                anc = self._ancestors(w, streams, k)
                if need.any():
                    anc = torch.where(need[:, None], anc, keep)
                    idx = flat_indices(anc, k).to(x.device)
                    x, eps = x[idx], eps[idx]
                    if g is not None:
                        g = g[idx]
                    state = state.gather(1, anc)
                    log_w = torch.where(need[:, None], torch.zeros_like(log_w), log_w)
                    events += need.double()
            z = ctx.noise.randn()
            x_next = ctx.step(eps, i, x, z)
            if g is not None:
                x_next, corr = self._guided_move(ctx, x_next, g, z, sigma, lam_prop)
                log_w = log_w + corr.cpu().view(b, k)
            ctx.step_done(i, x_next, eps, x, self.name)
            x = x_next
        return self._finish(ctx, x, rows, log_w, state, events, ess_fracs)

    def _ancestors(self, w: Tensor, streams: GroupStreams, k: int) -> Tensor:
        """(B, K) ancestor indices drawn from the normalised weights ``w``. Uniforms are drawn every
        step for every sample (resampled or not), so each sample's stream (and so its result) is
        independent of the batch it is in."""
        if self.resampling == "systematic":
            return systematic_resample(w, streams.uniform(1)[:, 0])
        return multinomial_resample(w, streams.uniform(k))

    def _guided_move(self, ctx: SamplingContext, x_next: Tensor, g: Tensor, z: Tensor, sigma: float,
                     lam_prop: float) -> tuple[Tensor, Tensor]:
        """Shift the prior move by ``guidance * lam * sigma^2 * g`` (rows with a non-finite gradient
        keep the prior move) and return the moved rows with their log-weight correction
        log N(x'; mu, sigma^2) - log N(x'; mu + shift, sigma^2), where x' - mu - shift = sigma z."""
        bad = ~torch.isfinite(g.flatten(1)).all(1)
        ctx.count_fallbacks(bad)
        coef = self.guidance * lam_prop * sigma * sigma
        shift = torch.where(bad.view(-1, *([1] * (g.dim() - 1))), torch.zeros_like(g), coef * g)
        x_next = x_next + shift.to(x_next.dtype)
        sh = shift.flatten(1).double()
        corr = -((sh * sh).sum(1) + 2.0 * sigma * (sh * z.flatten(1).double()).sum(1)) / (2.0 * sigma * sigma)
        return x_next, corr

    def _finish(self, ctx: SamplingContext, x: Tensor, rows: Tensor, log_w: Tensor, state: Tensor,
                events: Tensor, ess_fracs: list[float]) -> Tensor:
        """Weight the particles by the final potential, on x_0 itself (its reward costs no NFE, as in
        ``ctx.final``), record the run's particle statistics and return one particle per sample."""
        b, k = log_w.shape
        s_steps = ctx.num_steps
        r0 = ctx.reward_nograd(x, rows).double().cpu().view(b, k)
        log_w, _ = self._update(log_w, state, r0, self.lam_at(s_steps, s_steps), first=s_steps == 0)
        w = normalize_log_weights(log_w)
        chosen = self.choose(ctx, r0, w)
        ctx.extras.update(
            particles=k,
            resampling_events=float(events.mean()),
            mean_ess=float(sum(ess_fracs) / len(ess_fracs)) if ess_fracs else 1.0,
            final_ess=float((ess(w) / k).mean()),
        )
        return x[flat_indices(chosen[:, None], k).to(x.device)]
