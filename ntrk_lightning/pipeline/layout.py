"""Where a run's files live and how they are written (see docs/run_format.md).

Every file is written to a temporary name in the same folder and renamed into place, so readers
(and a rerun after a kill) only ever see complete files. A sample counts as finished when its
JSON record exists and checks out against its PNG (size and sha256, :mod:`.run`); the record is
written after its PNG, so a finished sample always has both. A sample whose final image is not
finite gets no PNG and no record but a ``<stem>.failed.json`` marker, and is generated again by
the next run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from torch import Tensor

from ntrk_lightning.fileio import atomic_write_bytes, atomic_write_text, json_safe

IMAGES = "images"
RECORDS = "records.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
FAILED = "failed.jsonl"

_STEM = re.compile(r"^p(\d{5,})_s(\d{5,})$")


def stem(prompt_index: int, sample_index: int) -> str:
    return f"p{prompt_index:05d}_s{sample_index:05d}"


def key(arm: str, prompt_index: int, sample_index: int) -> str:
    return f"{arm}/{stem(prompt_index, sample_index)}"


def image_path(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    return out / IMAGES / arm / f"{stem(prompt_index, sample_index)}.png"


def record_path(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    return out / IMAGES / arm / f"{stem(prompt_index, sample_index)}.json"


def check_arm_name(arm: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", arm):
        raise ValueError(f"arm name {arm!r} must be letters, digits, '_', '.', '-' (it names a folder)")
    return arm


def failed_path(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    return out / IMAGES / arm / f"{stem(prompt_index, sample_index)}.failed.json"


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] (B, C, H, W) -> uint8 on the CPU, as they are saved. Non-finite values
    raise: clamping would turn NaN into black pixels that look like a finished sample."""
    import torch

    if not bool(torch.isfinite(images.detach()).all()):
        raise ValueError("to_uint8: images contain NaN or infinite values (filter failed samples first)")
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to("cpu").byte()


def png_bytes(image_u8: Tensor) -> bytes:
    """PNG encoding of one (C, H, W) uint8 image with 1 (grey) or 3 (RGB) channels."""
    import io

    from PIL import Image

    arr = image_u8.numpy()
    if arr.shape[0] == 1:
        img = Image.fromarray(arr[0], mode="L")
    elif arr.shape[0] == 3:
        img = Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), mode="RGB")
    else:
        raise ValueError(f"cannot save an image with {arr.shape[0]} channels as PNG")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_sample(out: Path, record: dict[str, Any], image_u8: Tensor) -> None:
    """PNG first, then the record that marks the sample finished; the record gains the PNG's
    ``png_bytes`` and ``png_sha256`` (checked on resume)."""
    import hashlib

    arm, p, s = record["arm"], int(record["prompt_index"]), int(record["sample_index"])
    data = png_bytes(image_u8)
    record["png_bytes"], record["png_sha256"] = len(data), hashlib.sha256(data).hexdigest()
    atomic_write_bytes(image_path(out, arm, p, s), data)
    atomic_write_text(record_path(out, arm, p, s), json.dumps(json_safe(record)) + "\n")
    fp = failed_path(out, arm, p, s)
    if fp.exists():  # an earlier run's failure of this sample is now superseded
        fp.unlink(missing_ok=True)


def write_failed(out: Path, record: dict[str, Any]) -> None:
    """Mark a sample failed (no PNG, no record): counted in the metrics, generated again later."""
    arm, p, s = record["arm"], int(record["prompt_index"]), int(record["sample_index"])
    atomic_write_text(failed_path(out, arm, p, s), json.dumps(json_safe(record)) + "\n")


def iter_failed(out: Path, arms: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Failure markers of ``arms`` (unreadable ones skipped), in (arm, prompt, sample) order."""
    for arm in arms:
        folder = out / IMAGES / arm
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("p*_s*.failed.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                yield rec


def remove_failed(out: Path, arms: Sequence[str], keys: set[tuple[str, int, int]]) -> int:
    """Delete the failure markers of ``keys`` (they are about to be generated again)."""
    n = 0
    for arm in arms:
        folder = out / IMAGES / arm
        if not folder.is_dir():
            continue
        for path in folder.glob("p*_s*.failed.json"):
            m = _STEM.match(path.name[: -len(".failed.json")])
            if m and (arm, int(m.group(1)), int(m.group(2))) in keys:
                path.unlink(missing_ok=True)
                n += 1
    return n


def read_image_u8(path: Path) -> Tensor:
    """A saved PNG back as a (C, H, W) uint8 tensor."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        arr = np.array(img)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def iter_records(out: Path, arms: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Records of finished samples of ``arms`` (unreadable records are skipped: they get
    regenerated), in (arm, prompt, sample) order."""
    for arm in arms:
        folder = out / IMAGES / arm
        if not folder.is_dir():
            continue
        for rec_path in sorted(folder.glob("p*_s*.json")):
            m = _STEM.match(rec_path.stem)
            if not m or not rec_path.with_suffix(".png").is_file():
                continue
            try:
                rec = json.loads(rec_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                yield rec


def finished_candidates(out: Path, arms: Sequence[str]) -> set[tuple[str, int, int]]:
    """(arm, prompt index, sample index) of every sample in ``out`` with a record, not yet
    checked (see :func:`ntrk_lightning.pipeline.run.verify_finished`)."""
    done = set()
    for arm in arms:
        folder = out / IMAGES / arm
        if not folder.is_dir():
            continue
        for rec_path in folder.glob("p*_s*.json"):
            m = _STEM.match(rec_path.stem)
            if m:
                done.add((arm, int(m.group(1)), int(m.group(2))))
    return done


def remove_stale_temporaries(out: Path, arms: Sequence[str]) -> int:
    """Delete temporary files a killed run left behind (call before any process writes)."""
    n = 0
    folders = [out] + [out / IMAGES / arm for arm in arms]
    for folder in folders:
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                try:
                    tmp.unlink()
                    n += 1
                except OSError:
                    pass
    return n


def write_records_jsonl(out: Path, records: Iterable[dict[str, Any]]) -> int:
    """Rewrite ``records.jsonl`` (atomically) from ``records``; returns the count."""
    lines = [json.dumps(json_safe(r)) for r in records]
    atomic_write_text(out / RECORDS, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)
