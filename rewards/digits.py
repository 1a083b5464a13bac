"""Digit classifiers used as rewards (target-class logit) and as held-out judges.

Two independent architectures, so that a sampler cannot "win" by exploiting one network:

* ``ConvClassifier`` — the reward network. Its target-class logit is unbounded, which makes it a
  stand-in for an aesthetic score; its penultimate layer (64 features) serves as the FID feature
  space for digits.
* ``MLPClassifier`` — the held-out judge: a different architecture, trained with another seed,
  never used for guidance.

Both take images in [0, 1] of shape (B, 1, R, R), as every reward in this package does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ntrk_lightning.data.digits import NUM_CLASSES, digits, split_indices
from ntrk_lightning.fileio import atomic_write, atomic_write_text, cache_dir

Arch = Literal["conv", "mlp"]


class ConvClassifier(nn.Module):
    """Three 3x3 convolutions, global average pooling, linear head. Works at any resolution >= 8."""

    num_features = 64  # read by torchmetrics' FID when this module is used as a feature extractor

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, self.num_features, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class MLPClassifier(nn.Module):
    """Fully connected judge on flattened pixels; unlike the conv net it has no translation prior."""

    def __init__(self, resolution: int, hidden: int = 256) -> None:
        super().__init__()
        self.resolution = resolution
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(resolution * resolution, hidden), nn.GELU(),
            nn.Linear(hidden, hidden // 2), nn.GELU(),
            nn.Linear(hidden // 2, NUM_CLASSES),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images * 2.0 - 1.0)


def build_classifier(arch: Arch, resolution: int) -> nn.Module:
    if arch == "conv":
        return ConvClassifier()
    if arch == "mlp":
        return MLPClassifier(resolution)
    raise ValueError(f"unknown classifier arch {arch!r}; expected 'conv' or 'mlp'")


def _augment(x: Tensor, g: torch.Generator, max_shift: int) -> Tensor:
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
    epochs: int = 60,
    batch_size: int = 128,
    lr: float = 2e-3,
    split_seed: int = 0,
) -> tuple[nn.Module, dict]:
    """Train on the digits training split; returns the model (eval mode) and test metrics.

    Deterministic for a given seed on a given machine (CPU, fixed generator, no data-loader workers).
    """
    torch.manual_seed(seed)
    x, y = digits(resolution)
    train_idx, test_idx = split_indices(len(y), seed=split_seed)
    model = build_classifier(arch, resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    max_shift = max(1, resolution // 8)
    xt, yt = x[train_idx], y[train_idx]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=g)
        for start in range(0, len(perm), batch_size):
            b = perm[start : start + batch_size]
            xb = _augment(xt[b], g, max_shift)
            loss = F.cross_entropy(model((xb + 1.0) * 0.5), yt[b], label_smoothing=0.05)
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


def cached_classifier(arch: Arch, resolution: int, seed: int, epochs: int = 60) -> tuple[nn.Module, dict]:
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


class ClassLogitReward(nn.Module):
    """Reward = logit of ``target`` class of a classifier on images in [0, 1]; differentiable."""

    def __init__(self, classifier: nn.Module, target: int) -> None:
        super().__init__()
        if not 0 <= int(target) < NUM_CLASSES:
            raise ValueError(f"target class must be in 0..9, got {target}")
        self.classifier = classifier
        self.target = int(target)

    def forward(self, images: Tensor, prompts: Optional[list[str]] = None) -> Tensor:
        return self.classifier(images)[:, self.target]


class ClassLogProbReward(ClassLogitReward):
    """Bounded variant: log-softmax probability of the target class."""

    def forward(self, images: Tensor, prompts: Optional[list[str]] = None) -> Tensor:
        return self.classifier(images).log_softmax(-1)[:, self.target]


def accuracy_of(classifier: nn.Module, images: Tensor, target: int) -> Tensor:
    """Per-sample 0/1: does ``classifier`` predict ``target`` for each image in [0, 1]?"""
    with torch.no_grad():
        return (classifier(images).argmax(-1) == target).float()


# --------------------------------------------------------------------------------------------
# Shipped 16x16 classifiers (trained by ``ntrk fit -c configs/digits_{classifier,judge}_fit.yaml``)
# --------------------------------------------------------------------------------------------

ShippedKind = Literal["reward", "judge"]

#: file name and architecture of each shipped classifier inside ``ntrk_lightning/weights``
SHIPPED_CLASSIFIERS: dict[str, tuple[str, Arch]] = {
    "reward": ("digits_classifier.safetensors", "conv"),
    "judge": ("digits_judge.safetensors", "mlp"),
}


def shipped_weights_dir() -> Path:
    """The folder ``ntrk_lightning/weights`` that ships inside the package."""
    import ntrk_lightning

    return Path(ntrk_lightning.__file__).resolve().parent / "weights"


def load_classifier_file(path: "str | os.PathLike[str]", arch: Optional[Arch] = None,
                         resolution: Optional[int] = None, device: "str | torch.device" = "cpu") -> nn.Module:
    """Load a classifier saved by the training module (safetensors, any float dtype) in fp32.

    ``arch`` and ``resolution`` default to the values stored in the file's safetensors metadata.
    The model is returned in eval mode with gradients of its parameters switched off (gradients
    with respect to the input images still flow, as a reward needs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found: {path}. Train them with "
            "`ntrk fit -c configs/digits_classifier_fit.yaml` (reward) or "
            "`ntrk fit -c configs/digits_judge_fit.yaml` (judge), which export to ntrk_lightning/weights/.")
    from ntrk_lightning.fileio import load_safetensors, safetensors_metadata

    hint = ("Retrain with `ntrk fit -c configs/digits_classifier_fit.yaml` (reward) or "
            "`configs/digits_judge_fit.yaml` (judge), or reinstall the package, which ships the file.")
    meta = safetensors_metadata(path, hint, "classifier weights file")
    arch = arch or meta.get("arch")  # type: ignore[assignment]
    if arch is None:
        raise ValueError(f"{path} has no 'arch' metadata; pass arch='conv' or 'mlp'")
    resolution = int(resolution or meta.get("resolution", 16))
    model = build_classifier(arch, resolution)
    state = {k: v.float() for k, v in load_safetensors(path, hint, "classifier weights file").items()}
    model.load_state_dict(state)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_shipped_classifier(kind: ShippedKind = "reward", device: "str | torch.device" = "cpu",
                            weights_dir: "str | os.PathLike[str] | None" = None) -> nn.Module:
    """The shipped 16x16 digit classifier: ``"reward"`` (ConvClassifier; its target logit is the
    reward and its ``.features()`` the FID space) or ``"judge"`` (held-out MLPClassifier).

    Offline: reads ``<weights_dir or ntrk_lightning/weights>/digits_{classifier,judge}.safetensors``;
    a missing file raises ``FileNotFoundError`` naming it.
    """
    if kind not in SHIPPED_CLASSIFIERS:
        raise ValueError(f"unknown classifier kind {kind!r}; expected one of {sorted(SHIPPED_CLASSIFIERS)}")
    fname, arch = SHIPPED_CLASSIFIERS[kind]
    root = Path(weights_dir) if weights_dir is not None else shipped_weights_dir()
    return load_classifier_file(root / fname, arch=arch, device=device)


# --------------------------------------------------------------------------------------------
# Config-friendly rewards on the shipped classifiers (used by configs/digits_*.yaml)
# --------------------------------------------------------------------------------------------

from rewards.base import Reward  # noqa: E402  (kept next to its only users)

DigitScore = Literal["logit", "log_prob", "hit"]


class DigitClassifierReward(Reward):
    """A shipped 16x16 digit classifier scoring one ``target`` class.

    Args:
        target: the digit (0-9) the reward asks for.
        classifier: ``"reward"`` (the conv net guidance uses) or ``"judge"`` (the held-out MLP,
            for evaluation only).
        score: ``"logit"`` (unbounded, the default reward: it plays the role an aesthetic score
            plays for images), ``"log_prob"`` (log-softmax of the target, bounded above by 0) or
            ``"hit"`` (1.0 when the classifier's top class is the target: its mean over a set is
            the classifier's target accuracy; not differentiable).
        weights_dir: folder holding ``digits_{classifier,judge}.safetensors`` (default: the
            shipped ``ntrk_lightning/weights``).
    """

    def __init__(self, target: int = 3, classifier: ShippedKind = "reward", score: DigitScore = "logit",
                 weights_dir: Optional[str] = None) -> None:
        super().__init__()
        if not 0 <= int(target) < NUM_CLASSES:
            raise ValueError(f"target class must be in 0..9, got {target}")
        if classifier not in SHIPPED_CLASSIFIERS:
            raise ValueError(f"classifier must be one of {sorted(SHIPPED_CLASSIFIERS)}, got {classifier!r}")
        if score not in ("logit", "log_prob", "hit"):
            raise ValueError(f"score must be 'logit', 'log_prob' or 'hit', got {score!r}")
        root = Path(weights_dir) if weights_dir is not None else shipped_weights_dir()
        path = root / SHIPPED_CLASSIFIERS[classifier][0]
        if not path.is_file():  # refuse early, before any model work
            load_classifier_file(path)
        self.target, self.classifier_kind, self.score_kind = int(target), classifier, score
        self.weights_dir = str(root)
        self.name = f"digit{self.target}_{classifier}_{score}"
        self.differentiable = score != "hit"
        self.net: Optional[nn.Module] = None

    def _load(self) -> None:
        self.net = load_shipped_classifier(self.classifier_kind, weights_dir=self.weights_dir)

    def weight_files(self) -> list[Path]:
        """The file whose content decides the scores (the run fingerprint hashes it)."""
        return [Path(self.weights_dir) / SHIPPED_CLASSIFIERS[self.classifier_kind][0]]

    def score(self, images: Tensor, prompts: Optional[list[str]] = None) -> Tensor:
        logits = self.net(images)
        if self.score_kind == "logit":
            return logits[:, self.target]
        if self.score_kind == "log_prob":
            return logits.log_softmax(-1)[:, self.target]
        return (logits.argmax(-1) == self.target).to(images.dtype)

    def describe(self) -> dict:
        return {**super().describe(), "target": self.target, "classifier": self.classifier_kind,
                "score": self.score_kind}
