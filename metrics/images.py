"""Reading image folders for the metrics (``ntrk evaluate``, FID reference statistics).

Conventions, shared by every metric here:

* files: ``.png``, ``.jpg``, ``.jpeg``, ``.webp`` (any case) directly inside the folder, in sorted
  file-name order (so "the i-th image" means the same thing on every rank and every run);
* decoded images are ``uint8`` tensors (C, H, W) with C = 1 (grey, also grey+alpha) or 3 (RGB,
  also RGBA and palette images), exactly the 8-bit values stored in the file;
* metric inputs are ``uint8`` in [0, 255] or float in [0, 1]; :func:`as_float01` maps both to
  float in [0, 1], the convention of every reward and feature extractor in the project.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ntrk_lightning.image_tensors import as_float01, to_uint8  # noqa: F401  (the metrics' public names)

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageFolderError(ValueError):
    """A folder or image file that cannot be used, with a message naming it."""


def is_image_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Raises :class:`ImageFolderError` for a missing folder, a file given instead of a folder, or a
    folder without images (naming subfolders that do hold images, the usual mistake).
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise ImageFolderError(f"not a folder: {folder}")
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise ImageFolderError(f"cannot list image folder {folder}: {e.strerror or e}") from None
    files = [p for p in entries if p.is_file() and is_image_file(p)]
    if not files:
        sub = [p.name for p in entries if p.is_dir() and any(is_image_file(q) for q in p.iterdir())]
        hint = (f" (images found in subfolders {', '.join(sub[:5])}: point at one of them, or at the run "
                "folder that holds records.jsonl)") if sub else ""
        raise ImageFolderError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}{hint}")
    return files


def check_image(path: PathLike) -> tuple[int, int]:
    """Open ``path`` and verify its structure (PNG: every chunk's checksum) without decoding the
    pixels; returns (width, height). Raises :class:`ImageFolderError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError...)
        raise ImageFolderError(f"unreadable or corrupt image file: {path} ({type(e).__name__}: {e})") from None
    return size


def read_image(path: PathLike) -> Tensor:
    """Decode one image file to a ``uint8`` tensor (C, H, W), C in {1, 3}.

    Raises :class:`ImageFolderError` naming the file when it cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "1", "I", "I;16", "F", "LA"):
                img = img.convert("L")
            elif img.mode != "RGB":
                img = img.convert("RGB")
            arr = np.array(img, dtype=np.uint8)
    except Exception as e:
        raise ImageFolderError(f"unreadable or corrupt image file: {path} ({type(e).__name__}: {e})") from None
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def batches_by_shape(paths: Sequence[Path], batch_size: int) -> Iterator[Tensor]:
    """Decode ``paths`` and yield ``uint8`` batches (B, C, H, W) of equal shape (images of other
    shapes start a new batch), in file order."""
    buf: list[Tensor] = []
    for p in paths:
        img = read_image(p)
        if buf and (img.shape != buf[0].shape or len(buf) >= batch_size):
            yield torch.stack(buf)
            buf = []
        buf.append(img)
    if buf:
        yield torch.stack(buf)


def folder_fingerprint(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of each file: a cache key that changes when any image does."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.name, int(st.st_size), int(st.st_mtime_ns)))
    return out
