"""Where a run's files live, what a record holds, and how both are written (docs/run_format.md).

Every file is written to a temporary name in the same folder and renamed into place, so readers
(and a rerun after a kill) only ever see complete files. A sample counts as finished when its
JSON record exists and checks out against its PNG (size and sha256, or the stat signature of
both files in its record-shard line, :mod:`.run`); the record is
written after its PNG, so a finished sample always has both. A sample whose final image is not
finite gets no PNG and no record but a ``<stem>.failed.json`` marker, and is generated again by
the next run.

Images are sharded in two levels, ``images/<arm>/p<first>-<last>/s<first>-<last>/<stem>.{png,json}``:
a prompt group of :data:`SHARD_PROMPTS` prompts, then a sample group of :data:`SHARD_SAMPLES`
sample indices (two files per sample), so that no folder holds more than ten thousand entries up
to 500,000 prompts and 1,000,000 samples per prompt. Folders written before sharding (``images/<arm>/
<stem>.*``, "flat") are still read; new samples always go to the sharded layout.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from torch import Tensor

from ntrk_lightning.fileio import atomic_write_bytes, atomic_write_text, json_safe
from ntrk_lightning.jsonnum import dumps_line

from ntrk_lightning.runfiles import (FAILED, IMAGES, LOCK, METRICS, RECORD_SHARDS, RECORDS, REPORT,  # noqa: F401
                                     RUN_JSON, STATES)

#: a prompt-group folder holds this many consecutive prompts...
SHARD_PROMPTS = 50
#: ...and each of its sample-group folders this many consecutive sample indices of them (PNG +
#: record each: <= 10,000 files)
SHARD_SAMPLES = 100

_STEM = re.compile(r"^p(\d{5,})_s(\d{5,})$")
_PROMPT_GROUP = re.compile(r"^p\d{5,}-\d{5,}$")
_SAMPLE_GROUP = re.compile(r"^s\d{5,}-\d{5,}$")
_ARM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FAILED_SUFFIX = ".failed.json"

Key = tuple[str, int, int]  # (arm, prompt index, sample index)


def stem(prompt_index: int, sample_index: int) -> str:
    return f"p{prompt_index:05d}_s{sample_index:05d}"


def key(arm: str, prompt_index: int, sample_index: int) -> str:
    return f"{arm}/{stem(prompt_index, sample_index)}"


def shard(prompt_index: int, sample_index: int) -> str:
    """The shard folder of a sample below ``images/<arm>``: ``p<first>-<last>/s<first>-<last>``."""
    p0 = prompt_index // SHARD_PROMPTS * SHARD_PROMPTS
    s0 = sample_index // SHARD_SAMPLES * SHARD_SAMPLES
    return f"p{p0:05d}-{p0 + SHARD_PROMPTS - 1:05d}/s{s0:05d}-{s0 + SHARD_SAMPLES - 1:05d}"


def sample_dir(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    return out / IMAGES / arm / shard(prompt_index, sample_index)


def image_path(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    return sample_dir(out, arm, prompt_index, sample_index) / f"{stem(prompt_index, sample_index)}.png"


def record_path(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    return sample_dir(out, arm, prompt_index, sample_index) / f"{stem(prompt_index, sample_index)}.json"


def failed_path(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    return sample_dir(out, arm, prompt_index, sample_index) / f"{stem(prompt_index, sample_index)}{FAILED_SUFFIX}"


def find_record(out: Path, arm: str, prompt_index: int, sample_index: int) -> Path:
    """The record file of a sample: sharded, else flat (a folder from before sharding)."""
    path = record_path(out, arm, prompt_index, sample_index)
    if path.is_file():
        return path
    return out / IMAGES / arm / f"{stem(prompt_index, sample_index)}.json"


def check_arm_name(arm: str) -> str:
    if not _ARM.fullmatch(arm):
        raise ValueError(f"arm name {arm!r} must be letters, digits, '_', '.', '-' (it names a folder)")
    return arm


# ---- the record: one schema, built here only --------------------------------------------------

def base_record(arm: str, prompt_index: int, prompt: str, sample_index: int, seed: int,
                sampler: dict[str, Any], num_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields every record and every failure marker share (docs/run_format.md): the sample's
    identity, and the arm's sampler and steps."""
    ident = {"arm": arm, "key": key(arm, prompt_index, sample_index), "prompt_index": prompt_index,
             "prompt": prompt, "sample_index": sample_index, "seed": seed}
    return ident, {"sampler": sampler, "num_steps": num_steps}


def build_record(arm: str, prompt_index: int, prompt: str, sample_index: int, seed: int, sampler: dict[str, Any],
                 num_steps: int, rewards: dict[str, Optional[float]], nfe: int, grad_evals: int,
                 nan_fallbacks: int, seconds: float, rank: int) -> dict[str, Any]:
    """The record of a finished sample (the writer adds ``png_bytes`` and ``png_sha256``)."""
    ident, spec = base_record(arm, prompt_index, prompt, sample_index, seed, sampler, num_steps)
    return {**ident, "image": str(image_path(Path("."), arm, prompt_index, sample_index)), **spec,
            "rewards": rewards, "nfe": nfe, "grad_evals": grad_evals, "nan_fallbacks": nan_fallbacks,
            "seconds": seconds, "rank": rank}


def build_failed_record(arm: str, prompt_index: int, prompt: str, sample_index: int, seed: int,
                        sampler: dict[str, Any], num_steps: int, nan_values: int, inf_values: int,
                        values: int, rank: int) -> dict[str, Any]:
    """The marker of a sample whose final image is not finite."""
    ident, spec = base_record(arm, prompt_index, prompt, sample_index, seed, sampler, num_steps)
    return {**ident, **spec, "failed": "non-finite final image", "nan_values": nan_values,
            "inf_values": inf_values, "values": values, "rank": rank}


def record_key(rec: dict[str, Any]) -> Key:
    return (str(rec["arm"]), int(rec["prompt_index"]), int(rec["sample_index"]))


# ---- images ------------------------------------------------------------------------------------

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


def read_image_u8(path: Path) -> Tensor:
    """A saved PNG back as a (C, H, W) uint8 tensor."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        arr = np.array(img)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


# ---- writing -----------------------------------------------------------------------------------

def write_sample(out: Path, record: dict[str, Any], image_u8: Tensor) -> tuple[str, str]:
    """PNG first, then the record that marks the sample finished; the record gains the PNG's
    ``png_bytes`` and ``png_sha256`` (checked on resume). Returns the record's JSON text (as in
    the record file and ``records.jsonl``) and its shard line (with the files' stat signature)."""
    import hashlib

    arm, p, s = record_key(record)
    data = png_bytes(image_u8)
    record["png_bytes"], record["png_sha256"] = len(data), hashlib.sha256(data).hexdigest()
    png, rec = image_path(out, arm, p, s), record_path(out, arm, p, s)
    text = json.dumps(json_safe(record))
    atomic_write_bytes(png, data)
    atomic_write_text(rec, text + "\n")
    fp = failed_path(out, arm, p, s)
    if fp.exists():  # an earlier run's failure of this sample is now superseded
        fp.unlink(missing_ok=True)
    return text, shard_line(text, stat_signature(str(png), str(rec)))


def write_failed(out: Path, record: dict[str, Any]) -> None:
    """Mark a sample failed (no PNG, no record): counted in the metrics, generated again later."""
    arm, p, s = record_key(record)
    atomic_write_text(failed_path(out, arm, p, s), json.dumps(json_safe(record)) + "\n")


# ---- record shards -----------------------------------------------------------------------------
#
# A shard line is a record's JSON text (byte for byte its ``records.jsonl`` line) with one more
# field at the end, the *stat signature* of its two files: ``"files": [PNG size, PNG mtime_ns,
# record size, record mtime_ns]`` taken right after both were written (the idea of git's index and
# rsync's quick check). A resume that finds a sample's files with the same signature accepts the
# shard's record without reading the record file or hashing the PNG; any write to either file
# through the file system (truncation, an empty file after a power loss, a rewrite, a flipped
# byte) changes its size or mtime, and then the full check runs. What a signature cannot see is
# a change that keeps size and mtime: silent media corruption, or a same-size rewrite within one
# timestamp tick of the original write; ``NTRK_FULL_CHECK=1`` checks every sample in full.

#: the stat-signature field of a shard line (always its last field)
SIGNATURE = "files"
_SIGNATURE_SEP = f', "{SIGNATURE}": ['


def stat_signature(png: str, record: str) -> list[int]:
    """``[PNG size, PNG mtime_ns, record size, record mtime_ns]``; raises ``OSError`` if either is gone."""
    a, b = os.stat(png), os.stat(record)
    return [a.st_size, a.st_mtime_ns, b.st_size, b.st_mtime_ns]


def shard_line(record_text: str, signature: Optional[Sequence[int]]) -> str:
    """The shard line of a record's JSON text (an object) and its files' signature."""
    if signature is None:
        return record_text + "\n"
    return f"{record_text[:-1]}{_SIGNATURE_SEP}{', '.join(str(int(v)) for v in signature)}]}}\n"


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append shard lines (:func:`shard_line`) to a JSON-lines shard (one writer per file: a
    rank) and flush them to disk. A kill can leave a partial last line, which readers skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        if os.environ.get("NTRK_FSYNC", "1") != "0":
            os.fsync(f.fileno())


class ShardEntry(NamedTuple):
    record: dict[str, Any]
    #: the record's JSON text, its ``records.jsonl`` line (without the newline)
    text: str
    #: the stat signature of its files, ``None`` for a line without one
    signature: Optional[list[int]]


def _shard_objects(lines: list[str]) -> list[Any]:
    """The JSON values of ``lines`` (one parse for the whole shard; line by line, with
    unparsable lines as ``None``, when some line is damaged)."""
    try:
        return json.loads("[" + ",".join(lines) + "]")
    except ValueError:
        pass
    objs: list[Any] = []
    for line in lines:
        try:
            objs.append(json.loads(line))
        except ValueError:
            objs.append(None)
    return objs


def read_shard(path: Path) -> list[ShardEntry]:
    """The entries of one record shard, in order, skipping lines a kill left unfinished."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    lines = [ln for ln in text.split("\n") if ln]
    entries = []
    for line, obj in zip(lines, _shard_objects(lines)):
        if obj.__class__ is not dict:
            continue
        sig = obj.pop(SIGNATURE, None)
        if sig.__class__ is list and len(sig) == 4:
            entries.append(ShardEntry(obj, line[: line.rindex(_SIGNATURE_SEP)] + "}", sig))
        else:
            entries.append(ShardEntry(obj, line, None))
    return entries


def read_shards(out: Path) -> dict[Key, ShardEntry]:
    """Every record the run folder's shards hold, by key; a later shard (by name: run ids start
    with their time) wins over an earlier one."""
    index: dict[Key, ShardEntry] = {}
    folder = out / RECORD_SHARDS
    if not folder.is_dir():
        return index
    for path in sorted(folder.glob("*.jsonl")):
        for entry in read_shard(path):
            rec = entry.record
            # the key as JSON gave it: a record with odd types matches no listed file (full check)
            index[(rec.get("arm"), rec.get("prompt_index"), rec.get("sample_index"))] = entry  # type: ignore[index]
    return index


def write_records_jsonl(out: Path, lines: Sequence[str]) -> int:
    """Rewrite ``records.jsonl`` (atomically) from the records' JSON texts (no re-encoding: a
    byte copy of what the shards and this run hold); returns the count."""
    atomic_write_text(out / RECORDS, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def write_failed_jsonl(out: Path, failed: Sequence[dict[str, Any]]) -> None:
    """``failed.jsonl`` with the failure markers, or no such file when nothing failed."""
    path = out / FAILED
    if failed:
        atomic_write_text(path, "".join(json.dumps(json_safe(r)) + "\n" for r in failed))
    elif path.exists():
        path.unlink()


# ---- reading what a folder holds (sharded and flat layouts) -------------------------------------

def _subfolders(folder: Path, pattern: "re.Pattern[str]") -> tuple[list[Path], bool]:
    """(subfolders whose name matches, whether ``folder`` itself holds sample files)."""
    found, files = [], False
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_dir() and pattern.match(entry.name):
                found.append(folder / entry.name)
            elif not files and entry.name.startswith("p") and entry.name.endswith(".json"):
                files = True
    return sorted(found), files


def _sample_folders(out: Path, arm: str) -> list[Path]:
    """The arm's shard folders, and the arm folder itself when it holds flat (older) samples."""
    folder = out / IMAGES / arm
    if not folder.is_dir():
        return []
    groups, flat = _subfolders(folder, _PROMPT_GROUP)
    shards = [s for g in groups for s in _subfolders(g, _SAMPLE_GROUP)[0]]
    return ([folder] if flat else []) + shards


def locate_records(out: Path, arms: Sequence[str]) -> dict[Key, str]:
    """(arm, prompt, sample) -> path of the record without its ``.json`` suffix (a string; add
    ``.png`` for the image) of every sample with a record, not yet checked (see
    :func:`ntrk_lightning.pipeline.run.verify_finished`); a sharded record wins over a flat one.
    Names are split with string methods, not a regular expression: this runs once per file."""
    found: dict[Key, str] = {}
    for arm in arms:
        for folder in _sample_folders(out, arm):
            base = f"{folder}{os.sep}"
            for name in os.listdir(folder):
                if not name.endswith(".json") or name[0] != "p":
                    continue
                name = name[:-5]
                cut = name.find("_s")
                p, s = name[1:cut], name[cut + 2:]
                # p00000_s00000: ASCII digits, five or more each (a .failed marker has none)
                if cut >= 6 and len(s) >= 5 and p.isdigit() and s.isdigit() and name.isascii():
                    found[(arm, int(p), int(s))] = base + name
    return found


def _failure_markers(out: Path, arms: Sequence[str]) -> Iterator[tuple[Key, Path]]:
    for arm in arms:
        for folder in _sample_folders(out, arm):
            # a cheap string test per file; the regular expression only for the (rare) markers
            for name in [n for n in os.listdir(folder) if n.endswith(FAILED_SUFFIX)]:
                m = _STEM.match(name[: -len(FAILED_SUFFIX)])
                if m:
                    yield (arm, int(m.group(1)), int(m.group(2))), folder / name


def iter_failed(out: Path, arms: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Failure markers of ``arms`` (unreadable ones skipped), in (arm, prompt, sample) order."""
    for _, path in sorted(_failure_markers(out, arms)):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            yield rec


def remove_failed(out: Path, arms: Sequence[str], keys: set[Key]) -> int:
    """Delete the failure markers of ``keys`` (they are about to be generated again)."""
    n = 0
    for k, path in list(_failure_markers(out, arms)):
        if k in keys:
            path.unlink(missing_ok=True)
            n += 1
    return n


def remove_stale_temporaries(out: Path, arms: Sequence[str]) -> int:
    """Delete temporary files a killed run left behind (call before any process writes)."""
    n = 0
    folders = [out, out / STATES] + [f for arm in arms for f in _sample_folders(out, arm)]
    for folder in folders:
        if folder.is_dir():
            for name in [m for m in os.listdir(folder) if m.startswith(".") and m.endswith(".tmp")]:
                try:
                    os.unlink(folder / name)
                    n += 1
                except OSError:
                    pass
    return n
