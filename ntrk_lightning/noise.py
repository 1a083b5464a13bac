"""Per-sample random streams, so results do not depend on batch composition or world size.

Every returned sample owns a generator seeded from its own integer seed; samplers that need more
rows per sample (best-of-N trajectories, SVDD candidates, SMC particles) spawn child streams per
slot. Noise is drawn on the CPU and moved, which also makes CPU and GPU runs draw the same noise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (e.g. run seed, prompt, sample index).

    Uses NumPy's SeedSequence hashing, so nearby keys give unrelated streams."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


class NoiseSource:
    """One CPU generator per row; ``randn()`` draws a (rows, *shape) standard normal tensor."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self._gens = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, rows: Sequence[int] | None = None) -> Tensor:
        """Standard normal noise for all rows, or only for ``rows`` (advancing only their streams)."""
        gens = self._gens if rows is None else [self._gens[i] for i in rows]
        out = torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float32) for g in gens])
        return out.to(device=self.device, dtype=self.dtype)

    def rand(self) -> Tensor:
        """One uniform [0, 1) number per row (for resampling decisions)."""
        return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self._gens])

    def spawn(self, k: int, tag: int = 0) -> "NoiseSource":
        """Child streams: row ``i * k + j`` is slot j of row i, seeded from (seed_i, tag, j)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        seeds = [derive_seed(s % (1 << 63), tag, j) for s in self.seeds for j in range(k)]
        return NoiseSource(seeds, self.shape, self.device, self.dtype)


def sample_seeds(run_seed: int, n: int, group: int = 0) -> list[int]:
    """Seeds of samples 0..n-1 of group (e.g. prompt index) ``group`` of a run."""
    return [derive_seed(run_seed, group, i) for i in range(n)]
