"""Quality numbers for the digits models: a minimal plain DDIM loop, FID in digit-feature space,
held-out-judge statistics. Used at the end of ``fit``, by the tests and by the retrain check."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ntrk_lightning.data.digits import NUM_CLASSES, digits, split_indices
from ntrk_lightning.denoiser import DiffusionModel


@torch.no_grad()
def ddim_sample(model: DiffusionModel, scheduler: Any, n: int, num_steps: int = 25, eta: float = 1.0,
                seed: int = 0, batch_size: int = 500, device: str | torch.device = "cpu") -> Tensor:
    """Plain ancestral DDIM sampling: ``n`` images in [0, 1], shape (n, *model.sample_shape).

    Batch ``i`` draws its initial noise and step noise from a generator seeded ``seed + i``; the
    scheduler is stepped with ``eta`` (1.0 = DDPM-like stochastic kernel, the one NTRK tilts).
    A reference loop for tests and model cards; the library's samplers live in
    ``ntrk_lightning.sample``.
    """
    import copy

    out = []
    for i, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(num_steps, device=device)
        g = torch.Generator(device=device).manual_seed(int(seed) + i)
        x = torch.randn((b, *model.sample_shape), generator=g, device=device)
        x = x * float(getattr(sched, "init_noise_sigma", 1.0))
        for t in sched.timesteps:
            eps = model.denoiser(x, t.expand(b))
            x = sched.step(eps, t, x, eta=eta, generator=g).prev_sample
        out.append(model.decode(x).clamp(0.0, 1.0))
    return torch.cat(out)


@torch.no_grad()
def core_sample(model: DiffusionModel, scheduler: Any, n: int, num_steps: int = 25, eta: float = 1.0,
                seed: int = 0) -> Tensor:
    """``n`` plain samples in [0, 1] drawn by the library itself: ``ntrk_lightning.sample`` with
    ``Plain(eta)`` (sample i's noise from seed (seed, 0, i), whatever the batching). Works for every
    scheduler the core drives (DDIM and rectified flow)."""
    from ntrk_lightning.api import sample
    from ntrk_lightning.samplers import Plain

    res = sample(model, scheduler, None, Plain(eta=eta), num_steps, (n, *model.sample_shape), seed=seed)
    return res.images.clamp(0.0, 1.0)


def real_images(resolution: int = 16, split: str = "all") -> tuple[Tensor, Tensor]:
    """Real digits as images in [0, 1] with labels; ``split`` in {"all", "train", "test"}."""
    x, y = digits(resolution)
    if split != "all":
        tr, te = split_indices(len(y), 0.2, 0)
        idx = tr if split == "train" else te
        x, y = x[idx], y[idx]
    return (x + 1.0) * 0.5, y


def real_halves(resolution: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two disjoint random halves (899 / 898 images) of all 1797 real digits, in [0, 1]."""
    x, _ = real_images(resolution)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    h = (len(x) + 1) // 2
    return x[perm[:h]], x[perm[h:]]


@torch.no_grad()
def fid(feature: nn.Module, a: Tensor, b: Tensor, batch_size: int = 1000) -> float:
    """FID between image sets ``a`` (treated as fake) and ``b`` (real), both in [0, 1], computed by
    torchmetrics' ``FrechetInceptionDistance`` with ``feature`` as the extractor (float64 states)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    for s in range(0, len(b), batch_size):
        metric.update(b[s : s + batch_size], real=True)
    for s in range(0, len(a), batch_size):
        metric.update(a[s : s + batch_size], real=False)
    return float(metric.compute())


@torch.no_grad()
def judge_stats(judge: nn.Module, images: Tensor, reward_net: Optional[nn.Module] = None) -> dict[str, Any]:
    """Class histogram and confidence of the held-out judge on ``images`` (no labels needed)."""
    p = judge(images).softmax(-1)
    pred = p.argmax(-1)
    hist = torch.bincount(pred, minlength=NUM_CLASSES).float() / len(pred)
    out: dict[str, Any] = {
        "judge_class_fractions": [round(v, 4) for v in hist.tolist()],
        "judge_mean_max_prob": float(p.max(-1).values.mean()),
        "judge_confident_fraction": float((p.max(-1).values > 0.5).float().mean()),
        "judge_class_entropy_bits": float(-(hist.clamp_min(1e-12).log2() * hist).sum()),
    }
    if reward_net is not None:
        out["reward_judge_agreement"] = float((reward_net(images).argmax(-1) == pred).float().mean())
    return out


def evaluate_digits_model(model: DiffusionModel, scheduler: Any, feature: nn.Module, judge: nn.Module,
                          reward_net: Optional[nn.Module] = None, n: int = 1000, num_steps: int = 25,
                          eta: float = 1.0, seed: int = 0,
                          sample_fn: Optional[Callable[..., Tensor]] = None) -> dict[str, Any]:
    """Sample ``n`` digits plainly and compare them with real digits in digit-feature space.

    ``sample_fn(model, scheduler, n, num_steps=, eta=, seed=)`` draws the images in [0, 1]
    (default :func:`ddim_sample`, the loop ``digits16``'s card was measured with; the flow model
    uses :func:`core_sample`).

    FID is measured against real half B (898 images); the noise floor is FID(real half A (899),
    real half B). Comparable set sizes keep the finite-sample bias of the two FIDs alike.
    """
    import time

    res = int(model.sample_shape[-1])
    t0 = time.perf_counter()
    fake = (sample_fn or ddim_sample)(model, scheduler, n, num_steps=num_steps, eta=eta, seed=seed)
    seconds = time.perf_counter() - t0
    half_a, half_b = real_halves(res)
    real_all, _ = real_images(res)
    fid_gen = fid(feature, fake, half_b)
    fid_halves = fid(feature, half_a, half_b)
    out = {
        "fid_samples_vs_real_half": fid_gen,
        "fid_real_half_vs_real_half": fid_halves,
        "fid_ratio": fid_gen / fid_halves,
        "fid_samples_vs_all_real": fid(feature, fake, real_all),
        "n_samples": n, "num_steps": num_steps, "eta": eta, "sample_seed": seed,
        "sampling_seconds": round(seconds, 2),
    }
    out.update(judge_stats(judge, fake, reward_net))
    real_stats = judge_stats(judge, real_all, reward_net)
    out["judge_mean_max_prob_on_real"] = real_stats["judge_mean_max_prob"]
    if reward_net is not None:
        out["reward_judge_agreement_on_real"] = real_stats["reward_judge_agreement"]
    return out
