"""The LAION improved aesthetic predictor as a differentiable reward.

score(image) = MLP head( normalize( CLIP ViT-L/14 image embedding ) ), the predictor used for
aesthetic alignment of Stable Diffusion (DDPO, DRaFT, AlignProp, DOODL, ...). Two files, both local:

* the head ``sac+logos+ava1-l14-linearMSE.pth`` from https://github.com/christophschuhmann/improved-aesthetic-predictor
  (a state dict: ``layers.{0,2,4,6,7}.{weight,bias}``, Linear 768->1024->128->64->16->1 with
  dropouts in between and no activations); the older linear head ``sa_0_4_vit_l_14_linear.pth``
  (LAION-AI/aesthetic-predictor: one ``Linear(768, 1)``, keys ``weight``/``bias``) loads too;
* OpenAI CLIP ViT-L/14 weights in open_clip format (model ``ViT-L-14-quickgelu``).

Preprocessing is the reference one, done on tensors so that gradients reach the image: shorter
side resized to 224 (bicubic, antialias), centre crop, OpenAI mean/std
(:func:`metrics.clip_score.clip_preprocess`). Only the image tower is kept in memory.

The head's input size follows the file, and must equal the CLIP model's embedding size; the CLIP
model is configurable (a model-config JSON path works) so that a tiny model and head can stand in
for the real ones in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.clip_score import (OPENAI_VIT_L14_HINT, DTypeName, OpenCLIPReward, first_param, precision_context,
                                require_file, short_error, sniff_weights_file, upcast)

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_HINT = (f"Get {HEAD_FILE} from https://github.com/christophschuhmann/improved-aesthetic-predictor "
             f"(https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}) "
             "on a machine with internet and pass its path.")

#: the documented head: Linear layers at these nn.Sequential positions (dropouts between them)
DOCUMENTED_LINEAR_INDICES = (0, 2, 4, 6, 7)
DOCUMENTED_DIMS = (768, 1024, 128, 64, 16, 1)


def read_state_dict(path: Path, what: str, where: str) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a safetensors or torch file (``weights_only``), unwrapping a
    ``state_dict`` entry and a DDP ``module.`` prefix; a clear ValueError otherwise."""
    sniff_weights_file(path, what, where)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} is not a readable weights file (safetensors, or a torch state dict "
                         f"loadable with weights_only=True): {type(e).__name__}: {short_error(e, 200)}. {where}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{what} {path} does not hold a state dict (name -> tensor), found "
                         f"{type(obj).__name__}. {where}")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


class AestheticHead(nn.Module):
    """The LAION head: Linear layers at the given ``nn.Sequential`` positions, identity in between
    (the original's dropouts, inactive at inference), no activations. State-dict keys are
    ``layers.<i>.weight``/``layers.<i>.bias`` as in the released file."""

    def __init__(self, dims: Sequence[int], linear_indices: Sequence[int]) -> None:
        super().__init__()
        dims, linear_indices = [int(d) for d in dims], [int(i) for i in linear_indices]
        if len(dims) != len(linear_indices) + 1:
            raise ValueError("need one more dim than linear layers")
        mods: list[nn.Module] = []
        layer = 0
        for pos in range(max(linear_indices) + 1):
            if pos in linear_indices:
                mods.append(nn.Linear(dims[layer], dims[layer + 1]))
                layer += 1
            else:
                mods.append(nn.Identity())
        self.layers = nn.Sequential(*mods)
        self.in_features = dims[0]
        self.dims = tuple(dims)

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb)


class LinearAestheticHead(nn.Module):
    """The older LAION linear head (``sa_0_4_vit_l_14_linear.pth``): one Linear(D, 1)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.in_features = in_features
        self.dims = (in_features, 1)

    def forward(self, emb: Tensor) -> Tensor:
        return self.linear(emb)


def build_head(state: dict[str, Tensor], path: Path) -> nn.Module:
    """An aesthetic head whose structure follows the state dict (either released layout)."""
    where = HEAD_HINT
    if set(state) == {"weight", "bias"}:
        w = state["weight"]
        if w.ndim != 2 or w.shape[0] != 1 or state["bias"].shape != (1,):
            raise ValueError(f"aesthetic head {path}: a linear head must have weight (1, D) and bias (1,), "
                             f"got {tuple(w.shape)} and {tuple(state['bias'].shape)}. {where}")
        head: nn.Module = LinearAestheticHead(int(w.shape[1]))
        head.linear.load_state_dict(state)
        return head
    expected = "keys layers.<i>.weight / layers.<i>.bias (768->1024->128->64->16->1 at layers 0, 2, 4, 6, 7)"
    idx: dict[int, set[str]] = {}
    for k in state:
        parts = k.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("weight", "bias"):
            raise ValueError(f"aesthetic head {path} has unexpected key {k!r}; expected {expected}. {where}")
        idx.setdefault(int(parts[1]), set()).add(parts[2])
    positions = sorted(idx)
    dims: list[int] = []
    for i in positions:
        if idx[i] != {"weight", "bias"}:
            raise ValueError(f"aesthetic head {path}: layer {i} lacks {sorted({'weight', 'bias'} - idx[i])}. {where}")
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"aesthetic head {path}: layer {i} has weight {tuple(w.shape)} and bias "
                             f"{tuple(b.shape)}, not a Linear layer. {where}")
        if dims and dims[-1] != w.shape[1]:
            raise ValueError(f"aesthetic head {path}: layer {i} takes {w.shape[1]} inputs but the previous layer "
                             f"gives {dims[-1]}; expected {expected}. {where}")
        if not dims:
            dims.append(int(w.shape[1]))
        dims.append(int(w.shape[0]))
    if dims[-1] != 1:
        raise ValueError(f"aesthetic head {path} ends in {dims[-1]} outputs, expected 1. {where}")
    head = AestheticHead(dims, positions)
    head.load_state_dict(state)
    return head


def load_aesthetic_head(path: str) -> nn.Module:
    """Read and validate a LAION aesthetic head file (frozen, eval mode, float32)."""
    p = require_file(path, "LAION aesthetic head", HEAD_HINT)
    head = build_head({k: v.float() for k, v in read_state_dict(p, "aesthetic head", HEAD_HINT).items()}, p)
    head.requires_grad_(False)
    return head.eval()


class LAIONAestheticReward(OpenCLIPReward):
    """LAION improved aesthetic predictor (differentiable; prompts unused).

    Args:
        head: path of ``sac+logos+ava1-l14-linearMSE.pth`` (or another head of either released layout).
        clip_weights: OpenAI CLIP ViT-L/14 weights in open_clip format (e.g. ``open_clip_model.safetensors``
            of ``timm/vit_large_patch14_clip_224.openai``).
        clip_model: open_clip model name (``ViT-L-14-quickgelu``: OpenAI weights use QuickGELU) or the
            path of a model-config JSON (tests use a tiny one).
        dtype: compute precision of the CLIP tower (``auto``: float16 autocast on CUDA, float32
            elsewhere); the head always runs in float32.
    """

    name = "aesthetic"
    differentiable = True
    needs_prompts = False
    _what = "CLIP ViT-L/14 weights file"
    _where = OPENAI_VIT_L14_HINT

    def __init__(self, head: str, clip_weights: str, clip_model: str = "ViT-L-14-quickgelu",
                 dtype: DTypeName = "auto") -> None:
        self.head_path = str(require_file(head, "LAION aesthetic head", HEAD_HINT))
        super().__init__(clip_model, clip_weights, dtype)
        # the head was fitted on OpenAI CLIP embeddings, which use QuickGELU: plain "ViT-L-14" would
        # load those weights without error but compute other embeddings
        self._force_quick_gelu = clip_model == "ViT-L-14"
        self.visual: Optional[nn.Module] = None
        self.head: Optional[nn.Module] = None

    def _load(self) -> None:
        head = load_aesthetic_head(self.head_path)  # cheap: fail on a wrong head before reading CLIP
        super()._load()
        clip = self.clip
        embed_dim = getattr(clip.visual, "output_dim", None)
        if embed_dim is None:
            with torch.no_grad():
                n = self.image_size if isinstance(self.image_size, int) else self.image_size[0]
                embed_dim = clip.encode_image(torch.zeros(1, 3, n, n)).shape[-1]
        if int(embed_dim) != head.in_features:
            raise ValueError(f"aesthetic head {self.head_path} expects {head.in_features}-d CLIP embeddings but "
                             f"CLIP model {self.model_name!r} gives {embed_dim}-d ones (the released head needs "
                             "ViT-L/14: 768)")
        # keep only the image tower: the text tower of ViT-L/14 is 123M parameters never used here
        self.visual = clip.visual
        self.clip = None
        self.head = head

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised float32 CLIP image embeddings (B, D) of images in [0, 1]."""
        p = first_param(self.visual)
        x = self.preprocess(images.to(p.device))
        with precision_context(p.device, self.dtype_name):
            emb = self.visual(x.to(p.dtype))
        return F.normalize(upcast(emb), dim=-1)

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        emb = self.embed(images)
        hp = first_param(self.head)
        with precision_context(emb.device, "float32"):  # the small head in full precision
            r = upcast(self.head(emb.to(hp.dtype)))
        return r.squeeze(-1)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(head=self.head_path, clip_model=self.model_name, clip_weights=self.weights)
        if self.head is not None:
            d["head_dims"] = list(self.head.dims)
        return d
