"""ImageReward (Xu et al., 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation") as a differentiable reward.

The model, written here from the paper's description and the published checkpoint's layout:

* a BLIP image encoder: a ViT (ViT-L/16 at 224 px in the release: 24 blocks, width 1024, 16 heads,
  pre-norm blocks, LayerNorm eps 1e-6, exact GELU, a final LayerNorm) giving all tokens (B, 1+N, D);
* a BLIP text encoder: BERT-base (12 layers, width 768, 12 heads, no token-type embeddings,
  LayerNorm eps 1e-12) whose every layer also cross-attends to the image tokens;
* the [CLS] feature of the text encoder through an MLP head 768 -> 1024 -> 128 -> 64 -> 16 -> 1
  (Linear layers at positions 0, 2, 4, 6, 7 of an ``nn.Sequential``, dropouts between them, no
  activations), then normalised with the published constants:
  ``score = (raw - 0.16717362830052426) / 1.0333394966054072``.

Prompts are tokenised with BERT's uncased tokenizer (padding and truncation to 35 tokens, as the
reference). Images are preprocessed on tensors, so gradients reach them: shorter side resized to
224 (bicubic, antialias), centre crop, OpenAI CLIP mean/std.

Files, all local: the checkpoint ``ImageReward.pt`` of the Hugging Face repo ``THUDM/ImageReward``
(a state dict; read with ``torch.load(weights_only=True)``, or a safetensors conversion) and a BERT
tokenizer folder (``google-bert/bert-base-uncased``). State-dict keys follow the release
(``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``); its unused BLIP projections
(``blip.vision_proj``, ``blip.text_proj``) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards.base import Reward
from rewards.clip_score import (DTypeName, check_dtype_name, first_param, precision_context, require_file,
                                short_error, upcast)

#: published score normalisation (reference implementation, ``ImageReward.mean`` / ``.std``)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: image preprocessing of the reference: 224 px bicubic resize + centre crop, OpenAI CLIP mean/std
IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: prompts are padded / truncated to this many BERT tokens
MAX_PROMPT_TOKENS = 35
#: the MLP head: Linear layers at these nn.Sequential positions, and their widths
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
HEAD_DIMS = (768, 1024, 128, 64, 16, 1)

CHECKPOINT_HINT = ("Get ImageReward.pt on a machine with internet: `hf download THUDM/ImageReward ImageReward.pt "
                   "--local-dir DIR` (older huggingface_hub: `huggingface-cli download ...`), then pass DIR/ImageReward.pt.")
TOKENIZER_HINT = ("Get the BERT tokenizer on a machine with internet: `hf download google-bert/bert-base-uncased "
                  "vocab.txt tokenizer.json tokenizer_config.json --local-dir DIR`, then pass DIR as tokenizer_dir.")


@dataclass(frozen=True)
class ImageRewardArch:
    """Architecture of the two encoders (defaults: the released model, BLIP ViT-L/16 + BERT-base)."""

    image_size: int = IMAGE_SIZE
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_vocab_size: int = 30524     # bert-base-uncased + BLIP's [DEC] and [ENC]
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_max_positions: int = 512
    text_layer_norm_eps: float = 1e-12
    head_dims: tuple[int, ...] = HEAD_DIMS

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "ImageRewardArch":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ImageReward arch has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        if "head_dims" in d:
            d["head_dims"] = tuple(int(v) for v in d["head_dims"])
        arch = cls(**d)
        if arch.vision_width % arch.vision_heads or arch.text_width % arch.text_heads:
            raise ValueError("ImageReward arch: widths must be multiples of the head counts")
        if arch.head_dims[0] != arch.text_width or arch.head_dims[-1] != 1 or len(arch.head_dims) != 6:
            raise ValueError(f"ImageReward arch: head_dims must be (text_width, h1, h2, h3, h4, 1), got {arch.head_dims}")
        return arch


# ---- BLIP ViT ----------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), patches row-major


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTMlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = ViTMlp(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """BLIP's ViT: patch embedding, [CLS] + learned positions, pre-norm blocks, final LayerNorm;
    returns every token (B, 1 + N, D)."""

    def __init__(self, arch: ImageRewardArch) -> None:
        super().__init__()
        n = (arch.image_size // arch.patch_size) ** 2
        self.patch_embed = PatchEmbed(arch.patch_size, arch.vision_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, arch.vision_width))
        self.blocks = nn.ModuleList(ViTBlock(arch.vision_width, arch.vision_heads) for _ in range(arch.vision_layers))
        self.norm = nn.LayerNorm(arch.vision_width, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed[:, :x.shape[1]].to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ---- BLIP text encoder: BERT with cross-attention to the image tokens ------------------------------

class BertSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def forward(self, x: Tensor, context: Tensor, bias: Optional[Tensor]) -> Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)), split(self.value(context)),
                                             attn_mask=bias)
        return out.transpose(1, 2).reshape(b, n, d)


class BertSelfOutput(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_width: int, eps: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(width, heads, kv_width)
        self.output = BertSelfOutput(width, eps)

    def forward(self, x: Tensor, context: Tensor, bias: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, context, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, inner: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    """Self-attention over the prompt tokens, cross-attention to the image tokens, feed-forward
    (post-norm residuals, as BERT)."""

    def __init__(self, arch: ImageRewardArch) -> None:
        super().__init__()
        w, eps = arch.text_width, arch.text_layer_norm_eps
        self.attention = BertAttention(w, arch.text_heads, w, eps)
        self.crossattention = BertAttention(w, arch.text_heads, arch.vision_width, eps)
        self.intermediate = BertIntermediate(w, arch.text_intermediate)
        self.output = BertOutput(arch.text_intermediate, w, eps)

    def forward(self, x: Tensor, mask_bias: Tensor, image: Tensor) -> Tensor:
        x = self.attention(x, x, mask_bias)
        x = self.crossattention(x, image, None)  # every image token is attended (the reference's all-ones mask)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm (BLIP's BERT has no token-type embeddings)."""

    def __init__(self, arch: ImageRewardArch) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(arch.text_vocab_size, arch.text_width)
        self.position_embeddings = nn.Embedding(arch.text_max_positions, arch.text_width)
        self.LayerNorm = nn.LayerNorm(arch.text_width, eps=arch.text_layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class BertEncoder(nn.Module):
    def __init__(self, arch: ImageRewardArch) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(arch) for _ in range(arch.text_layers))


class TextEncoder(nn.Module):
    """BLIP's multimodal BERT; returns the last hidden states (B, L, D)."""

    def __init__(self, arch: ImageRewardArch) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(arch)
        self.encoder = BertEncoder(arch)

    def forward(self, ids: Tensor, attention_mask: Tensor, image: Tensor) -> Tensor:
        x = self.embeddings(ids)
        # additive mask over the keys: 0 where attended, -10000 on padding (BERT's convention)
        bias = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0)
        for layer in self.encoder.layer:
            x = layer(x, bias, image.to(x.dtype))
        return x


class Blip(nn.Module):
    def __init__(self, arch: ImageRewardArch) -> None:
        super().__init__()
        self.visual_encoder = VisionEncoder(arch)
        self.text_encoder = TextEncoder(arch)


class RewardHead(nn.Module):
    """The MLP head: Linear layers at ``HEAD_LINEAR_INDICES`` of a Sequential, identity between
    (the reference's dropouts, inactive at inference), no activations."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        layer = 0
        for pos in range(max(HEAD_LINEAR_INDICES) + 1):
            if pos in HEAD_LINEAR_INDICES:
                mods.append(nn.Linear(dims[layer], dims[layer + 1]))
                layer += 1
            else:
                mods.append(nn.Identity())
        self.layers = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP encoders + MLP head; ``forward`` returns the *normalised* score (B,)."""

    def __init__(self, arch: ImageRewardArch) -> None:
        super().__init__()
        self.arch = arch
        self.blip = Blip(arch)
        self.mlp = RewardHead(arch.head_dims)

    def raw(self, pixels: Tensor, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The head's output before normalisation, (B,)."""
        image = self.blip.visual_encoder(pixels)
        h = self.blip.text_encoder(ids, attention_mask, image)
        return self.mlp(upcast(h[:, 0]).to(self.mlp.layers[0].weight.dtype)).squeeze(-1)

    def forward(self, pixels: Tensor, ids: Tensor, attention_mask: Tensor) -> Tensor:
        return (upcast(self.raw(pixels, ids, attention_mask)) - REWARD_MEAN) / REWARD_STD


#: state-dict keys of the release that the reward does not use
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids",
                    "blip.text_encoder.pooler.")


def load_image_reward_state(path: Path) -> dict[str, Tensor]:
    """The checkpoint's state dict (``weights_only`` torch file or safetensors), unused keys dropped."""
    from rewards.aesthetic import read_state_dict

    state = read_state_dict(path, "ImageReward checkpoint", CHECKPOINT_HINT)
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}


def build_image_reward(state: dict[str, Tensor], arch: ImageRewardArch, path: Path) -> ImageRewardModel:
    """An :class:`ImageRewardModel` holding ``state``; one clear error on missing/unexpected keys or
    shape mismatches (the checkpoint is not ImageReward, or ``arch`` does not describe it)."""
    with torch.device("meta"):  # shapes only: the weights come from the file (no random init of 470M parameters)
        model = ImageRewardModel(arch)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(f"ImageReward checkpoint {path} does not match the ImageReward architecture: "
                         f"{'; '.join(detail)} (the release is ViT-L/16 + BERT-base; another size needs the "
                         f"matching `arch`). {CHECKPOINT_HINT}")
    bad = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"ImageReward checkpoint {path}: {len(bad)} tensors have other shapes than the architecture "
                         f"(e.g. {k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}); pass the "
                         "matching `arch` (the release is ViT-L/16 + BERT-base)")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval()


class ImageReward(Reward):
    """ImageReward score of (image, prompt) pairs, normalised as published (differentiable in the
    images; roughly standard normal over the authors' evaluation set, higher is better).

    Args:
        checkpoint: path of ``ImageReward.pt`` (or a safetensors file with the same keys).
        tokenizer_dir: local folder of the ``bert-base-uncased`` tokenizer.
        arch: architecture overrides (fields of :class:`ImageRewardArch`; tests use a tiny one),
            or the path of a JSON file holding them; default: the released model.
        dtype: compute precision of the encoders (``auto``: float16 autocast on CUDA, float32
            elsewhere); the head runs in float32.
    """

    name = "image_reward"
    differentiable = True
    needs_prompts = True

    def __init__(self, checkpoint: str, tokenizer_dir: str, arch: Optional[dict[str, Any] | str] = None,
                 dtype: DTypeName = "auto") -> None:
        super().__init__()
        self.checkpoint = require_file(checkpoint, "ImageReward checkpoint", CHECKPOINT_HINT)
        self.tokenizer_dir = Path(tokenizer_dir).expanduser()
        if not self.tokenizer_dir.is_dir():
            raise FileNotFoundError(f"BERT tokenizer folder not found: {self.tokenizer_dir}. {TOKENIZER_HINT}")
        if not any((self.tokenizer_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
            raise FileNotFoundError(f"BERT tokenizer folder {self.tokenizer_dir} has neither tokenizer.json nor "
                                    f"vocab.txt. {TOKENIZER_HINT}")
        if isinstance(arch, str):
            p = require_file(arch, "ImageReward arch JSON", "Pass a JSON object of ImageRewardArch fields.")
            try:
                arch = json.loads(p.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"ImageReward arch JSON {p} is not valid JSON: {short_error(e, 200)}") from None
        self.arch = ImageRewardArch.from_dict(arch)
        self.dtype_name = check_dtype_name(dtype)
        self.model: Optional[ImageRewardModel] = None
        self.tokenizer: Any = None
        self._token_cache: dict[str, tuple[Tensor, Tensor]] = {}

    def _load(self) -> None:
        from transformers import AutoTokenizer

        self.model = build_image_reward(load_image_reward_state(self.checkpoint), self.arch, self.checkpoint)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)
        except Exception as e:
            raise ValueError(f"BERT tokenizer in {self.tokenizer_dir} could not be read: {type(e).__name__}: "
                             f"{short_error(e)}. {TOKENIZER_HINT}") from None
        self._token_cache.clear()

    def preprocess(self, images: Tensor) -> Tensor:
        """The reference preprocessing on tensors: shorter side to ``image_size`` (bicubic,
        antialias), centre crop, CLIP mean/std."""
        from ntrk_lightning.open_clip_models import clip_preprocess

        return clip_preprocess(images, self.arch.image_size, CLIP_MEAN, CLIP_STD)

    def tokens(self, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) (B, 35) of the prompts (cached per prompt)."""
        todo = sorted({p for p in prompts if p not in self._token_cache})
        if todo:
            tok = self.tokenizer(todo, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                 return_tensors="pt")
            for i, p in enumerate(todo):
                self._token_cache[p] = (tok["input_ids"][i], tok["attention_mask"][i])
        ids = torch.stack([self._token_cache[p][0] for p in prompts]).to(device)
        mask = torch.stack([self._token_cache[p][1] for p in prompts]).to(device)
        return ids, mask

    def score(self, images: Tensor, prompts: Optional[Sequence[str]] = None) -> Tensor:
        p = first_param(self.model)
        x = self.preprocess(images.to(p.device))
        ids, mask = self.tokens(list(prompts), p.device)
        with precision_context(p.device, self.dtype_name):
            image = self.model.blip.visual_encoder(x.to(p.dtype))
            h = self.model.blip.text_encoder(ids, mask, image)
        with precision_context(p.device, "float32"):  # the small head in full precision
            raw = self.model.mlp(upcast(h[:, 0]).to(p.dtype)).squeeze(-1)
        return (upcast(raw) - REWARD_MEAN) / REWARD_STD

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": str(self.checkpoint), "tokenizer_dir": str(self.tokenizer_dir),
                "dtype": self.dtype_name, "arch": {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in asdict(self.arch).items()},
                "mean": REWARD_MEAN, "std": REWARD_STD}
