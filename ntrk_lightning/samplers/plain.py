"""Plain ancestral sampling with the pretrained model: DDIM(eta), eta = 1 being DDPM-like."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ntrk_lightning.samplers.loop import TrajectorySampler


@dataclass
class Plain(TrajectorySampler):
    """The pretrained reverse process, no reward. ``eta`` scales the DDIM noise (0 = deterministic;
    for flow models the Euler step of the flow ODE)."""

    eta: float = 1.0

    name: ClassVar[str] = "plain"
    needs_reward: ClassVar[bool] = False
    nfe_formula: ClassVar[str] = "S"
    source: ClassVar[str] = "Ho et al. 2020 (DDPM); Song et al. 2021 (DDIM)"
