"""FID of generated images against precomputed real statistics, as a thin torchmetrics Metric.

The distance itself is the pure function :func:`frechet_distance`; :class:`FrechetDistance` only
keeps the running sums a Gaussian fit needs (float64 sums and a count, reduced by summation, so
the DDP result is exact for any world size and any shard sizes) and calls it in ``compute``.
The real side comes from a :class:`~metrics.reference.ReferenceStats` held outside the metric
states: computed once and cached, never summed across ranks, not cleared by ``reset()``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from metrics.features import build_feature, extract, feature_identity, feature_name, num_features
from metrics.reference import ReferenceStats, reference_stats

PathLike = Union[str, "os.PathLike[str]"]

#: fewest generated images with a covariance (n - 1 > 0)
MIN_IMAGES = 2


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)) in float64, clamped at 0 (rounding
    can make the distance of a set to itself a tiny negative number)."""
    mu1, mu2, cov1, cov2 = (t.to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    diff = (mu1 - mu2).square().sum()
    # eigenvalues of cov1 @ cov2 are those of cov1^(1/2) cov2 cov1^(1/2) (real, >= 0 up to rounding)
    root_trace = torch.linalg.eigvals(cov1 @ cov2).sqrt().real.sum()
    return (diff + cov1.trace() + cov2.trace() - 2.0 * root_trace).clamp_min(0.0)


def gaussian_from_sums(total: Tensor, outer: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(mean, unbiased covariance) from the sum of features and the sum of their outer products."""
    mean = total / n
    return mean, (outer - n * torch.outer(mean, mean)) / (n - 1)


class FrechetDistance(Metric):
    """FID of generated images under any feature extractor, against cached real statistics.

    Args:
        feature: ``"inception"`` (standard FID; local weights only), ``"digits"``, an import path
            ``"package.module:Class"`` or an ``nn.Module`` (see :func:`metrics.build_feature`).
        reference: real statistics: a :class:`ReferenceStats`, ``"digits[:R]"``, a folder of
            images or a statistics file (see :func:`metrics.reference_stats`; computed once and
            cached). ``None``: set it later (:meth:`set_reference`) or feed real images with
            ``update(images, real=True)`` (summed across ranks like the generated ones).
        weights_path: local InceptionV3 weights for ``feature="inception"``.
        cache_dir: cache folder for reference statistics.

    ``update(images)`` takes generated images, ``uint8`` (B, C, H, W) in [0, 255] or float in
    [0, 1] (the extractor always receives float in [0, 1]); ``update(features=F)`` adds
    precomputed (B, D) features of the same extractor (to share one forward pass with
    :class:`~metrics.Diversity`). ``compute()`` is a 0-dim float64 tensor; NaN (with a warning)
    when fewer than 2 generated images were seen. States stay float64 even when a precision
    plugin casts the module (bf16 breaks the matrix square root).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, feature: Union[nn.Module, str] = "inception",
                 reference: Union[ReferenceStats, str, PathLike, None] = None,
                 weights_path: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature = build_feature(feature, weights_path=weights_path)
        self.feature_name = feature_name(self.feature)
        self.feature_identity = feature_identity(self.feature)
        self._cache_dir = cache_dir
        self.reference: Optional[ReferenceStats] = None
        if reference is not None:
            self.set_reference(reference)
        dim = num_features(self.feature) or (self.reference.dim if self.reference is not None else None)
        if dim is None:
            raise ValueError(f"feature {self.feature_name!r} declares no num_features; give it one, or a reference")
        for side in ("fake", "real"):
            self.add_state(f"{side}_features_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_features_cov_sum", torch.zeros(dim, dim, dtype=torch.float64),
                           dist_reduce_fx="sum")
            self.add_state(f"{side}_features_num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def set_reference(self, reference: Union[ReferenceStats, str, PathLike]) -> ReferenceStats:
        """Use these real statistics (resolved and cached by :func:`metrics.reference_stats`)."""
        self.reference = reference_stats(reference, self.feature, cache_dir=self._cache_dir)
        self._computed = None
        return self.reference

    def set_dtype(self, dst_type: Union[str, torch.dtype]) -> "FrechetDistance":
        """No-op: FID statistics are always float64."""
        return self

    def update(self, images: Optional[Tensor] = None, real: bool = False, *,  # type: ignore[override]
               features: Optional[Tensor] = None) -> None:
        if (images is None) == (features is None):
            raise ValueError("FrechetDistance.update: pass either images or features")
        if real and self.reference is not None:
            raise ValueError("this FrechetDistance uses precomputed reference statistics; real images cannot be added")
        f = extract(self.feature, images) if features is None else features.detach().to(torch.float64)
        f = f.reshape(f.shape[0], -1).to(device=self.fake_features_sum.device, dtype=torch.float64)
        if f.shape[1] != self.fake_features_sum.numel():
            raise ValueError(f"features of dimension {f.shape[1]}, the metric expects {self.fake_features_sum.numel()}")
        side = "real" if real else "fake"
        setattr(self, f"{side}_features_sum", getattr(self, f"{side}_features_sum") + f.sum(0))
        setattr(self, f"{side}_features_cov_sum", getattr(self, f"{side}_features_cov_sum") + f.T @ f)
        setattr(self, f"{side}_features_num_samples", getattr(self, f"{side}_features_num_samples") + f.shape[0])

    def compute(self) -> Tensor:
        n = int(self.fake_features_num_samples)
        if n < MIN_IMAGES:
            from torchmetrics.utilities import rank_zero_warn

            rank_zero_warn(f"FID needs at least {MIN_IMAGES} generated images, got {n}; returning NaN", UserWarning)
            return torch.tensor(math.nan, dtype=torch.float64)
        mu_f, cov_f = gaussian_from_sums(self.fake_features_sum.double(), self.fake_features_cov_sum.double(), n)
        if self.reference is not None:
            mu_r, cov_r = self.reference.mean.to(mu_f.device), self.reference.cov.to(mu_f.device)
        else:
            m = int(self.real_features_num_samples)
            if m < MIN_IMAGES:
                raise RuntimeError("FrechetDistance has no reference statistics and fewer than 2 real images; "
                                   "pass reference=... or update(real_images, real=True)")
            mu_r, cov_r = gaussian_from_sums(self.real_features_sum.double(), self.real_features_cov_sum.double(), m)
        return frechet_distance(mu_f, cov_f, mu_r, cov_r)
