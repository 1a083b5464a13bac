"""RBF: rollover budget forcing (Kim et al. 2025, "Inference-Time Scaling for Flow Models via
Stochastic Generation and Rollover Budget Forcing", arXiv:2503.19385), on the same loop and
accounting.

A per-step candidate search like SVDD, but with a total NFE budget and an adaptive number of
candidates per step. Each candidate x_{t-1} is a draw of the pretrained stochastic step, scored by
the reward of its Tweedie estimate (one denoiser evaluation at t-1, which the chosen candidate
hands to the next step, so a plain trajectory costs exactly S NFEs). The budget's spare part
(``budget - S``) is spread evenly over the stochastic steps on top of their one plain candidate; at
every step a sample draws candidates one at a time and

* stops as soon as a candidate's reward beats the best value found so far (the reward of x0_hat(x_T)
  at the start, raised at every such improvement), moves to that candidate, and **rolls the unused
  part of this step's allocation over** to the next step;
* otherwise, once its allocation is spent, moves to the best candidate of the step (the best value
  is not lowered; nothing rolls over).

The last scored step (the last stochastic step whose candidates cost an NFE) does not stop early:
it spends everything left and keeps its best candidate, as the reference implementation searches
the final step until the budget is exhausted. So every sample spends exactly ``budget`` NFEs
(when the schedule has a scored step); what differs between samples is where they spend it.
Samples search in rounds: every round evaluates one candidate for each sample still searching, so
the work stays batched. The counting denoiser's rows are the truth, and
``ctx.extras["nfe_per_sample"]`` splits them by sample.

Not included: the paper's other two ingredients (the ODE-to-SDE conversion, which the stochastic
kernel here already is, and the VP interpolant conversion), nor its best-of-N choice of x_T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ntrk_lightning.noise import NoiseSource
from ntrk_lightning.samplers.base import Sampler, SamplingContext

#: tag of the child streams that feed every candidate after a sample's first one at each step
RBF_CANDIDATE_TAG = 106


@dataclass
class RBF(Sampler):
    """Rollover budget forcing.

    Args:
        budget: total NFEs per sample (>= S; ``budget = S`` is exactly plain sampling).
        eta: DDIM eta of the underlying step (> 0: candidates differ only through the noise).

    A step's first candidate uses the sample's own noise stream (as plain sampling does), later
    ones the sample's child stream ``NoiseSource.spawn(1, tag=RBF_CANDIDATE_TAG)``, drawn only for
    the samples that still search, so a sample's result does not depend on its batch.
    ``ctx.extras`` gets ``budget``, ``nfe_per_sample`` ((B,) long tensor), ``rollovers`` (mean per
    sample: steps left early on an improvement, their unused allocation rolled over) and
    ``candidates_per_step`` (mean over samples and scored steps).
    """

    budget: int = 100
    eta: float = 1.0

    name: ClassVar[str] = "rbf"
    nfe_formula: ClassVar[str] = "budget (spread adaptively over the steps; budget = S is plain sampling)"
    source: ClassVar[str] = ("Kim et al. 2025, Inference-Time Scaling for Flow Models via Stochastic Generation "
                             "and Rollover Budget Forcing (arXiv:2503.19385)")
    positive_ints: ClassVar[tuple] = ("budget",)
    eta_min_open: ClassVar[bool] = True

    def allocations(self, ctx: SamplingContext) -> list[int]:
        """Candidates allotted to each reverse step before rollover: 1 at a deterministic step or
        at the last one (whose candidates are x_0 itself and cost no NFE), 1 + an even share of
        ``budget - S`` at the stochastic steps whose candidates cost one NFE each."""
        n = ctx.num_steps
        scored = [i for i in range(n) if ctx.std(i) > 0 and i < n - 1]
        spare = int(self.budget) - n
        if spare < 0:
            raise ValueError(f"rbf: budget must be >= the number of steps ({n}), got {self.budget}")
        alloc = [1] * n
        m = len(scored)
        for j, i in enumerate(scored):  # (no scored step: nothing to spread)
            alloc[i] += (spare * (j + 1)) // m - (spare * j) // m
        return alloc

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        b = x.shape[0]
        rows = torch.arange(b) if rows is None else rows
        n_steps = ctx.num_steps
        alloc = self.allocations(ctx)
        more = ctx.noise.spawn(1, tag=RBF_CANDIDATE_TAG)
        spent = torch.zeros(b, dtype=torch.long)
        eps = ctx.eps(x, 0, rows)
        spent += 1
        best = self._score(ctx.reward_nograd(ctx.x0_hat(x, eps, 0), rows))
        carry = torch.zeros(b, dtype=torch.long)
        scored = [i for i in range(n_steps) if ctx.std(i) > 0 and i < n_steps - 1]
        final_scored = scored[-1] if scored else -1
        rollovers = torch.zeros(b, dtype=torch.long)
        drawn_total, scored_steps = 0, 0
        for i in range(n_steps):
            last = i == n_steps - 1
            z = ctx.noise.randn()
            if ctx.std(i) == 0:
                # deterministic: one candidate, nothing to choose
                x_next = ctx.step(eps, i, x, z)
                ctx.step_done(i, x_next, eps, x, self.name)
                x = x_next
                if not last:
                    eps = ctx.eps(x, i + 1, rows)
                    spent += 1
                continue
            cap = alloc[i] + carry  # (B,) candidates this step may draw
            exhaust = i == final_scored  # the last scored step spends everything left
            x_best, e_best, r_best, drawn, improved = self._search_step(
                ctx, x, eps, z, i, rows, last, best, cap, exhaust, more, spent)
            # rollover: an improving sample keeps what it did not draw; the others start afresh
            carry = torch.where(improved, cap - drawn, torch.zeros_like(cap))
            if not exhaust:
                rollovers += improved.long()
            best = torch.where(improved, r_best, best)
            drawn_total += int(drawn.sum())
            scored_steps += 1
            ctx.step_done(i, x_best, eps, x, self.name)
            x = x_best
            if e_best is not None:
                eps = e_best
        ctx.extras.update(budget=int(self.budget), nfe_per_sample=spent.clone(),
                          rollovers=float(rollovers.double().mean()),
                          candidates_per_step=drawn_total / max(1, scored_steps * b))
        return x

    def _search_step(self, ctx: SamplingContext, x: Tensor, eps: Tensor, z: Tensor, i: int, rows: Tensor,
                     last: bool, best: Tensor, cap: Tensor, exhaust: bool, more: NoiseSource,
                     spent: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
        """Draw candidates of step ``i`` until each sample beats its running ``best`` (or, when
        ``exhaust``, until its budget ``cap`` is spent); count their NFEs into ``spent``.

        Returns the step's best candidate per sample with its next network output and score, the
        candidates drawn per sample, and whether each sample improved on ``best``."""
        b = x.shape[0]
        # round 0: every sample's first candidate, from its own stream
        x_best = ctx.step(eps, i, x, z)
        e_best, r_best = self._evaluate(ctx, x_best, i, rows, last)
        if not last:
            spent += 1
        drawn = torch.ones(b, dtype=torch.long)
        improved = r_best > best
        active = (~improved | exhaust) & (drawn < cap)
        while bool(active.any()):
            idx = active.nonzero()[:, 0]
            zc = more.randn(idx.tolist())
            dev = idx.to(x.device)
            xc = ctx.step(eps[dev], i, x[dev], zc)
            ec, rc = self._evaluate(ctx, xc, i, rows[idx], last)
            if not last:
                spent[idx] += 1
            drawn[idx] += 1
            better = rc > r_best[idx]  # best of this step so far
            if bool(better.any()):
                take, tdev = idx[better], dev[better.to(dev.device)]
                x_best[tdev] = xc[better.to(xc.device)]
                if ec is not None:
                    e_best[tdev] = ec[better.to(ec.device)]
                r_best[take] = rc[better]
            hit = rc > best[idx]
            improved[idx] |= hit
            active[idx] = (~hit | exhaust) & (drawn[idx] < cap[idx])
        return x_best, e_best, r_best, drawn, improved

    @staticmethod
    def _score(r: Tensor) -> Tensor:
        """Rewards as (B,) float64 on the CPU; NaN (unusable) never wins."""
        r = r.double().cpu()
        return torch.where(torch.isnan(r), torch.full_like(r, float("-inf")), r)

    def _evaluate(self, ctx: SamplingContext, xc: Tensor, step: int, rows: Tensor,
                  last: bool) -> tuple[Optional[Tensor], Tensor]:
        """Network output at the next step (None after the last step) and the candidates' scores:
        the reward of their Tweedie estimate, or of x_0 itself after the last step (no NFE)."""
        if last:
            return None, self._score(ctx.reward_nograd(xc, rows))
        ec = ctx.eps(xc, step + 1, rows)
        return ec, self._score(ctx.reward_nograd(ctx.x0_hat(xc, ec, step + 1), rows))
