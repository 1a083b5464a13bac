"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes) as tensors.

The data ship inside scikit-learn, so nothing is downloaded. Pixels (0..16) are scaled to [-1, 1];
larger resolutions are made by bilinear upsampling (align_corners=False), which keeps [-1, 1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CLASSES = 10


@lru_cache(maxsize=4)
def _load(resolution: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)) / 8.0 - 1.0  # (N, 8, 8) in [-1, 1]
    x = x.unsqueeze(1)
    if resolution != 8:
        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        x = x.clamp(-1.0, 1.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def digits(resolution: int = 8) -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(images (N, 1, R, R) in [-1, 1], labels (N,))``; copies, safe to edit."""
    x, y = _load(int(resolution))
    return x.clone(), y.clone()


def split_indices(n: int, fraction_test: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic train/test split of ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * fraction_test))
    return perm[n_test:], perm[:n_test]
