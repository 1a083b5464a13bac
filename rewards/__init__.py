"""Rewards: images in [0, 1] (B, C, H, W) + optional prompts -> (B,), differentiable where the
model is. Every reward reads LOCAL files only and says which file is missing and where to get it.

* :class:`~rewards.base.Reward` — the interface (``name``, ``differentiable``, ``needs_prompts``).
* :class:`~rewards.aesthetic.LAIONAestheticReward` — LAION improved aesthetic predictor (CLIP ViT-L/14 + MLP head).
* :class:`~rewards.clip_score.CLIPScoreReward` — CLIP text-image cosine (open_clip).
* :class:`~rewards.hps.HPSv2Reward` — Human Preference Score v2 (open_clip ViT-H/14).
* :class:`~rewards.pickscore.PickScoreReward` — PickScore (transformers CLIP-H).
* :class:`~rewards.image_reward.ImageReward` — ImageReward (BLIP ViT-L + BERT cross-attention + MLP head).
* :class:`~rewards.compressibility.JPEGCompressibility` / :class:`~rewards.compressibility.JPEGIncompressibility`
  — JPEG size (not differentiable: search samplers only).
* :class:`~rewards.combine.WeightedSum`, :class:`~rewards.combine.ImportedReward` — combinations and
  user rewards by import path.
* :mod:`rewards.digits` — digit classifiers of the shipped digits testbed.

Importing this package is cheap: each class is imported from its module on first access
(open_clip and transformers are only imported by the rewards that use them). Rewards never import
the metrics package: the metrics use rewards (the digits feature network), not the other way round.
"""

from __future__ import annotations

import importlib
from typing import Any

from rewards.base import Reward, is_differentiable

_LAZY = {
    "LAIONAestheticReward": "rewards.aesthetic",
    "AestheticHead": "rewards.aesthetic",
    "load_aesthetic_head": "rewards.aesthetic",
    "CLIPScoreReward": "rewards.clip_score",
    "HPSv2Reward": "rewards.hps",
    "PickScoreReward": "rewards.pickscore",
    "ImageReward": "rewards.image_reward",
    "JPEGCompressibility": "rewards.compressibility",
    "JPEGIncompressibility": "rewards.compressibility",
    "WeightedSum": "rewards.combine",
    "ImportedReward": "rewards.combine",
    "DigitClassifierReward": "rewards.digits",
}

__all__ = ["Reward", "is_differentiable", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
