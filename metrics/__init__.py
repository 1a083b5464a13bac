"""torchmetrics Metrics over generated sets, synchronised across processes.

* :class:`RewardStatistics` — mean, std, quantiles, count of any per-sample reward (exact under DDP).
* :class:`FrechetDistance` — FID against cached real statistics (:class:`ReferenceStats`,
  :func:`reference_stats`) under InceptionV3 (local weights only), the digits features or any
  extractor (:func:`build_feature`).
* :class:`OpenCLIPScore` — ``100 * max(cos, 0)`` with any open_clip model from local weights.
* :class:`Diversity` — mean pairwise feature distance, overall and per prompt.
* :class:`SampleCosts` — count and sums of per-sample NFE, reward gradients, seconds, NaN fallbacks.

Images are ``uint8`` (B, C, H, W) in [0, 255] or float in [0, 1] everywhere; feature extractors
receive float in [0, 1]. Nothing here downloads anything.
"""

from metrics.clip_score import OpenCLIPScore, clip_preprocess, load_open_clip
from metrics.diversity import Diversity, mean_pairwise_distance
from metrics.features import (INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, InceptionFeatures, build_feature,
                              default_inception_weights, feature_identity, feature_name, inception_weights_path)
from metrics.fid import FrechetDistance, frechet_distance
from metrics.images import ImageFolderError, as_float01, list_images, read_image, to_uint8
from metrics.reference import ReferenceStats, reference_stats
from metrics.reward_stats import RewardStatistics
from metrics.sample_costs import COST_FIELDS, SampleCosts

__all__ = [
    "RewardStatistics", "SampleCosts", "COST_FIELDS",
    "FrechetDistance", "frechet_distance", "ReferenceStats", "reference_stats",
    "build_feature", "feature_name", "feature_identity", "InceptionFeatures", "inception_weights_path",
    "default_inception_weights", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL",
    "OpenCLIPScore", "load_open_clip", "clip_preprocess",
    "Diversity", "mean_pairwise_distance",
    "ImageFolderError", "list_images", "read_image", "as_float01", "to_uint8",
]
