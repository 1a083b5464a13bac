"""FID of generated images against precomputed real statistics (torchmetrics underneath).

:class:`FrechetDistance` subclasses torchmetrics' ``FrechetInceptionDistance``: its fake-feature
states (float64 sums and a count, reduced by summation) make the DDP result exact for any world
size and any shard sizes. The real side comes from a :class:`~metrics.reference.ReferenceStats`
held outside the metric states: it is computed once and cached, never summed across ranks, and not
cleared by ``reset()``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from metrics.features import build_feature, extract, feature_identity, feature_name
from metrics.reference import ReferenceStats, reference_stats

PathLike = Union[str, "os.PathLike[str]"]

_FLOAT64_STATES = ("real_features_sum", "real_features_cov_sum", "fake_features_sum", "fake_features_cov_sum")


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)) in float64, clamped at 0 (rounding
    can make the distance of a set to itself a tiny negative number)."""
    mu1, mu2, cov1, cov2 = (t.to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    diff = (mu1 - mu2).square().sum()
    # eigenvalues of cov1 @ cov2 are those of cov1^(1/2) cov2 cov1^(1/2) (real, >= 0 up to rounding)
    root_trace = torch.linalg.eigvals(cov1 @ cov2).sqrt().real.sum()
    return (diff + cov1.trace() + cov2.trace() - 2.0 * root_trace).clamp_min(0.0)


class FrechetDistance(FrechetInceptionDistance):
    """FID of generated images under any feature extractor, against cached real statistics.

    Args:
        feature: ``"inception"`` (standard FID; local weights only), ``"digits"``, an import path
            ``"package.module:Class"`` or an ``nn.Module`` (see :func:`metrics.build_feature`).
        reference: real statistics: a :class:`ReferenceStats`, ``"digits[:R]"``, a folder of
            images or a statistics file (see :func:`metrics.reference_stats`; computed once and
            cached). ``None``: feed real images with ``update(images, real=True)`` instead
            (torchmetrics' behaviour; those are summed across ranks like the fake ones).
        weights_path: local InceptionV3 weights for ``feature="inception"``.
        cache_dir: cache folder for reference statistics.

    ``update(images)`` takes generated images, ``uint8`` (B, C, H, W) in [0, 255] or float in
    [0, 1] (the extractor always receives float in [0, 1]); ``update(features=F)`` adds
    precomputed (B, D) features of the same extractor (to share one forward pass with
    :class:`~metrics.Diversity`). ``compute()`` is a 0-dim float64 tensor; NaN (with a warning)
    when fewer than 2 generated images were seen. States stay float64 even when a precision
    plugin casts the module (bf16 breaks the matrix square root).
    """

    def __init__(self, feature: Union[nn.Module, str] = "inception",
                 reference: Union[ReferenceStats, str, PathLike, None] = None,
                 weights_path: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None,
                 **kwargs: Any) -> None:
        module = build_feature(feature, weights_path=weights_path)
        kwargs.setdefault("reset_real_features", True)
        super().__init__(feature=module, normalize=True, **kwargs)
        self.feature_name = feature_name(module)
        self.feature_identity = feature_identity(module)
        self._cache_dir = cache_dir
        self.reference: Optional[ReferenceStats] = None
        if reference is not None:
            self.set_reference(reference)

    @property
    def feature(self) -> nn.Module:
        return self.inception

    def set_reference(self, reference: Union[ReferenceStats, str, PathLike]) -> ReferenceStats:
        """Use these real statistics (resolved and cached by :func:`metrics.reference_stats`)."""
        stats = reference_stats(reference, self.inception, cache_dir=self._cache_dir)
        self.reference = stats
        self._computed = None
        return stats

    def _keep_float64(self) -> None:
        for name in _FLOAT64_STATES:
            t = getattr(self, name)
            if t.dtype != torch.float64:
                setattr(self, name, t.to(torch.float64))

    def set_dtype(self, dst_type: Union[str, torch.dtype]) -> "FrechetDistance":
        """No-op: FID statistics are always float64."""
        return self

    def update(self, images: Optional[Tensor] = None, real: bool = False, *,  # type: ignore[override]
               features: Optional[Tensor] = None) -> None:
        if (images is None) == (features is None):
            raise ValueError("FrechetDistance.update: pass either images or features")
        if real and self.reference is not None:
            raise ValueError("this FrechetDistance uses precomputed reference statistics; real images cannot be added")
        self._keep_float64()
        if features is None:
            f = extract(self.inception, images)
        else:
            f = features.detach().to(torch.float64)
            f = f.reshape(f.shape[0], -1)
        f = f.to(self.fake_features_sum.device)
        if f.shape[1] != self.fake_features_sum.numel():
            raise ValueError(f"features of dimension {f.shape[1]}, the metric expects {self.fake_features_sum.numel()}")
        prefix = "real" if real else "fake"
        setattr(self, f"{prefix}_features_sum", getattr(self, f"{prefix}_features_sum") + f.sum(0))
        setattr(self, f"{prefix}_features_cov_sum", getattr(self, f"{prefix}_features_cov_sum") + f.T @ f)
        setattr(self, f"{prefix}_features_num_samples", getattr(self, f"{prefix}_features_num_samples") + f.shape[0])

    def compute(self) -> Tensor:
        self._keep_float64()
        n = int(self.fake_features_num_samples)
        if n < 2:
            from torchmetrics.utilities import rank_zero_warn

            rank_zero_warn(f"FID needs at least 2 generated images, got {n}; returning NaN", UserWarning)
            return torch.tensor(math.nan, dtype=torch.float64)
        mu_f = self.fake_features_sum / n
        cov_f = (self.fake_features_cov_sum - n * torch.outer(mu_f, mu_f)) / (n - 1)
        if self.reference is not None:
            mu_r = self.reference.mean.to(mu_f.device)
            cov_r = self.reference.cov.to(mu_f.device)
        else:
            m = int(self.real_features_num_samples)
            if m < 2:
                raise RuntimeError("FrechetDistance has no reference statistics and fewer than 2 real images; "
                                   "pass reference=... or update(real_images, real=True)")
            mu_r = self.real_features_sum / m
            cov_r = (self.real_features_cov_sum - m * torch.outer(mu_r, mu_r)) / (m - 1)
        return frechet_distance(mu_f, cov_f, mu_r, cov_r)
