"""What the Lightning shell needs from a family of diffusion models.

A :class:`Backbone` is a frozen ``nn.Module`` that turns configuration (a shipped model name, a
local diffusers folder) into the core's :class:`~ntrk_lightning.denoiser.DiffusionModel`, a fresh
``DDIMScheduler`` and, for conditional models, the conditioning of a batch of prompts.

Construction is cheap and validates what it can (names, that local paths exist); the weights are
read in :meth:`Backbone.load`, which the LightningModule calls from ``configure_model`` so that
every rank loads from local files and the strategy then moves the module to its device.
"""

from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ntrk_lightning.denoiser import DiffusionModel


class Backbone(nn.Module, abc.ABC):
    """Base class of backbones. Subclasses implement :meth:`load`, :meth:`model` and
    :meth:`make_scheduler`; conditional ones also :meth:`conditioning`."""

    #: short name used in records and reports
    name: str = "backbone"
    #: True when :meth:`conditioning` uses the prompts
    conditional: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Read the weights (local files only). Idempotent."""
        if not self._loaded:
            self._load()
            self.requires_grad_(False)
            self.eval()
            self._loaded = True

    @abc.abstractmethod
    def _load(self) -> None:
        """Build the submodules from local files (called once by :meth:`load`)."""

    @abc.abstractmethod
    def model(self) -> DiffusionModel:
        """The denoiser, decode and sample shape for the sampling core (after :meth:`load`)."""

    @abc.abstractmethod
    def make_scheduler(self) -> Any:
        """A fresh, configured ``diffusers.DDIMScheduler`` (epsilon prediction)."""

    def conditioning(self, prompts: Sequence[str]) -> Any:
        """Conditioning for a batch of prompts, batched along dim 0 (``None``: unconditional)."""
        return None

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        if p is None:
            b = next(self.buffers(), None)
            return b.device if b is not None else torch.device("cpu")
        return p.device

    def describe(self) -> dict[str, Any]:
        """Plain-data description for records and reports."""
        return {"name": self.name}

    def train(self, mode: bool = True) -> "Backbone":  # frozen: always eval
        return super().train(False)


def check_prompts(prompts: Optional[Sequence[str]], batch: int) -> list[str]:
    """Prompts of a batch as a list (empty strings for unconditional use)."""
    if prompts is None:
        return [""] * batch
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch}")
    return prompts
