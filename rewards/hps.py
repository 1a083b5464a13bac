"""Human Preference Score v2 (Wu et al., 2023) as a differentiable reward.

HPSv2 is an open_clip ViT-H/14 fine-tuned on human preferences; the score of an (image, prompt)
pair is the cosine of their embeddings (values around 0.2-0.3). The released checkpoints,
``HPS_v2_compressed.pt`` (v2.0) and ``HPS_v2.1_compressed.pt`` (v2.1) in the Hugging Face repo
``xswu/HPSv2``, are torch files holding the full model's weights under ``"state_dict"``; they load
with ``weights_only=True`` into a plain open_clip ``ViT-H-14`` (no base CLIP weights are needed).

Preprocessing follows HPSv2's evaluation transform, on tensors: the *longer* side resized to 224
(bicubic, antialias), padded to a square with black, OpenAI mean/std (for the square images
diffusion models make this is a plain resize). ``resize_mode="crop"`` gives open_clip's usual
shorter-side resize + centre crop instead.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ntrk_lightning.image_tensors import as_float01
from rewards.clip_score import DTypeName, OpenCLIPReward

HPS_HINT = ("Get the HPSv2 checkpoint on a machine with internet: `hf download xswu/HPSv2 HPS_v2.1_compressed.pt "
            "--local-dir DIR` (v2.0: HPS_v2_compressed.pt; older huggingface_hub: `huggingface-cli download ...`), "
            "see https://github.com/tgxs002/HPSv2, then pass DIR/HPS_v2.1_compressed.pt.")


def resize_longest_and_pad(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                           fill: float = 0.0) -> Tensor:
    """Differentiable HPSv2 evaluation preprocessing of images in [0, 1]: longer side to ``size``
    (bicubic, antialias), centred padding with ``fill`` to ``size`` x ``size``, normalisation."""
    x = as_float01(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = (size, max(1, round(w * scale))) if h >= w else (max(1, round(h * scale)), size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=float(fill))
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class HPSv2Reward(OpenCLIPReward):
    """HPSv2 score ``scale * cos(image, prompt)`` under the HPS-tuned open_clip ViT-H/14.

    Args:
        checkpoint: local ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt`` (or a safetensors
            conversion of its ``state_dict``).
        model_name: open_clip architecture (``ViT-H-14``), or a model-config JSON path.
        scale: multiplier of the cosine (1 gives the published HPS values).
        resize_mode: ``"pad"`` (HPSv2's own evaluation transform) or ``"crop"``.
        dtype: compute precision (``auto``: float16 autocast on CUDA, float32 elsewhere).
    """

    name = "hpsv2"
    differentiable = True
    needs_prompts = True
    _what = "HPSv2 checkpoint"
    _where = HPS_HINT

    def __init__(self, checkpoint: str, model_name: str = "ViT-H-14", scale: float = 1.0,
                 resize_mode: Literal["pad", "crop"] = "pad", dtype: DTypeName = "auto") -> None:
        if resize_mode not in ("pad", "crop"):
            raise ValueError(f"resize_mode must be 'pad' or 'crop', got {resize_mode!r}")
        super().__init__(model_name, checkpoint, dtype)
        self.scale = float(scale)
        self.resize_mode = resize_mode

    def preprocess(self, images: Tensor) -> Tensor:
        if self.resize_mode == "crop":
            return super().preprocess(images)
        size = self.image_size if isinstance(self.image_size, int) else max(self.image_size)
        return resize_longest_and_pad(images, int(size), self.image_mean, self.image_std)

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        img = self.encode_images(images)
        txt = self.encode_prompts(list(prompts)).to(img.device)
        return self.scale * (img * txt).sum(-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": self.weights, "scale": self.scale, "resize_mode": self.resize_mode}
