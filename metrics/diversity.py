"""Diversity of a generated set: mean pairwise L2 distance between feature vectors.

A reward-aligned sampler can buy reward with collapse (every sample the same high-reward image);
FID sees that only indirectly. The mean distance between all pairs of samples, overall and among
the samples of each prompt, measures it directly. Features are the same extractors FID uses.

The features are the state (gathered across ranks), because pairwise distances are not additive
over shards; they are stored flat (1-D) so that a rank without samples still gathers cleanly.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from metrics._sync import TypedCatStates, cat_state
from metrics.features import build_feature, extract, feature_name


def _pair_distance_sum(x: Tensor, block: int = 1024) -> float:
    """Sum over ordered pairs (i != j) of ||x_i - x_j||, in float64, in row blocks (memory O(block * n))."""
    total = 0.0
    for s in range(0, x.shape[0], block):
        d = torch.cdist(x[s:s + block], x, compute_mode="donot_use_mm_for_euclid_dist")
        total += float(d.sum())
    return total


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean of ||x_i - x_j|| over unordered pairs i < j of the rows of ``x``; NaN for fewer than 2 rows."""
    n = x.shape[0]
    if n < 2:
        return math.nan
    x = x.to(torch.float64)
    return _pair_distance_sum(x) / (n * (n - 1))


class Diversity(TypedCatStates, Metric):
    """Mean pairwise L2 distance of features, overall and per group (prompt).

    ``update(images, groups=None)``: images ``uint8`` (B, C, H, W) or float in [0, 1]; ``groups``
    a (B,) integer tensor (prompt index of each image; ``None`` or negative = no group).
    ``update(features=F, groups=g)`` adds precomputed (B, D) features instead (share one forward
    pass with FID). ``compute()`` returns ``{"overall": float, "per_group": {group: float}}``:
    the mean over all unordered pairs of distinct samples, and over the pairs inside each group;
    groups with a single sample are left out; NaN overall with fewer than 2 samples.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    _cat_dtypes = {"features": torch.float64, "groups": torch.long}

    def __init__(self, feature: Union[nn.Module, str] = "inception", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature = build_feature(feature)
        self.feature_name = feature_name(self.feature)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        # feature dimension, agreed across ranks (a rank without samples does not know it)
        self.add_state("dim", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")

    def update(self, images: Optional[Tensor] = None, groups: Optional[Tensor] = None, *,  # type: ignore[override]
               features: Optional[Tensor] = None) -> None:
        if (images is None) == (features is None):
            raise ValueError("Diversity.update: pass either images or features")
        f = extract(self.feature, images) if features is None else features.detach().to(torch.float64)
        f = f.reshape(f.shape[0], -1).to(self.device)
        b, d = f.shape
        if int(self.dim) not in (0, d):
            raise ValueError(f"features of dimension {d}, earlier batches had {int(self.dim)}")
        if groups is None:
            g = torch.full((b,), -1, dtype=torch.long, device=self.device)
        else:
            g = torch.as_tensor(groups).reshape(-1).to(device=self.device, dtype=torch.long)
            if g.numel() != b:
                raise ValueError(f"{g.numel()} group indices for {b} images")
        self.dim = torch.tensor(d, dtype=torch.long, device=self.device)
        self.features.append(f.reshape(-1))
        self.groups.append(g)

    def compute(self) -> dict[str, Any]:
        d = int(self.dim)
        g = cat_state(self.groups, torch.long).cpu()
        if d == 0 or g.numel() == 0:
            return {"overall": math.nan, "per_group": {}}
        x = cat_state(self.features, torch.float64).cpu().reshape(-1, d)
        per_group: dict[int, float] = {}
        for k in sorted(set(g.tolist())):
            if k < 0:
                continue
            members = x[g == k]
            if members.shape[0] >= 2:
                per_group[int(k)] = mean_pairwise_distance(members)
        return {"overall": mean_pairwise_distance(x), "per_group": per_group}
