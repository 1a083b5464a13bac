"""CLIP text-image score as a differentiable reward, and what the CLIP-family rewards share.

``CLIPScoreReward`` scores ``scale * cos(image embedding, prompt embedding)`` with any open_clip
model read from a LOCAL weights file (the metric of the same name, :mod:`metrics.clip_score`,
clamps at 0 as the CLIP-score literature does; a guidance reward must not, or its gradient would
vanish wherever the cosine is negative).

Shared helpers used by the aesthetic, HPSv2 and PickScore rewards:

* :func:`precision_context` — the compute precision of a reward model: ``"auto"`` = float16
  autocast on CUDA and float32 elsewhere; ``"float32"`` switches autocast *off* (so a
  ``--trainer.precision 16-mixed`` around the predict step cannot lower it); ``"float16"`` /
  ``"bfloat16"`` autocast to that type.
* :func:`require_file` — the clear ``FileNotFoundError`` naming the file and where to get it.
* :func:`load_open_clip_checked` — :func:`metrics.clip_score.load_open_clip` (local files only,
  ``weights_only``) with every loading failure turned into one ``ValueError`` naming the file and
  what it should have held.
* :class:`OpenCLIPReward` — open_clip model + tensor preprocessing + a per-prompt text cache.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import Reward

PathLike = Union[str, "os.PathLike[str]"]
DTypeName = Literal["auto", "float32", "float16", "bfloat16"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: how to get the OpenAI CLIP ViT-L/14 weights in open_clip format (aesthetic reward, CLIP score)
OPENAI_VIT_L14_HINT = (
    "Get the OpenAI CLIP ViT-L/14 weights in open_clip format on a machine with internet: "
    "`hf download timm/vit_large_patch14_clip_224.openai open_clip_model.safetensors --local-dir DIR` "
    "(older huggingface_hub: `huggingface-cli download ...`), then pass DIR/open_clip_model.safetensors "
    "with model name ViT-L-14-quickgelu.")


def check_dtype_name(dtype: str, what: str = "dtype") -> str:
    if dtype not in ("auto", *_DTYPES):
        raise ValueError(f"{what} must be one of 'auto', 'float32', 'float16', 'bfloat16', got {dtype!r}")
    return dtype


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on CUDA, float32 elsewhere; otherwise the named type."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def precision_context(device: torch.device, dtype: str) -> ContextManager[Any]:
    """Autocast to the resolved compute type on ``device`` (off for float32)."""
    resolved = resolve_dtype(dtype, device)
    try:
        if resolved == torch.float32:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=resolved)
    except RuntimeError:  # a device type without autocast support: plain float32
        return contextlib.nullcontext()


def require_file(path: Optional[PathLike], what: str, where: str) -> Path:
    """``path`` as a Path, or a ``FileNotFoundError`` naming the file and where to get it."""
    if path is None or str(path) == "":
        raise FileNotFoundError(f"{what}: no file given. {where}")
    p = Path(path).expanduser()
    if not p.is_file():
        kind = "is a folder, not a file" if p.is_dir() else "not found"
        raise FileNotFoundError(f"{what} {kind}: {p}. {where}")
    return p


def sniff_weights_file(path: Path, what: str, where: str) -> None:
    """Refuse, with a clear message, a file that is neither a torch checkpoint (zip archive or
    legacy pickle) nor safetensors (8-byte header length, then a JSON header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read: {e}") from None
    is_zip = head[:4] == b"PK\x03\x04"
    is_pickle = head[:1] == b"\x80"
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not (is_zip or is_pickle or is_safetensors):
        raise ValueError(f"{what} {path} is not a weights file (neither a torch checkpoint nor safetensors; "
                         f"starts with {head[:8]!r}). {where}")


def short_error(e: BaseException, limit: int = 400) -> str:
    """First line(s) of an exception message, capped (state-dict errors list thousands of keys)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def load_open_clip_checked(model_name: str, weights: PathLike, what: str, where: str,
                           **create_kwargs: Any) -> tuple[nn.Module, Callable[[Sequence[str]], Tensor]]:
    """(model, tokenizer) from a local weights file; any failure is one clear ValueError."""
    from ntrk_lightning.open_clip_models import load_open_clip

    path = require_file(weights, what, where)
    sniff_weights_file(path, what, where)
    try:
        return load_open_clip(model_name, str(path), **create_kwargs)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling errors, safetensors header errors, key/shape mismatches
        msg = str(e)
        prefix = f"from {path}: "  # load_open_clip's own wrapper repeats what we say below
        if prefix in msg:
            msg = msg.split(prefix, 1)[1]
        raise ValueError(
            f"{what} {path} is not an open_clip state dict of model {model_name!r} "
            f"(safetensors, or a torch file holding the state dict, optionally under 'state_dict'): "
            f"{short_error(Exception(msg))}. {where}") from None


def upcast(x: Tensor) -> Tensor:
    """Half-precision model outputs to float32 (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def first_param(module: nn.Module) -> Tensor:
    p = next(module.parameters(), None)
    if p is None:
        raise RuntimeError("reward model has no parameters; was it loaded?")
    return p


def image_features(out: Any) -> Tensor:
    """Projected features from a transformers ``get_*_features`` call (a tensor in transformers 4,
    a model output with ``pooler_output`` in transformers 5)."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")
    return pooled


class OpenCLIPReward(Reward):
    """Base of rewards built on an open_clip model read from a local file: loads the model,
    preprocesses images on tensors (differentiably) and caches prompt embeddings per device.

    Subclasses set ``_what``/``_where`` (for messages) and implement :meth:`score`."""

    _what = "open_clip weights"
    _where = OPENAI_VIT_L14_HINT
    _force_quick_gelu = False

    def __init__(self, model_name: str, weights: str, dtype: DTypeName = "auto",
                 preprocess_cfg: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.weights = str(require_file(weights, self._what, self._where))
        if model_name.endswith(".json"):
            require_file(model_name, "open_clip model config", "Pass a built-in open_clip model name or a JSON config.")
        self.model_name = model_name
        self.dtype_name = check_dtype_name(dtype)
        self.preprocess_override = dict(preprocess_cfg or {})
        self.clip: Optional[nn.Module] = None
        self.tokenizer: Optional[Callable[[Sequence[str]], Tensor]] = None
        self.image_size: Any = 224
        self.image_mean: tuple[float, ...] = ()
        self.image_std: tuple[float, ...] = ()
        self._text_cache: dict[tuple[str, str], Tensor] = {}

    def _load(self) -> None:
        import open_clip

        extra = {"force_quick_gelu": True} if self._force_quick_gelu else {}
        self.clip, self.tokenizer = load_open_clip_checked(self.model_name, self.weights, self._what, self._where,
                                                           **extra)
        cfg = dict(open_clip.get_model_preprocess_cfg(self.clip))
        cfg.update(self.preprocess_override)
        self.image_size = cfg["size"]
        self.image_mean = tuple(float(v) for v in cfg["mean"])
        self.image_std = tuple(float(v) for v in cfg["std"])
        self._text_cache.clear()

    # ---- pieces -------------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> model input (shorter side resized, centre crop, normalised)."""
        from ntrk_lightning.open_clip_models import clip_preprocess

        return clip_preprocess(images, self.image_size, self.image_mean, self.image_std)

    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised float32 image embeddings (B, D); differentiable w.r.t. ``images``."""
        p = first_param(self.clip)
        x = self.preprocess(images.to(p.device))
        with precision_context(p.device, self.dtype_name):
            emb = self.clip.encode_image(x.to(p.dtype))
        return F.normalize(upcast(emb), dim=-1)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised float32 text embeddings (B, D), cached per prompt (no gradient)."""
        p = first_param(self.clip)
        dev = str(p.device)
        todo = sorted({s for s in prompts if (s, dev) not in self._text_cache})
        if todo:
            with torch.no_grad(), precision_context(p.device, self.dtype_name):
                emb = self.clip.encode_text(self.tokenizer(todo).to(p.device))
            emb = F.normalize(upcast(emb), dim=-1)
            for s, e in zip(todo, emb):
                self._text_cache[(s, dev)] = e
        return torch.stack([self._text_cache[(s, dev)] for s in prompts])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.model_name, "weights": self.weights, "dtype": self.dtype_name}


class CLIPScoreReward(OpenCLIPReward):
    """``scale * cos(CLIP image embedding, CLIP prompt embedding)`` (differentiable, needs prompts).

    Args:
        weights: local open_clip weights file (safetensors or a torch state dict).
        model_name: open_clip model name (``ViT-L-14-quickgelu`` for OpenAI weights), or the path
            of a model-config JSON.
        scale: multiplier (100 gives the usual CLIP-score range; no clamp at 0, see module doc).
        dtype: compute precision (``auto``: float16 autocast on CUDA, float32 elsewhere).
    """

    needs_prompts = True
    name = "clip_score"
    _what = "CLIP weights file"

    def __init__(self, weights: str, model_name: str = "ViT-L-14-quickgelu", scale: float = 100.0,
                 dtype: DTypeName = "auto") -> None:
        super().__init__(model_name, weights, dtype)
        self.scale = float(scale)

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        img = self.encode_images(images)
        txt = self.encode_prompts(list(prompts)).to(img.device)
        return self.scale * (img * txt).sum(-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scale": self.scale}
