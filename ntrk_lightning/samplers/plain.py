"""Plain ancestral sampling with the pretrained model: DDIM(eta), eta = 1 being DDPM-like."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ntrk_lightning.samplers.base import Sampler, SamplingContext


@dataclass
class Plain(Sampler):
    """The pretrained reverse process, no reward. ``eta`` scales the DDIM noise (0 = deterministic)."""

    eta: float = 1.0

    name: ClassVar[str] = "plain"
    needs_reward: ClassVar[bool] = False

    def validate(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"plain: eta must be in [0, 1], got {self.eta}")

    def run(self, ctx: SamplingContext, x: Tensor) -> Tensor:
        rows = torch.arange(x.shape[0])
        for i in range(ctx.num_steps):
            eps = ctx.eps(x, i, rows)
            x = ctx.step(eps, i, x, ctx.noise.randn())
        return x
