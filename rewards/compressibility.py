"""JPEG compressibility and incompressibility (DDPO's non-differentiable rewards).

The reward is the size of the image saved as a JPEG (quality 95 by default, as in DDPO), in
kilobytes: ``JPEGCompressibility`` returns ``-size`` (smaller files are better), and
``JPEGIncompressibility`` returns ``+size``. Encoding is done by Pillow on the 8-bit image, so
there is no gradient: ``differentiable = False``. Search samplers (best_of_n, svdd, smc with
``proposal="prior"``) can use these rewards; ``ntrk predict`` refuses a gradient sampler (NTRK,
DPS, guided SMC) with them before any model is loaded.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import Reward


BYTES_PER_KB = 1000.0
#: 8-bit pixel levels: [0, 1] maps to 0..255
MAX_LEVEL = 255.0


def jpeg_sizes_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (1000 bytes) of each image (B, C, H, W) in [0, 1] saved as JPEG at ``quality``."""
    x = images.detach()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0.0, 1.0) * MAX_LEVEL).round().to(torch.uint8)
    x = x.cpu().numpy()
    sizes = []
    for img in x:
        if img.shape[0] == 1:
            pil = Image.fromarray(np.ascontiguousarray(img[0]))  # 2-D uint8: mode L
        elif img.shape[0] == 3:
            pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))  # HxWx3 uint8: RGB
        else:
            raise ValueError(f"JPEG rewards need 1 or 3 channels, got {img.shape[0]}")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        sizes.append(buf.tell() / BYTES_PER_KB)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JPEGCompressibility(Reward):
    """``-(JPEG size in kB)``: higher for images that compress well. Not differentiable.

    Args:
        quality: JPEG quality used for the encoding (DDPO: 95).
    """

    name = "jpeg_compressibility"
    differentiable = False
    needs_prompts = False
    _sign = -1.0

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        return self._sign * jpeg_sizes_kb(images, self.quality)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "quality": self.quality, "unit": "kB"}


class JPEGIncompressibility(JPEGCompressibility):
    """``+(JPEG size in kB)``: higher for images that compress badly. Not differentiable."""

    name = "jpeg_incompressibility"
    _sign = 1.0
