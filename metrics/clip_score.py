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

from metrics.images import as_float01

PathLike = Union[str, "os.PathLike[str]"]


def resolve_model_name(model_name: str) -> str:
    """Register a model-config JSON file given as ``model_name`` and return the model's name."""
    import open_clip

    p = Path(model_name)
    if model_name.endswith(".json"):
        if not p.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {p}")
        open_clip.add_model_config(str(p))
        return p.stem
    return model_name


def load_open_clip(model_name: str, pretrained: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                   **create_kwargs: Any) -> tuple[nn.Module, Callable[[Sequence[str]], Tensor]]:
    """(model, tokenizer) of an open_clip model with weights from a LOCAL file, frozen, in eval mode.

    ``model_name``: a built-in open_clip name (``"ViT-L-14-quickgelu"``), a model-config JSON
    path, or ``"local-dir:FOLDER"`` (config and weights from that folder; ``pretrained`` unused).
    """
    import open_clip

    if model_name.startswith("hf-hub:"):
        raise ValueError(f"CLIP model {model_name!r}: hub ids are not used (offline). Download the model on a "
                         "machine with internet and pass `local-dir:FOLDER`, or a model name plus a weights file.")
    name = resolve_model_name(model_name)
    if not name.startswith("local-dir:"):
        if open_clip.get_model_config(name) is None:
            raise ValueError(f"unknown open_clip model {name!r}; pass a built-in name (open_clip.list_models()) "
                             "or the path of a model-config JSON")
        if pretrained is None:
            raise ValueError(f"CLIP model {name!r} needs a local weights file (pretrained=PATH / --clip_weights); "
                             "a randomly initialised CLIP score means nothing")
        path = Path(pretrained)
        if not path.is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            hint = (f" {str(pretrained)!r} looks like a download tag of {name}: nothing is downloaded at run time; "
                    f"on a machine with internet run `open_clip.create_model({name!r}, pretrained={str(pretrained)!r})`"
                    ", then pass the cached weights file (under ~/.cache/huggingface or ~/.cache/clip) by path."
                    if str(pretrained) in tags else "")
            raise FileNotFoundError(f"CLIP weights file not found: {path}.{hint}")
        pretrained = str(path)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device, require_pretrained=True,
                                       weights_only=True, **create_kwargs)
    except RuntimeError as e:
        raise ValueError(f"cannot load open_clip model {name!r} from {pretrained}: {e}") from None
    tokenizer = open_clip.get_tokenizer(name)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def clip_preprocess(images: Tensor, size: Union[int, Sequence[int]], mean: Sequence[float],
                    std: Sequence[float]) -> Tensor:
    """Differentiable CLIP preprocessing of images in [0, 1] (or ``uint8``): shorter side resized to
    ``size`` (bicubic, antialias; longer side ``int(size * long / short)`` as torchvision does),
    centre crop to ``size`` x ``size`` (or ``(h, w)``), normalised with ``mean``/``std``. Grey
    images are repeated to RGB."""
    x = as_float01(images)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"CLIP needs 1 or 3 channels, got shape {tuple(x.shape)}")
    th, tw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    target = max(th, tw)
    h, w = x.shape[-2:]
    if (h, w) != (th, tw):
        if h <= w:
            nh, nw = target, int(target * w / h)
        else:
            nh, nw = int(target * h / w), target
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top = int(round((nh - th) / 2.0))
        left = int(round((nw - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


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
