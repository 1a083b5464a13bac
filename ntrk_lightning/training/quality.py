"""Quality numbers for the digits models: plain samples drawn by the library's own sampler, FID in
digit-feature space (the metrics package's feature path and distance), held-out-judge statistics.
Used at the end of ``fit``, by the tests and by the retrain check."""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from metrics import ReferenceStats, frechet_distance
from metrics.features import extract, feature_name
from ntrk_lightning.api import sample
from ntrk_lightning.data.digits import NUM_CLASSES, real_halves, real_images
from ntrk_lightning.denoiser import DiffusionModel
from ntrk_lightning.samplers import Plain

#: images per forward pass of the feature network
FEATURE_BATCH = 1000
#: a judge's top-class probability above this counts as a confident call
CONFIDENT_PROB = 0.5

__all__ = ["core_sample", "evaluate_digits_model", "feature_stats", "fid", "judge_stats", "real_halves",
           "real_images"]


@torch.no_grad()
def core_sample(model: DiffusionModel, scheduler: Any, n: int, num_steps: int = 25, eta: float = 1.0,
                seed: int = 0) -> Tensor:
    """``n`` plain samples in [0, 1] drawn by the library itself: ``ntrk_lightning.sample`` with
    ``Plain(eta)`` (sample i's noise from seed (seed, 0, i), whatever the batching). Works for every
    scheduler the core drives (DDIM and rectified flow)."""
    res = sample(model, scheduler, None, Plain(eta=eta), num_steps, (n, *model.sample_shape), seed=seed)
    return res.images.clamp(0.0, 1.0)


def feature_stats(feature: nn.Module, images: Tensor, batch_size: int = FEATURE_BATCH) -> ReferenceStats:
    """Feature mean and covariance of ``images`` in [0, 1], through the metrics' feature path."""
    f = torch.cat([extract(feature, images[s : s + batch_size]).cpu() for s in range(0, len(images), batch_size)])
    return ReferenceStats.from_features(f, feature_name(feature))


def fid(feature: nn.Module, a: Union[Tensor, ReferenceStats], b: Union[Tensor, ReferenceStats]) -> float:
    """FID between image sets (or their :func:`feature_stats`) ``a`` and ``b`` under ``feature``:
    :func:`metrics.frechet_distance` of their feature statistics (float64)."""
    sa, sb = (x if isinstance(x, ReferenceStats) else feature_stats(feature, x) for x in (a, b))
    return float(frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov))


@torch.no_grad()
def judge_stats(judge: nn.Module, images: Tensor, reward_net: Optional[nn.Module] = None) -> dict[str, Any]:
    """Class histogram and confidence of the held-out judge on ``images`` (no labels needed)."""
    p = judge(images).softmax(-1)
    pred = p.argmax(-1)
    hist = torch.bincount(pred, minlength=NUM_CLASSES).float() / len(pred)
    out: dict[str, Any] = {
        "judge_class_fractions": [round(v, 4) for v in hist.tolist()],
        "judge_mean_max_prob": float(p.max(-1).values.mean()),
        "judge_confident_fraction": float((p.max(-1).values > CONFIDENT_PROB).float().mean()),
        "judge_class_entropy_bits": float(-(hist.clamp_min(1e-12).log2() * hist).sum()),
    }
    if reward_net is not None:
        out["reward_judge_agreement"] = float((reward_net(images).argmax(-1) == pred).float().mean())
    return out


def evaluate_digits_model(model: DiffusionModel, scheduler: Any, feature: nn.Module, judge: nn.Module,
                          reward_net: Optional[nn.Module] = None, n: int = 1000, num_steps: int = 25,
                          eta: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Sample ``n`` digits plainly (:func:`core_sample`) and compare them with real digits in
    digit-feature space.

    FID is measured against real half B (898 images); the noise floor is FID(real half A (899),
    real half B). Comparable set sizes keep the finite-sample bias of the two FIDs alike.
    """
    res = int(model.sample_shape[-1])
    t0 = time.perf_counter()
    fake = core_sample(model, scheduler, n, num_steps=num_steps, eta=eta, seed=seed)
    seconds = time.perf_counter() - t0
    half_a, half_b = real_halves(res)
    real_all, _ = real_images(res)
    fake_stats, half_b_stats = feature_stats(feature, fake), feature_stats(feature, half_b)
    fid_gen = fid(feature, fake_stats, half_b_stats)
    fid_halves = fid(feature, half_a, half_b_stats)
    out = {
        "fid_samples_vs_real_half": fid_gen,
        "fid_real_half_vs_real_half": fid_halves,
        "fid_ratio": fid_gen / fid_halves,
        "fid_samples_vs_all_real": fid(feature, fake_stats, real_all),
        "n_samples": n, "num_steps": num_steps, "eta": eta, "sample_seed": seed,
        "sampler": f"ntrk_lightning.sample, Plain(eta={eta}), seed={seed}",
        "sampling_seconds": round(seconds, 2),
    }
    out.update(judge_stats(judge, fake, reward_net))
    real_stats = judge_stats(judge, real_all, reward_net)
    out["judge_mean_max_prob_on_real"] = real_stats["judge_mean_max_prob"]
    if reward_net is not None:
        out["reward_judge_agreement_on_real"] = real_stats["reward_judge_agreement"]
    return out
