"""CLIP score with open_clip: per sample ``100 * max(cos(image, text), 0)``, synced across ranks.

torchmetrics' own ``CLIPScore`` is transformers-based, preprocesses on the CPU with PIL (not
differentiable) and takes hub ids; this one uses any open_clip model from a local weights file and
preprocesses on tensors (resize shorter side, bicubic with antialias; centre crop; normalise with
the model's mean/std), so it runs on the accelerator and gradients flow to the images.

Offline: ``pretrained`` must be a local file (or the model comes from a ``local-dir:`` folder);
a download tag or a hub id is refused with a message saying how to get the file. ``model_name``
may also be a path to an open_clip model-config JSON, which is registered first (its file stem
becomes the model name): that is how a custom or tiny model is used from the command line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from ntrk_lightning.image_tensors import as_float01
from ntrk_lightning.open_clip_models import clip_preprocess, load_open_clip, resolve_model_name  # noqa: F401  (public here too)

PathLike = Union[str, "os.PathLike[str]"]


class OpenCLIPScore(Metric):
    """Mean CLIP score ``100 * max(cos, 0)`` of image/prompt pairs with an open_clip model.

    Args:
        model_name: open_clip model name, model-config JSON path or ``local-dir:FOLDER``.
        pretrained: local weights file (safetensors or a plain state dict).
        model, tokenizer: an already built open_clip model and its tokenizer (instead of
            ``model_name``/``pretrained``; e.g. a tiny random model in tests).
        preprocess_cfg: ``{"size", "mean", "std"}`` overriding the model's own preprocessing config.
        force_quick_gelu: for OpenAI weights on a non-quickgelu config.

    ``update(images, prompts)`` with images (B, 3|1, H, W) float in [0, 1] or ``uint8``;
    ``compute()`` = mean over all samples seen on all ranks (float64 sum and count states; NaN
    when empty). ``scores(images, prompts)`` gives the (B,) per-sample scores, differentiable.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False  # the metric's update; ``scores`` itself is differentiable

    def __init__(self, model_name: Optional[str] = None, pretrained: Optional[PathLike] = None, *,
                 model: Optional[nn.Module] = None, tokenizer: Optional[Callable[[Sequence[str]], Tensor]] = None,
                 preprocess_cfg: Optional[dict[str, Any]] = None, force_quick_gelu: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if model is None:
            if model_name is None:
                raise ValueError("OpenCLIPScore needs model_name (+ pretrained weights file) or model= and tokenizer=")
            extra = {"force_quick_gelu": True} if force_quick_gelu else {}
            model, tokenizer = load_open_clip(model_name, pretrained, **extra)
        elif tokenizer is None:
            import open_clip

            if model_name is None:
                raise ValueError("OpenCLIPScore(model=...) needs tokenizer= (or model_name to look it up)")
            tokenizer = open_clip.get_tokenizer(resolve_model_name(model_name))
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        import open_clip

        cfg = dict(open_clip.get_model_preprocess_cfg(model))
        cfg.update(preprocess_cfg or {})
        for k in ("size", "mean", "std"):
            if k not in cfg:
                raise ValueError(f"open_clip model has no preprocessing {k!r}; pass preprocess_cfg")
        self.image_size = cfg["size"]
        self.image_mean = tuple(float(v) for v in cfg["mean"])
        self.image_std = tuple(float(v) for v in cfg["std"])
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> "OpenCLIPScore":  # frozen model
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> the model's input (differentiable)."""
        p = next(self.model.parameters())
        x = clip_preprocess(images.to(p.device), self.image_size, self.image_mean, self.image_std)
        return x.to(p.dtype)

    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B,) float32 scores ``100 * max(cos(image_i, prompt_i), 0)``; gradients flow to ``images``."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, one per image")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        x = self.preprocess(images)
        tokens = self.tokenizer(list(prompts)).to(x.device)
        img = self.model.encode_image(x, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        cos = (img.float() * txt.float()).sum(-1)
        return 100.0 * cos.clamp_min(0.0)

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:  # type: ignore[override]
        s = self.scores(images, prompts).detach().to(torch.float64)
        self.score_sum = self.score_sum.to(torch.float64) + s.sum().to(self.score_sum.device)
        self.count = self.count + s.numel()

    def compute(self) -> Tensor:
        n = int(self.count)
        if n == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.score_sum.to(torch.float64) / n
