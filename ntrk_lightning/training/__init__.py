"""Training the shipped digits models with Lightning (``ntrk fit -c configs/digits_*_fit.yaml``).

The Lightning modules are imported on first access, so that the light helpers here (the plain
classifier loop the tests use, the quality measures) do not pull in Lightning and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DigitClassifierModule": "ntrk_lightning.training.classifier",
    "DigitsDataModule": "ntrk_lightning.training.data",
    "DigitsDiffusionModule": "ntrk_lightning.training.diffusion",
    "DigitsFlowModule": "ntrk_lightning.training.flow",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ntrk_lightning.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
