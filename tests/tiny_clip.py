"""A tiny random-initialised open_clip model saved to local files (offline; the BPE vocabulary
ships in the open_clip wheel). Used by the CLIP score tests."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_clip(folder: Path, seed: int = 0, name: str = "ntrk-test-tiny-clip",
                   config: dict | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` (model config, registered with open_clip; default ``TINY_CONFIG``)
    and ``<name>.safetensors`` (weights) into ``folder``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / f"{name}.json"
    cfg.write_text(json.dumps(config or TINY_CONFIG))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return cfg, weights
