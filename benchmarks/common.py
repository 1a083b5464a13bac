"""Shared pieces of the benchmarks: the two shipped testbeds, quality measures, result files.

Testbeds (both toward the digit 3, both offline):

* ``gmm``    — the analytic 8x8 digits mixture (exact eps, exact log p0); guidance reward = target
  logit of an 8x8 conv classifier; held-out judge = an 8x8 MLP of another seed; quality = MMD
  between the samples and 2000 exact draws from the mixture's class-3 components, in pixel space
  (lower is better); also reported: the exact mean log p0. (log p0 itself is no quality score:
  over-smoothed samples score *higher* than exact draws — 25-step DDIM samples do — and every
  extra step of any sampler lowers it toward the data's own value.)
* ``digits`` — the shipped digits16 UNet; guidance reward = target logit of the shipped conv
  classifier; held-out judge = the shipped MLP; quality = MMD between sample features and the
  features of the 183 real 3s in the digit feature space (lower is better).

MMD here is 1000 x the unbiased squared maximum mean discrepancy with a Gaussian kernel whose
bandwidth is fixed per testbed (the median pairwise distance within the reference set). It is
used instead of FID because it is unbiased at the small sample sizes the sweep can afford, and
instead of KID's cubic kernel because the bounded kernel keeps the estimate stable at 24-48
samples (measured here: the cubic-kernel KID could not order plain sampling and strong guidance).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ntrk_lightning.fileio import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 3


@dataclass
class Testbed:
    name: str
    model: Any                      # ntrk_lightning.DiffusionModel
    scheduler: Any
    reward: Callable[[Tensor], Tensor]
    judge: torch.nn.Module          # held-out classifier (logits)
    quality_name: str
    higher_quality_is_better: bool
    quality: Callable[[Tensor, Tensor], float]  # (samples, images) -> number
    shape: tuple[int, ...]
    quality_tolerance: float = 0.0  # how much worse than plain sampling a tuned setting may be
    gradient_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)  # NTRK gamma / DPS scale at S = 25
    extra: dict = field(default_factory=dict)
    # the feature space of the quality measures (MMD and FID): features(samples, images) and the
    # features of the reference set (the target class's real or exact draws)
    features: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    reference_features: Optional[Tensor] = None


def gmm_testbed() -> Testbed:
    from ntrk_lightning.backbones.gmm import load_digits_gmm
    from ntrk_lightning.training.classifier_loop import cached_classifier
    from rewards.digits import ClassLogitReward

    model, gmm, sch = load_digits_gmm()
    clf, _ = cached_classifier("conv", 8, 0)
    judge, _ = cached_classifier("mlp", 8, 1)
    g = torch.Generator().manual_seed(0)
    draws, labels = gmm.sample_data(20000, g)
    real = draws[labels == TARGET][:2000].flatten(1).double()
    bandwidth = median_distance(real)

    def quality(samples: Tensor, images: Tensor) -> float:
        return mmd(samples.flatten(1).double(), real, bandwidth)

    def log_p0(samples: Tensor, images: Tensor) -> dict[str, float]:
        return {"log_p0": float(gmm.log_prob(samples).mean())}

    return Testbed("gmm", model, sch, ClassLogitReward(clf, TARGET), judge, "MMD vs exact 3s", False,
                   quality, (1, 8, 8), features=lambda samples, images: samples.flatten(1).double(),
                   reference_features=real, extra={"gmm": gmm, "metrics": log_p0,
                                              "log_p0_of_exact_3s": float(gmm.log_prob(draws[labels == TARGET][:2000]).mean())})


def digits_testbed(flow: bool = False) -> Testbed:
    """The shipped digits16 DDPM UNet, or with ``flow=True`` the shipped rectified-flow UNet
    ``digits_flow`` (same size, same data); reward, judge and feature space are shared."""
    from ntrk_lightning.backbones.digits_unet import load_digits_unet, make_scheduler
    from ntrk_lightning.data.digits import real_images
    from rewards.digits import ClassLogitReward, DigitFeatures, load_shipped_classifier

    if flow:
        from ntrk_lightning.backbones import digits_flow

        model, scheduler = digits_flow.load_digits_flow(), digits_flow.make_scheduler()
    else:
        model, scheduler = load_digits_unet(), make_scheduler()
    reward_net = load_shipped_classifier("reward")
    judge = load_shipped_classifier("judge")
    feat = DigitFeatures(reward_net)
    x, y = real_images(16)
    with torch.no_grad():
        real_f = feat(x[y == TARGET]).double()
    bandwidth = median_distance(real_f)

    def features(samples: Tensor, images: Tensor) -> Tensor:
        with torch.no_grad():
            return feat(images.clamp(0, 1)).double()

    def quality(samples: Tensor, images: Tensor) -> float:
        return mmd(features(samples, images), real_f, bandwidth)

    return Testbed("digits_flow" if flow else "digits", model, scheduler, ClassLogitReward(reward_net, TARGET),
                   judge, "MMD vs real 3s", False, quality, (1, 16, 16), quality_tolerance=0.0,
                   gradient_grid=(0.05, 0.1, 0.2), features=features, reference_features=real_f)


def median_distance(x: Tensor) -> float:
    d = torch.cdist(x, x)
    return float(d[d > 0].median())


def mmd(f: Tensor, g: Tensor, bandwidth: float) -> float:
    """1000 x the unbiased squared MMD between feature sets f and g, Gaussian kernel."""
    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b) ** 2 / (2.0 * bandwidth ** 2))

    m, n = f.shape[0], g.shape[0]
    kff, kgg = k(f, f), k(g, g)
    sff = (kff.sum() - kff.diagonal().sum()) / (m * (m - 1))
    sgg = (kgg.sum() - kgg.diagonal().sum()) / (n * (n - 1))
    return 1000.0 * float(sff + sgg - 2.0 * k(f, g).mean())


def evaluate(tb: Testbed, spec: Any, num_steps: int, seeds: list[int], chunk: Optional[int] = None) -> dict[str, Any]:
    """Run one sampler configuration on ``seeds`` and measure it. ``chunk``: seeds per sampling call
    (bounds memory for many-trajectory samplers; results do not depend on it, every sample has its
    own noise streams). Adds ``fid`` when the testbed has a feature space."""
    import ntrk_lightning as ntrk

    step = chunk or len(seeds)
    parts = [ntrk.sample(tb.model, tb.scheduler, tb.reward, spec, num_steps, seed=seeds[i:i + step])
             for i in range(0, len(seeds), step)]
    samples = torch.cat([p.samples for p in parts])
    images = torch.cat([p.images for p in parts]).clamp(0, 1)
    with torch.no_grad():
        logits = tb.judge(images)
    judge_logit = logits[:, TARGET].double()
    n = len(seeds)
    r = torch.cat([p.rewards for p in parts]).double()
    seconds = sum(p.seconds for p in parts)
    out = {
        "reward": float(r.mean()), "reward_se": float(r.std() / math.sqrt(n)),
        "judge_logit": float(judge_logit.mean()), "judge_logit_se": float(judge_logit.std() / math.sqrt(n)),
        "judge_accuracy": float((logits.argmax(1) == TARGET).double().mean()),
        "quality": tb.quality(samples, images),
        "nfe": sum(float(p.nfe) * p.samples.shape[0] for p in parts) / n,
        "grad_evals": sum(float(p.grad_evals) * p.samples.shape[0] for p in parts) / n,
        "seconds": seconds, "seconds_per_sample": seconds / n,
        "nan_fallbacks": int(sum(int(p.nan_fallbacks) for p in parts)), "n": n,
        **(tb.extra["metrics"](samples, images) if "metrics" in tb.extra else {}),
    }
    if tb.features is not None and tb.reference_features is not None:
        from metrics import frechet_distance

        f, g = tb.features(samples, images).double(), tb.reference_features.double()
        out["fid"] = float(frechet_distance(f.mean(0), torch.cov(f.T), g.mean(0), torch.cov(g.T)))
    return out


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def machine_line(info: Optional[dict] = None) -> str:
    info = info or machine()
    return (f"{info.get('cpu', info['platform'])}, {info['cpus']} cores, {info['threads']} torch threads, "
            f"torch {info['torch']}, device {info['device']}")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def median_seconds(fn: Callable[[], Any], reps: int = 30, warmup: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v.is_integer() and abs(v) < 1e7:
            return str(int(v))
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
