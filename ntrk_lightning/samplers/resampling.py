"""Particle-weight utilities shared by the SMC and SVDD baselines: pure functions over (B, K)
tensors, one group of K particles (or candidates) per requested sample.

Randomness is always passed in as uniforms, so the functions are deterministic and the samplers
can draw those uniforms from per-sample streams (:class:`GroupStreams`): a sample's result then
does not depend on which batch it was drawn in. Indices returned are *local* (0..K-1 within a
group); :func:`flat_indices` turns them into rows of the (B*K, ...) working tensor, so particles of
one sample never mix with another sample's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ntrk_lightning.noise import derive_seed

#: stream tags, so that selection/resampling streams never coincide with the noise streams
#: (``NoiseSource.spawn`` uses tag 0 for child noise streams)
SVDD_SELECT_TAG = 101
SMC_RESAMPLE_TAG = 102
SMC_SELECT_TAG = 103
SVDD_CANDIDATE_TAG = 104


def normalize_log_weights(log_w: Tensor) -> Tensor:
    """Normalized weights (float64, each row sums to 1) from unnormalized log-weights (B, K).

    NaN and +inf entries are treated as ``-inf`` (a particle whose weight cannot be computed is
    dropped); a group with no finite weight falls back to uniform weights."""
    if log_w.dim() != 2:
        raise ValueError(f"log-weights must have shape (B, K), got {tuple(log_w.shape)}")
    lw = log_w.double()
    lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, float("-inf")))
    dead = torch.isinf(lw).all(dim=1, keepdim=True)
    lw = torch.where(dead, torch.zeros_like(lw), lw)
    return torch.softmax(lw, dim=1)


def ess(weights: Tensor) -> Tensor:
    """Effective sample size (sum w)^2 / sum w^2 per group of non-negative weights (B, K) -> (B,).

    Uniform weights give K, a one-hot weight vector gives 1."""
    if weights.dim() != 2:
        raise ValueError(f"weights must have shape (B, K), got {tuple(weights.shape)}")
    w = weights.double()
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative (use normalize_log_weights first)")
    s = w.sum(dim=1)
    return s * s / (w * w).sum(dim=1).clamp_min(1e-300)


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """For each group b and each uniform u[b, m] in [0, 1), the index j with
    cdf[j-1] <= u < cdf[j] (zero-weight particles are never chosen)."""
    w = weights.double()
    if w.dim() != 2 or u.dim() != 2 or u.shape[0] != w.shape[0]:
        raise ValueError(f"weights (B, K) and uniforms (B, M) expected, got {tuple(w.shape)}, {tuple(u.shape)}")
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    total = w.sum(dim=1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("every group needs a positive total weight")
    cdf = torch.cumsum(w / total, dim=1)
    cdf[:, -1] = 1.0  # no rounding gap at the top
    idx = torch.searchsorted(cdf, u.double().contiguous(), right=True)
    return idx.clamp_max(w.shape[1] - 1)


def multinomial_resample(weights: Tensor, u: Tensor) -> Tensor:
    """Multinomial resampling: K i.i.d. ancestor draws per group from uniforms ``u`` (B, K).

    Returns local ancestor indices (B, K); E[#copies of j] = K * w_j."""
    if u.shape != weights.shape:
        raise ValueError(f"multinomial resampling needs one uniform per particle: {tuple(weights.shape)}, "
                         f"got {tuple(u.shape)}")
    return _inverse_cdf(weights, u)


def systematic_resample(weights: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling: one uniform per group (shape (B,)), positions (u + m) / K.

    Returns local ancestor indices (B, K), sorted; particle j gets floor(K w_j) or ceil(K w_j)
    copies and E[#copies of j] = K * w_j."""
    if u.dim() != 1 or u.shape[0] != weights.shape[0]:
        raise ValueError(f"systematic resampling needs one uniform per group, got {tuple(u.shape)}")
    k = weights.shape[1]
    pos = (u.double()[:, None] + torch.arange(k, dtype=torch.float64)[None]) / k
    return _inverse_cdf(weights, pos)


def categorical(weights: Tensor, u: Tensor) -> Tensor:
    """One index per group (B,) drawn from ``weights`` (B, K) with uniforms ``u`` (B,)."""
    if u.dim() != 1 or u.shape[0] != weights.shape[0]:
        raise ValueError(f"need one uniform per group, got {tuple(u.shape)}")
    return _inverse_cdf(weights, u[:, None])[:, 0]


def flat_indices(local: Tensor, k: int) -> Tensor:
    """Rows of the flattened (B*K, ...) working tensor for local indices (B, M) -> (B*M,): group b
    only ever points into its own rows b*K .. b*K+K-1."""
    b = local.shape[0]
    return (torch.arange(b, device=local.device)[:, None] * k + local).reshape(-1)


class GroupStreams:
    """One CPU generator per group (sample), seeded from that sample's seed and a tag, for the
    uniforms of selection and resampling decisions."""

    def __init__(self, seeds: Sequence[int], tag: int) -> None:
        self.seeds = [derive_seed(int(s) % (1 << 63), int(tag)) for s in seeds]
        self._gens = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self._gens)

    def uniform(self, m: int) -> Tensor:
        """(B, m) uniforms in [0, 1), float64."""
        return torch.stack([torch.rand(m, generator=g, dtype=torch.float64) for g in self._gens])

    @classmethod
    def for_groups(cls, row_seeds: Sequence[int], k: int, tag: int) -> "GroupStreams":
        """Streams for groups of ``k`` consecutive rows, keyed on the seed of each group's first row
        (for spawned noise that seed is itself derived from the sample's seed)."""
        return cls(list(row_seeds)[::k], tag)
