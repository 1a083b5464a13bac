"""The reward interface: images in [0, 1] of shape (B, C, H, W), plus optional prompts, to a (B,)
tensor, differentiable with respect to the images where the model is.

Rewards that read weight files validate the paths at construction (a clear error naming the file
and how to get it) and read them in :meth:`Reward.load`, which the Lightning shell calls from
``configure_model`` on every rank. Calling a reward loads it on first use, so plain scripts need no
extra step.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn


class Reward(nn.Module):
    """Base class of rewards. Subclasses implement :meth:`score` (and :meth:`_load` when they
    read files)."""

    #: gradient samplers (NTRK, DPS, guided SMC) need d reward / d image
    differentiable: bool = True
    #: the reward reads the prompts (text-image alignment); others ignore them
    needs_prompts: bool = False
    #: short name used in records and reports
    name: str = "reward"

    def __init__(self) -> None:
        super().__init__()
        self._loaded = False

    def load(self) -> "Reward":
        """Read weights from local files (idempotent); freezes the parameters."""
        if not self._loaded:
            self._load()
            self.requires_grad_(False)
            self.eval()
            self._loaded = True
        return self

    def _load(self) -> None:
        """Read weights; default: nothing to read."""

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        if not self._loaded:
            self.load()
        if images.dim() != 4:
            raise ValueError(f"{self.name}: expected images (B, C, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if self.needs_prompts and prompts is None:
            raise ValueError(f"{self.name} needs prompts (one per image)")
        if prompts is not None and len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {len(prompts)} prompts for {images.shape[0]} images")
        r = self.score(images, prompts)
        if r.shape != (images.shape[0],):
            raise ValueError(f"{self.name} returned shape {tuple(r.shape)}, expected ({images.shape[0]},)")
        return r

    def train(self, mode: bool = True) -> "Reward":  # frozen: always eval
        return super().train(False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "differentiable": self.differentiable}


def is_differentiable(reward: Any) -> bool:
    """Whether a reward (a :class:`Reward` or any callable) can be differentiated; callables
    without the attribute are assumed differentiable."""
    return bool(getattr(reward, "differentiable", True))
