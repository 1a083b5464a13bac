"""The image-tensor conventions every reward, metric and feature extractor shares: ``uint8`` in
[0, 255] or float in [0, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def as_float01(images: Tensor) -> Tensor:
    """``uint8`` images in [0, 255] or floating images in [0, 1] -> float images in [0, 1].

    Floating input keeps its dtype unless it is half precision (promoted to float32, the dtype
    the feature extractors and CLIP expect); gradients flow through floating input.
    """
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}")
    return images.float() if images.dtype in (torch.float16, torch.bfloat16) else images


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] (or uint8) -> ``uint8``, rounding to the nearest level; the exact
    inverse of ``as_float01`` on 8-bit data."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
