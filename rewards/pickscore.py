"""PickScore (Kirstain et al., 2023, Pick-a-Pic) as a differentiable reward.

PickScore is a transformers ``CLIPModel`` (CLIP-H) fine-tuned on human preferences, published as
the Hugging Face repo ``yuvalkirstain/PickScore_v1``; its processor (tokenizer and image
preprocessing) is that of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. The score of an (image,
prompt) pair is ``logit_scale.exp() * cos(image embedding, prompt embedding)`` (about 18-23).

Both come from LOCAL folders (``local_files_only=True``, safetensors preferred, never remote
code). The image preprocessing of the processor (shorter side resized with bicubic antialias,
centre crop, CLIP mean/std, read from its ``preprocessor_config.json``) runs on tensors, so the
gradient reaches the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import Reward
from rewards.clip_score import (DTypeName, check_dtype_name, first_param, image_features, precision_context,
                                short_error, upcast)

MODEL_HINT = ("Get PickScore on a machine with internet: `hf download yuvalkirstain/PickScore_v1 --local-dir DIR` "
              "(older huggingface_hub: `huggingface-cli download ...`), then pass DIR as model_dir.")
PROCESSOR_HINT = ("Get the CLIP-H processor files on a machine with internet: `hf download "
                  "laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json tokenizer.json tokenizer_config.json "
                  "special_tokens_map.json vocab.json merges.txt --local-dir DIR`, then pass DIR as processor_dir.")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"PickScore model folder not found: {model_dir}. {MODEL_HINT}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"PickScore model folder {model_dir} has no config.json. {MODEL_HINT}")
    if not any((model_dir / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"PickScore model folder {model_dir} has no weights ({' / '.join(_WEIGHT_FILES)}). "
                                f"{MODEL_HINT}")


def _check_processor_dir(processor_dir: Path) -> None:
    if not processor_dir.is_dir():
        raise FileNotFoundError(f"CLIP processor folder not found: {processor_dir}. {PROCESSOR_HINT}")
    cfg = processor_dir / "preprocessor_config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"CLIP processor file not found: {cfg}. {PROCESSOR_HINT}")
    if not any(all((processor_dir / f).is_file() for f in group) for group in _TOKENIZER_FILES):
        raise FileNotFoundError(f"CLIP processor folder {processor_dir} has no tokenizer (tokenizer.json, or "
                                f"vocab.json + merges.txt). {PROCESSOR_HINT}")


def read_image_processor_config(path: Path) -> dict[str, Any]:
    """Size, crop, mean and std of a CLIP ``preprocessor_config.json`` (only bicubic resizing and
    centre cropping are supported: what CLIP processors use)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"CLIP processor config {path} is not valid JSON: {short_error(e, 200)}. {PROCESSOR_HINT}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"CLIP processor config {path} is not a JSON object. {PROCESSOR_HINT}")
    size = cfg.get("size", 224)
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height"))
    crop = cfg.get("crop_size", size)
    if isinstance(crop, dict):
        crop = (crop.get("height"), crop.get("width"))
    else:
        crop = (crop, crop)
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if size is None or None in crop or mean is None or std is None:
        raise ValueError(f"CLIP processor config {path} lacks size / crop_size / image_mean / image_std. {PROCESSOR_HINT}")
    if cfg.get("resample", 3) != 3:
        raise ValueError(f"CLIP processor config {path}: resample={cfg.get('resample')} is not bicubic (3); "
                         "only CLIP's bicubic preprocessing is implemented on tensors")
    return {"size": int(size), "crop": (int(crop[0]), int(crop[1])), "center_crop": bool(cfg.get("do_center_crop", True)),
            "mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}


class PickScoreReward(Reward):
    """PickScore: ``logit_scale.exp() * cos(image, prompt)`` with a transformers CLIP model.

    Args:
        model_dir: local folder of ``yuvalkirstain/PickScore_v1`` (``config.json`` + weights).
        processor_dir: local folder with the CLIP-H processor files (``preprocessor_config.json``
            and a tokenizer); default: ``model_dir``.
        dtype: compute precision (``auto``: float16 autocast on CUDA, float32 elsewhere).
    """

    name = "pickscore"
    differentiable = True
    needs_prompts = True

    def __init__(self, model_dir: str, processor_dir: Optional[str] = None, dtype: DTypeName = "auto") -> None:
        super().__init__()
        self.model_dir = Path(model_dir).expanduser()
        self.processor_dir = Path(processor_dir).expanduser() if processor_dir else self.model_dir
        _check_model_dir(self.model_dir)
        _check_processor_dir(self.processor_dir)
        self.image_cfg = read_image_processor_config(self.processor_dir / "preprocessor_config.json")
        self.dtype_name = check_dtype_name(dtype)
        self.model: Optional[torch.nn.Module] = None
        self.tokenizer: Any = None
        self._text_cache: dict[tuple[str, str], Tensor] = {}

    def _load(self) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(str(self.model_dir), local_files_only=True)
        except Exception as e:
            raise ValueError(f"PickScore model folder {self.model_dir} does not hold a transformers CLIPModel: "
                             f"{type(e).__name__}: {short_error(e)}. {MODEL_HINT}") from None
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(self.processor_dir), local_files_only=True)
        except Exception as e:
            raise ValueError(f"CLIP tokenizer in {self.processor_dir} could not be read: {type(e).__name__}: "
                             f"{short_error(e)}. {PROCESSOR_HINT}") from None
        self._text_cache.clear()

    def preprocess(self, images: Tensor) -> Tensor:
        """The CLIP processor on tensors: shorter side to ``size``, centre crop, normalise."""
        from ntrk_lightning.open_clip_models import clip_preprocess

        cfg = self.image_cfg
        crop = cfg["crop"]
        if cfg["center_crop"] and crop == (cfg["size"], cfg["size"]):
            return clip_preprocess(images, cfg["size"], cfg["mean"], cfg["std"])
        # shorter side to `size` (crop at that size keeps the whole short side), then the crop
        x = clip_preprocess(images, cfg["size"], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        if cfg["center_crop"]:
            h, w = x.shape[-2:]
            top, left = int(round((h - crop[0]) / 2.0)), int(round((w - crop[1]) / 2.0))
            x = x[..., top:top + crop[0], left:left + crop[1]]
        m = torch.as_tensor(cfg["mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(cfg["std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - m) / s

    def encode_images(self, images: Tensor) -> Tensor:
        p = first_param(self.model)
        x = self.preprocess(images.to(p.device))
        with precision_context(p.device, self.dtype_name):
            emb = image_features(self.model.get_image_features(pixel_values=x.to(p.dtype)))
        return F.normalize(upcast(emb), dim=-1)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        p = first_param(self.model)
        dev = str(p.device)
        todo = sorted({s for s in prompts if (s, dev) not in self._text_cache})
        if todo:
            tok = self.tokenizer(todo, padding=True, truncation=True, max_length=77, return_tensors="pt")
            with torch.no_grad(), precision_context(p.device, self.dtype_name):
                emb = image_features(self.model.get_text_features(input_ids=tok["input_ids"].to(p.device),
                                                                  attention_mask=tok["attention_mask"].to(p.device)))
            emb = F.normalize(upcast(emb), dim=-1)
            for s, e in zip(todo, emb):
                self._text_cache[(s, dev)] = e
        return torch.stack([self._text_cache[(s, dev)] for s in prompts])

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        img = self.encode_images(images)
        txt = self.encode_prompts(list(prompts)).to(img.device)
        return upcast(self.model.logit_scale.exp()) * (img * txt).sum(-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_dir": str(self.model_dir), "processor_dir": str(self.processor_dir),
                "dtype": self.dtype_name}
