"""Digit classifiers used as rewards (target-class logit) and as held-out judges.

Two independent architectures, so that a sampler cannot "win" by exploiting one network:

* ``ConvClassifier`` — the reward network. Its target-class logit is unbounded, which makes it a
  stand-in for an aesthetic score; its penultimate layer (64 features) serves as the FID feature
  space for digits.
* ``MLPClassifier`` — the held-out judge: a different architecture, trained with another seed,
  never used for guidance.
* ``DigitFeatures`` — the reward network's 64-d penultimate layer as a feature extractor: the
  "Inception" of FID and diversity for digits (``metrics.build_feature("digits")``).

Both take images in [0, 1] of shape (B, 1, R, R), as every reward in this package does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ntrk_lightning.data.digits import NUM_CLASSES
from ntrk_lightning.fileio import load_safetensors, safetensors_metadata
from rewards.base import Reward

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


# --------------------------------------------------------------------------------------------
# Shipped 16x16 classifiers (trained by ``ntrk fit -c configs/digits_{classifier,judge}_fit.yaml``)
# --------------------------------------------------------------------------------------------

ShippedKind = Literal["reward", "judge"]

#: side of the shipped classifiers' square input images (what their files hold without metadata)
SHIPPED_RESOLUTION = 16

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
    hint = ("Retrain with `ntrk fit -c configs/digits_classifier_fit.yaml` (reward) or "
            "`configs/digits_judge_fit.yaml` (judge), or reinstall the package, which ships the file.")
    meta = safetensors_metadata(path, hint, "classifier weights file")
    arch = arch or meta.get("arch")  # type: ignore[assignment]
    if arch is None:
        raise ValueError(f"{path} has no 'arch' metadata; pass arch='conv' or 'mlp'")
    resolution = int(resolution or meta.get("resolution", SHIPPED_RESOLUTION))
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


class DigitFeatures(nn.Module):
    """64-d digit features for FID and diversity: the penultimate layer of the reward ConvClassifier.

    Use as ``metrics.FrechetDistance(feature=DigitFeatures())`` (or ``feature="digits"``) or with
    torchmetrics' ``FrechetInceptionDistance(feature=DigitFeatures())``. With a custom feature
    module torchmetrics hands the images through unchanged whatever its ``normalize`` flag says, so
    this module accepts both conventions:

    * ``uint8`` images in [0, 255] (torchmetrics' default ``normalize=False`` convention),
    * floating images in [0, 1] (the convention of every reward here).

    Three-channel input is averaged to one channel, and other sizes are resized bilinearly to the
    classifier's resolution. The module stays in eval mode and never needs gradients.
    """

    num_features = ConvClassifier.num_features

    def __init__(self, classifier: Optional[nn.Module] = None, resolution: int = SHIPPED_RESOLUTION) -> None:
        super().__init__()
        if classifier is None:
            classifier = load_shipped_classifier("reward")
        if not hasattr(classifier, "features"):
            raise TypeError("DigitFeatures needs a classifier with a .features() method (ConvClassifier)")
        self.classifier = classifier
        self.resolution = int(resolution)
        self.classifier.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "DigitFeatures":  # always eval: fixed feature space
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        p = next(self.classifier.parameters())
        images = images.to(device=p.device, dtype=p.dtype)
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[1] != 1:
            raise ValueError(f"expected 1 or 3 channels, got shape {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.classifier.features(images)


# --------------------------------------------------------------------------------------------
# Config-friendly rewards on the shipped classifiers (used by configs/digits_*.yaml)
# --------------------------------------------------------------------------------------------

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
