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
#: share of the digits held out as the test split (``split_indices`` default)
TEST_FRACTION = 0.2


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


def split_indices(n: int, fraction_test: float = TEST_FRACTION, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic train/test split of ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * fraction_test))
    return perm[n_test:], perm[:n_test]


def real_images(resolution: int = 16, split: str = "all") -> tuple[Tensor, Tensor]:
    """Real digits as images in [0, 1] with labels; ``split`` in {"all", "train", "test"}
    (the :func:`split_indices` split with its defaults)."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    x, y = digits(resolution)
    if split != "all":
        tr, te = split_indices(len(y))
        idx = tr if split == "train" else te
        x, y = x[idx], y[idx]
    return (x + 1.0) * 0.5, y


def real_halves(resolution: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two disjoint random halves (899 / 898 images) of all 1797 real digits, in [0, 1]."""
    x, _ = real_images(resolution)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    h = (len(x) + 1) // 2
    return x[perm[:h]], x[perm[h:]]
