"""SVDD: soft value-based decoding (Li et al., 2024, "Derivative-free guidance in continuous and
discrete diffusion models with soft value-based decoding"), on the same loop and accounting.

At every stochastic step each sample draws K candidate noises, forms K candidate x_{t-1} with the
pretrained step, scores each by the reward of its Tweedie estimate (the "posterior mean" value
approximation: one denoiser evaluation per candidate at t-1) and keeps one, by argmax
(``alpha=0``) or by sampling from softmax(r / alpha). The chosen candidate's eps at t-1 is reused
by the next step, so a sample costs 1 + K * (number of stochastic steps) NFEs plus one per
deterministic step (1 + K * (S - 1) for DDIM with a final sigma = 0 step). No reward gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext
from ntrk_lightning.samplers.resampling import SVDD_CANDIDATE_TAG, SVDD_SELECT_TAG, GroupStreams, categorical, flat_indices


@dataclass
class SVDD(Sampler):
    """Soft value-based decoding.

    Args:
        candidates: K candidate noises per sample and step (K=1 is exactly the plain sampler).
        alpha: selection temperature; 0 = argmax of the candidates' Tweedie rewards, > 0 = sample
            from softmax(r / alpha) with the sample's own selection stream.
        eta: DDIM eta of the underlying step (> 0: candidates differ only through the noise).

    Candidate j of sample i draws from sample i's child noise stream j (``NoiseSource.spawn``), so
    results do not depend on batch composition. ``ctx.extras`` gets ``candidates``,
    ``mean_selected_gain`` (mean over samples and scored steps of the chosen candidate's Tweedie
    reward minus the candidates' mean) and ``scored_steps``.
    """

    candidates: int = 4
    alpha: float = 0.0
    eta: float = 1.0

    name: ClassVar[str] = "svdd"
    nfe_formula: ClassVar[str] = "1 + K * (stochastic steps) + (deterministic steps): 1 + K (S - 1) for DDIM"
    source: ClassVar[str] = "Li et al. 2024, soft value-based decoding (arXiv:2408.08252)"
    positive_ints: ClassVar[tuple] = ("candidates",)
    nonnegative: ClassVar[tuple] = ("alpha",)
    eta_min_open: ClassVar[bool] = True

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        k = int(self.candidates)
        b = x.shape[0]
        rows = torch.arange(b) if rows is None else rows
        rows_c = rows.repeat_interleave(k)
        streams = GroupStreams(ctx.noise.seeds, SVDD_SELECT_TAG) if (k > 1 and self.alpha > 0) else None
        # candidate j of sample i draws from child stream (i, j); one candidate = the sample's own stream
        cand_noise = ctx.noise if k == 1 else ctx.noise.spawn(k, tag=SVDD_CANDIDATE_TAG)
        eps = ctx.eps(x, 0, rows)
        gains, scored = [], 0
        for i in range(ctx.num_steps):
            last = i == ctx.num_steps - 1
            z = cand_noise.randn().view(b, k, *x.shape[1:])  # (B, K, ...)
            if k == 1 or ctx.std(i) == 0:
                # nothing to choose (one candidate, or a deterministic step): the plain step
                x_next = ctx.step(eps, i, x, z[:, 0])
                ctx.step_done(i, x_next, eps, x, self.name)
                x = x_next
                if not last:
                    eps = ctx.eps(x, i + 1, rows)
                continue
            xr = x.repeat_interleave(k, dim=0)
            er = eps.repeat_interleave(k, dim=0)
            xc = ctx.step(er, i, xr, z.flatten(0, 1))
            if last:
                ec = None
                r = ctx.reward_nograd(xc, rows_c)  # x_0 itself: no NFE
            else:
                ec = ctx.eps(xc, i + 1, rows_c)
                r = ctx.reward_nograd(ctx.x0_hat(xc, ec, i + 1), rows_c)
            r = r.double().view(b, k).cpu()
            r = torch.where(torch.isnan(r), torch.full_like(r, float("-inf")), r)
            chosen = self.select(r, streams)
            finite = torch.isfinite(r)
            mean_r = torch.where(finite, r, torch.zeros_like(r)).sum(1) / finite.sum(1).clamp_min(1)
            picked = r.gather(1, chosen[:, None])[:, 0]
            ok = torch.isfinite(picked)
            if ok.any():
                gains.append((picked - mean_r)[ok].mean().item())
            scored += 1
            idx = flat_indices(chosen[:, None], k).to(x.device)
            ctx.step_done(i, xc[idx], eps, x, self.name)
            x = xc[idx]
            if ec is not None:
                eps = ec[idx]
        ctx.extras.update(candidates=k, scored_steps=scored,
                          mean_selected_gain=float(sum(gains) / len(gains)) if gains else 0.0)
        return x

    def select(self, r: Tensor, streams: "GroupStreams | None") -> Tensor:
        """Index (B,) of the kept candidate for candidate rewards ``r`` (B, K); -inf = unusable."""
        if self.alpha == 0 or streams is None:
            return r.argmax(dim=1)
        u = streams.uniform(1)[:, 0]  # drawn for every sample, so streams stay in step
        hot = torch.isposinf(r).any(dim=1)  # an infinite reward wins outright
        logits = torch.where(torch.isposinf(r), torch.zeros_like(r), r) / self.alpha
        none = torch.isinf(logits).all(dim=1, keepdim=True)
        logits = torch.where(none, torch.zeros_like(logits), logits)
        w = torch.softmax(logits, dim=1)
        return torch.where(hot, r.argmax(dim=1), categorical(w, u))
