"""Loading open_clip models from local files and preprocessing images for them, shared by the
CLIP-based rewards and the CLIP-score metric (both import it from here, so neither package needs
the other).

Offline: ``pretrained`` must be a local file (or the model comes from a ``local-dir:`` folder);
a download tag or a hub id is refused with a message saying how to get the file. ``model_name``
may also be a path to an open_clip model-config JSON, which is registered first (its file stem
becomes the model name).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntrk_lightning.image_tensors import as_float01

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
