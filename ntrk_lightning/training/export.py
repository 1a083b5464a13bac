"""Writing trained weights and their model cards (atomically, rank 0 only).

Every fit exports three things into its ``export_dir``:

* ``<name>.safetensors`` — the weights (EMA weights for the diffusion model), stored in
  ``export_dtype`` (float16 by default; loaders cast back to float32), with small string metadata;
* ``<name>_card.json`` — the machine-readable card: data, configuration, seed, training time,
  machine, quality numbers;
* ``MODEL_CARD.md`` — a human-readable card rebuilt from every ``*_card.json`` in the folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ntrk_lightning.fileio import atomic_write, atomic_write_text  # noqa: F401  (diffusion.py uses atomic_write_text)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def save_weights(state: Mapping[str, Tensor], path: Path, dtype: str = "float16",
                 metadata: Optional[Mapping[str, Any]] = None) -> int:
    """Save a state dict as safetensors in ``dtype``; returns the file size in bytes."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = (v.to(_DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
    meta = {"format": "pt", "stored_dtype": dtype}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=meta))
    return path.stat().st_size


def machine_info() -> dict[str, Any]:
    """What the numbers in a card were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import diffusers
        import lightning

        info["lightning"] = lightning.__version__
        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def jsonable(obj: Any) -> Any:
    """Best-effort conversion of hparams (tuples, paths, tensors) to JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_card(export_dir: Path, name: str, card: Mapping[str, Any]) -> Path:
    """Write ``<name>_card.json`` and rebuild ``MODEL_CARD.md`` in ``export_dir``."""
    path = Path(export_dir) / f"{name}_card.json"
    atomic_write_text(path, json.dumps(jsonable(card), indent=2, sort_keys=False) + "\n")
    rebuild_markdown(Path(export_dir))
    return path


def read_cards(export_dir: Path) -> dict[str, dict]:
    cards = {}
    for p in sorted(Path(export_dir).glob("*_card.json")):
        cards[p.name[: -len("_card.json")]] = json.loads(p.read_text())
    return cards


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v) + "`"
    return str(v)


_INTRO = """# Shipped digit models (16x16, one channel)

Weights in this folder are produced by `ntrk fit -c configs/<config>.yaml` (see
the recipe comments in each config). All networks here are trained on scikit-learn's bundled handwritten digits
(1797 images of 8x8, bilinearly upsampled to 16x16, pixels in [-1, 1]), on the training split
(`split_indices(1797, fraction_test=0.2, seed=0)`: 1438 train / 359 test). No shipped network has
seen the 359 test digits. Floats are stored in float16 and loaded back to float32.

This file is regenerated from the `*_card.json` files next to it at the end of every export.
"""


def rebuild_markdown(export_dir: Path) -> Path:
    cards = read_cards(export_dir)
    lines = [_INTRO]
    for name, card in cards.items():
        lines.append(f"## `{name}` — {card.get('title', '')}\n")
        for key in ("description", "files", "data", "seed", "training", "machine"):
            if key in card:
                val = card[key]
                if isinstance(val, dict):
                    lines.append(f"**{key}**\n")
                    lines.extend(f"- {k}: {_fmt(v)}" for k, v in val.items())
                    lines.append("")
                else:
                    lines.append(f"**{key}**: {_fmt(val)}\n")
        if "quality" in card:
            lines.append("**quality**\n")
            lines.append("| metric | value |\n|---|---|")
            lines.extend(f"| {k} | {_fmt(v)} |" for k, v in card["quality"].items())
            lines.append("")
        for key in ("retrain_check", "notes"):
            if key in card:
                lines.append(f"**{key}**\n")
                lines.extend(f"- {k}: {_fmt(v)}" for k, v in card[key].items())
                lines.append("")
        if "config" in card:
            lines.append("<details><summary>full configuration</summary>\n")
            lines.append("```json\n" + json.dumps(card["config"], indent=2) + "\n```\n</details>\n")
    path = Path(export_dir) / "MODEL_CARD.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
