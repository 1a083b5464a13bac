"""Best-of-N: N independent trajectories per sample, keep the one with the highest final reward.

With the default inner sampler (plain) this is the simplest search baseline, N * S NFEs per
returned sample. With another single-trajectory sampler as ``inner`` it is the paper's "dagger"
composition that fills a larger budget with a guided sampler: ``BestOfN(n=20, inner=NTRK(...))`` is
NTRK-dagger at 20 * 25 = 500 NFEs (plus the inner sampler's backward passes, counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext
from ntrk_lightning.samplers.loop import TrajectorySampler
from ntrk_lightning.samplers.plain import Plain


@dataclass
class BestOfN(Sampler):
    """N trajectories per sample (each on its own child noise stream), best final reward.

    Args:
        n: trajectories per sample.
        inner: the single-trajectory sampler each trajectory runs (default ``Plain(eta=eta)``).
        eta: eta of the plain trajectories when ``inner`` is not given.

    With ``n=1`` it is exactly the inner sampler on the sample's own stream; with ``n>1``
    trajectory j of sample i runs on child stream ``NoiseSource.spawn(n)`` row ``i*n + j``.
    ``ctx.extras`` gets ``trajectory_rewards`` ((B, n) tensor, final reward of every trajectory),
    ``chosen`` ((B,) long tensor) and ``trajectories`` (n).
    """

    n: int = 4
    inner: Optional[Sampler] = None
    eta: float = 1.0

    name: ClassVar[str] = "best_of_n"
    nfe_formula: ClassVar[str] = "n * (NFE of inner), inner default plain: n * S"
    source: ClassVar[str] = "best-of-N (rejection by final reward); 'dagger' composition per arXiv:2606.18066"
    positive_ints: ClassVar[tuple] = ("n",)

    @property
    def needs_gradient(self) -> bool:  # type: ignore[override]
        return self.inner is not None and bool(self.inner.needs_gradient)

    def trajectory_sampler(self) -> TrajectorySampler:
        return Plain(eta=self.eta) if self.inner is None else self.inner  # type: ignore[return-value]

    def rows_per_sample(self) -> int:
        return int(self.n)

    def step_eta(self) -> float:
        return self.trajectory_sampler().step_eta()

    def check(self) -> None:
        if self.inner is not None:
            if not isinstance(self.inner, TrajectorySampler):
                raise ValueError(f"best_of_n: inner must be a single-trajectory sampler (plain, dps, ntrk, ...), "
                                 f"got {getattr(self.inner, 'name', type(self.inner).__name__)!r}")
            self.inner.validate()

    def run(self, ctx: SamplingContext, x: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        n = int(self.n)
        if x.shape[0] != ctx.batch_size * n:
            raise ValueError(f"best_of_n expected {ctx.batch_size * n} rows, got {x.shape[0]}")
        rows = torch.arange(ctx.batch_size).repeat_interleave(n)
        x = self.trajectory_sampler().run(ctx, x, rows)
        # the reward of x_0 itself costs no NFE (as in ctx.final)
        r = ctx.reward_nograd(x, rows).view(ctx.batch_size, n)
        r_sel = torch.where(torch.isnan(r), torch.full_like(r, float("-inf")), r)
        chosen = r_sel.argmax(dim=1)
        ctx.extras.update(trajectories=n, trajectory_rewards=r.cpu(), chosen=chosen.cpu())
        idx = torch.arange(ctx.batch_size, device=chosen.device) * n + chosen
        return x[idx.to(x.device)]
