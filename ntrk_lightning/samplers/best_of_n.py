"""Best-of-N: N independent plain trajectories per sample, keep the one with the highest final
reward. The simplest search baseline; it spends exactly N * S NFEs per returned sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext


@dataclass
class BestOfN(Sampler):
    """N plain trajectories per sample (each on its own child noise stream), best final reward.

    With ``n=1`` it is exactly the plain sampler on the sample's own stream; with ``n>1`` trajectory
    j of sample i runs on child stream ``NoiseSource.spawn(n)`` row ``i*n + j``.

    ``ctx.extras`` gets ``trajectory_rewards`` ((B, n) tensor, final reward of every trajectory),
    ``chosen`` ((B,) long tensor) and ``trajectories`` (n).
    """

    n: int = 4
    eta: float = 1.0

    name: ClassVar[str] = "best_of_n"

    def rows_per_sample(self) -> int:
        return int(self.n)

    def validate(self) -> None:
        if int(self.n) != self.n or self.n < 1:
            raise ValueError(f"best_of_n: n must be an integer >= 1, got {self.n}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"best_of_n: eta must be in [0, 1], got {self.eta}")

    def run(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        n = int(self.n)
        if x.shape[0] != ctx.batch_size * n:
            raise ValueError(f"best_of_n expected {ctx.batch_size * n} rows, got {x.shape[0]}")
        rows = torch.arange(ctx.batch_size).repeat_interleave(n)
        for i in range(ctx.num_steps):
            eps = ctx.eps(x, i, rows)
            x = ctx.step(eps, i, x, ctx.noise.randn())
        # the reward of x_0 itself costs no NFE (as in ctx.final)
        r = ctx.reward_nograd(x, rows).view(ctx.batch_size, n)
        r_sel = torch.where(torch.isnan(r), torch.full_like(r, float("-inf")), r)
        chosen = r_sel.argmax(dim=1)
        ctx.extras.update(trajectories=n, trajectory_rewards=r.cpu(), chosen=chosen.cpu())
        idx = torch.arange(ctx.batch_size, device=chosen.device) * n + chosen
        return x[idx.to(x.device)]
