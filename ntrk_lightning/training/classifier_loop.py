"""A plain PyTorch loop for the small digit classifiers the tests and benchmarks fit on the fly
(8x8 reward net and judge, memoised on disk under ``$NTRK_CACHE``), and the recipe it shares with
the Lightning module that trains the shipped ones (:mod:`ntrk_lightning.training.classifier`).
No Lightning import here: the test fixtures use it."""

from __future__ import annotations

import copy
import hashlib
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ntrk_lightning.data.digits import digits, split_indices
from ntrk_lightning.fileio import atomic_write, atomic_write_text, cache_dir
from rewards.digits import Arch, build_classifier

# the recipe both trainers share
DEFAULT_EPOCHS = 60
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_LABEL_SMOOTHING = 0.05


def default_max_shift(resolution: int) -> int:
    """Largest random translation (pixels) of the augmentation: an eighth of the side, at least 1."""
    return max(1, resolution // 8)


def augment_shifts(x: Tensor, g: torch.Generator, max_shift: int) -> Tensor:
    """Random integer translations (zero = background padding) so the judges see slightly
    off-centre digits as digits; generated samples are rarely pixel-aligned like the data."""
    if max_shift == 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    shifts = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=g)
    r = x.shape[-1]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = pad[i, :, dy : dy + r, dx : dx + r]
    return out


def train_classifier(
    arch: Arch,
    resolution: int,
    seed: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    split_seed: int = 0,
) -> tuple[nn.Module, dict]:
    """Train on the digits training split; returns the model (eval mode) and test metrics.

    Deterministic for a given seed on a given machine (CPU, fixed generator, no data-loader workers).
    """
    torch.manual_seed(seed)
    x, y = digits(resolution)
    train_idx, test_idx = split_indices(len(y), seed=split_seed)
    model = build_classifier(arch, resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=DEFAULT_WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    max_shift = default_max_shift(resolution)
    xt, yt = x[train_idx], y[train_idx]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=g)
        for start in range(0, len(perm), batch_size):
            b = perm[start : start + batch_size]
            xb = augment_shifts(xt[b], g, max_shift)
            loss = F.cross_entropy(model((xb + 1.0) * 0.5), yt[b], label_smoothing=DEFAULT_LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model((x[test_idx] + 1.0) * 0.5).argmax(1) == y[test_idx]).float().mean().item()
    return model, {"test_accuracy": acc, "n_test": int(len(test_idx)), "arch": arch,
                   "resolution": resolution, "seed": seed, "epochs": epochs}


_MEMO: dict[str, tuple[nn.Module, dict]] = {}


def cached_classifier(arch: Arch, resolution: int, seed: int, epochs: int = DEFAULT_EPOCHS) -> tuple[nn.Module, dict]:
    """``train_classifier`` memoised in memory and on disk (safetensors + JSON metrics)."""
    from safetensors.torch import load_file, save_file

    key_src = json.dumps({"arch": arch, "res": resolution, "seed": seed, "epochs": epochs, "v": 1})
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    if key in _MEMO:
        m, info = _MEMO[key]
        return copy.deepcopy(m), dict(info)
    path = cache_dir() / f"classifier-{arch}-{resolution}-{seed}-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    model = build_classifier(arch, resolution)
    if path.exists() and meta_path.exists():
        model.load_state_dict(load_file(str(path)))
        model.eval()
        info = json.loads(meta_path.read_text())
    else:
        model, info = train_classifier(arch, resolution, seed, epochs=epochs)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, tmp))
        atomic_write_text(meta_path, json.dumps(info))
    for p in model.parameters():
        p.requires_grad_(False)
    _MEMO[key] = (model, info)
    return copy.deepcopy(model), dict(info)
