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
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np
from torch import Tensor

from ntrk_lightning.fileio import atomic_write_bytes, atomic_write_text, json_safe
from ntrk_lightning.jsonnum import dumps_line

from ntrk_lightning.runfiles import (FAILED, IMAGES, LOCK, METRICS, RECORD_SHARDS, RECORDS, RECORDS_INDEX,  # noqa: F401
                                     REPORT, RUN_JSON, STATES)

#: a prompt-group folder holds this many consecutive prompts...
SHARD_PROMPTS = 50
#: ...and each of its sample-group folders this many consecutive sample indices of them (PNG +
#: record each: <= 10,000 files)
SHARD_SAMPLES = 100

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


def _shard_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [ln for ln in text.split("\n") if ln]


def read_shard(path: Path) -> list[ShardEntry]:
    """The entries of one record shard, in order, skipping lines a kill left unfinished."""
    lines = _shard_lines(path)
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


def shard_files(out: Path, after: Optional[str] = None) -> list[Path]:
    """The record shards of a run folder in name order (run ids and check stamps start with their
    time: later names hold later writes); with ``after``, only those named after it."""
    folder = out / RECORD_SHARDS
    if not folder.is_dir():
        return []
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jsonl") and not n.startswith("."))
    return [folder / n for n in names if after is None or n > after]


def read_shards(out: Path, after: Optional[str] = None) -> dict[Key, ShardEntry]:
    """Every record the run folder's shards (named after ``after``, if given) hold, by key; a
    later shard wins over an earlier one."""
    index: dict[Key, ShardEntry] = {}
    for path in shard_files(out, after):
        for entry in read_shard(path):
            rec = entry.record
            # the key as JSON gave it: a record with odd types matches no listed file (full check)
            index[(rec.get("arm"), rec.get("prompt_index"), rec.get("sample_index"))] = entry  # type: ignore[index]
    return index


# ---- the shard index: what a resume needs of each line, without decoding the record ------------

class IndexEntry(NamedTuple):
    """What a resume needs of a shard line (:func:`read_shard_index`)."""

    #: the stat signature as written, ``"<PNG size>, <PNG mtime_ns>, <record size>, <record mtime_ns>"``
    signature: Optional[str]
    png_sha256: Optional[str]
    #: the record's ``image`` path
    image: Optional[str]
    #: the record names its own key's prompt and sample index and the requested prompt text
    consistent: bool
    #: name of the shard file the line came from
    source: str


# the head and the tail of a shard line as write_sample writes it, each found over a whole shard
# file in one pass (both start with a literal, which the regular-expression engine searches for
# at C speed); head groups: arm, prompt, sample (as in the key), prompt_index, prompt (JSON),
# sample_index, image; tail groups: png_sha256, signature
_HEAD = re.compile(r'\{"arm": "([A-Za-z0-9_.-]+)", "key": "\1/p(\d{5,})_s(\d{5,})", "prompt_index": (\d+), '
                   r'"prompt": ("(?:[^"\\\n]|\\.)*"), "sample_index": (\d+), "seed": \d+, "image": "([^"\\\n]*)", ')
_TAIL = re.compile(r'"png_sha256": "([0-9a-f]{64})", "files": \[(\d+, \d+, \d+, \d+)\]\}(?:\n|$)')
_SHA_FIELD = '"png_sha256": "'
_SHA_LEN = 64


def _entry(*fields: Any) -> IndexEntry:
    return tuple.__new__(IndexEntry, fields)  # a NamedTuple without its Python-level __new__


def _index_fast(line: str, source: str, prompt_json: Sequence[str]) -> Optional[tuple[Key, IndexEntry]]:
    """The index entry of a shard line in the form :func:`write_sample` writes (a record built by
    :func:`build_record`, ``json.dumps`` defaults, the signature last), read with the head
    expression :func:`_index_bulk` uses and string slicing (a tail without a checksum is
    allowed here); ``None`` for any other form (decoded as JSON then).
    Sound because a JSON string escapes every ``"`` it holds: the field separators matched (a bare
    quote after a comma or a space) cannot occur inside a value."""
    m = _HEAD.match(line)
    if m is None or not line.endswith("]}"):
        return None
    arm, p_text, s_text, pi, prompt, si, image = m.groups()
    p, s = int(p_text), int(s_text)
    k = (arm, p, s)
    j = line.rfind(_SIGNATURE_SEP)
    # the requested prompt, byte for byte as json.dumps writes it, and the key's own indices
    if p >= len(prompt_json) or int(pi) != p or int(si) != s or prompt != prompt_json[p] or j < 0:
        return k, _entry(None, None, None, False, source)
    sha_at = j - 1 - _SHA_LEN
    sha = line[sha_at:j - 1] if line[j - 1] == '"' and line.startswith(_SHA_FIELD, sha_at - len(_SHA_FIELD)) else None
    return k, _entry(line[j + len(_SIGNATURE_SEP):-2], sha, image, True, source)


def _index_decoded(line: str, source: str, prompts: Sequence[str]) -> Optional[tuple[Key, IndexEntry]]:
    """The index entry of any other shard line, decoded as JSON (``None`` when unusable)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if rec.__class__ is not dict:
        return None
    sig = rec.pop(SIGNATURE, None)
    arm, p, s = rec.get("arm"), rec.get("prompt_index"), rec.get("sample_index")
    if not (isinstance(arm, str) and type(p) is int and type(s) is int):
        return None
    consistent = rec.get("key") == key(arm, p, s) and p < len(prompts) and rec.get("prompt", "") == prompts[p]
    signature = (", ".join(str(v) for v in sig) if sig.__class__ is list and len(sig) == 4
                 and all(type(v) is int for v in sig) else None)
    sha, image = rec.get("png_sha256"), rec.get("image")
    return (arm, p, s), IndexEntry(signature, sha if isinstance(sha, str) else None,
                                   image if isinstance(image, str) else None, consistent, source)


def _index_bulk(text: str, source: str, prompt_json: Sequence[str], index: dict[Key, IndexEntry]) -> bool:
    """Add the entries of a shard file's text when every line of it has the writer's form: one
    head and one tail per line, the head at the line's start and the tail at its end (two
    regular-expression passes over the file, then a few operations per line); ``False``, adding
    nothing, when some line does not (the file is then read line by line)."""
    heads, tails = list(_HEAD.finditer(text)), _TAIL.findall(text)
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    if not (len(heads) == len(tails) == lines):
        return False
    # a tail ends its line, so each line has one; a head must start its line (then each has one)
    if any(text[h.start() - 1] != "\n" for h in heads[1:]) or (heads and heads[0].start() != 0):
        return False
    n_prompts, new = len(prompt_json), tuple.__new__
    for h, (sha, sig) in zip(heads, tails):
        arm, p, s, pi, prompt, si, image = h.groups()
        ip, i_s = int(p), int(s)
        ok = ip < n_prompts and int(pi) == ip and int(si) == i_s and prompt == prompt_json[ip]
        index[(arm, ip, i_s)] = new(IndexEntry, (sig, sha, image, True, source) if ok else (None, None, None, False, source))
    return True


def read_shard_index(out: Path, prompts: Sequence[str]) -> dict[Key, IndexEntry]:
    """key -> :class:`IndexEntry` of every line of the folder's record shards (a later shard wins),
    for the requested prompt list. A file whose lines all have the writer's form is read in one
    regular-expression pass (:func:`_index_bulk`, about a microsecond per line, no record
    decoded); any other file line by line, with string methods where a line has that form and as
    JSON where not; unusable lines (a kill's partial last line) are skipped."""
    prompt_json = [json.dumps(p) for p in prompts]
    index: dict[Key, IndexEntry] = {}
    for path in shard_files(out):
        name = path.name
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if _index_bulk(text, name, prompt_json, index):
            continue
        for line in (ln for ln in text.split("\n") if ln):
            hit = _index_fast(line, name, prompt_json) or _index_decoded(line, name, prompts)
            if hit is not None:
                index[hit[0]] = hit[1]
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


class FolderScan(NamedTuple):
    """What the sample folders of a run hold (:func:`scan_sample_folders`)."""

    #: (arm, prompt, sample) -> path of the record without its ``.json`` suffix (a string; add
    #: ``.png`` for the image), not yet checked; a sharded record wins over a flat one
    records: dict[Key, str]
    #: (arm, prompt, sample) -> path of its failure marker
    failed: dict[Key, str]
    #: temporary files a killed run left behind (in the sample folders, the run folder, the states)
    temporaries: list[str]


def _split_stem(name: str) -> Optional[tuple[int, int]]:
    """(prompt, sample) of ``p00000_s00000`` (ASCII digits, five or more each), else ``None``."""
    cut = name.find("_s")
    p, s = name[1:cut], name[cut + 2:]
    if cut >= 6 and len(s) >= 5 and p.isdigit() and s.isdigit() and name.isascii():
        return int(p), int(s)
    return None


# sample file names in a folder listing joined by newlines (one C pass per folder)
_RECORD_NAMES = re.compile(r"^p(\d{5,})_s(\d{5,})\.json$", re.M | re.A)
_FAILED_NAMES = re.compile(r"^(p\d{5,}_s\d{5,})\.failed\.json$", re.M | re.A)
_TEMP_NAMES = re.compile(r"^\.[^\n]*\.tmp$", re.M)


def scan_sample_folders(out: Path, arms: Sequence[str]) -> FolderScan:
    """One listing of every sample folder of ``arms`` (sharded and flat): records, failure markers
    and stale temporaries. Each folder's names are matched in one regular-expression pass over
    the listing (this runs once per file of the run)."""
    records: dict[Key, str] = {}
    failed: dict[Key, str] = {}
    temporaries: list[str] = []
    for folder in [out, out / STATES]:
        if folder.is_dir():
            temporaries += [str(folder / n) for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")]
    for arm in arms:
        for folder in _sample_folders(out, arm):
            base = f"{folder}{os.sep}"
            listing = "\n".join(os.listdir(folder))
            for p, s in _RECORD_NAMES.findall(listing):
                records[(arm, int(p), int(s))] = f"{base}p{p}_s{s}"
            for name in _FAILED_NAMES.findall(listing):
                ps = _split_stem(name)
                if ps is not None:
                    failed[(arm, ps[0], ps[1])] = f"{base}{name}{FAILED_SUFFIX}"
            temporaries += [base + name for name in _TEMP_NAMES.findall(listing)]
    return FolderScan(records, failed, temporaries)


def remove_files(paths: Iterable[str]) -> int:
    """Delete files (stale temporaries, superseded failure markers); returns how many went."""
    n = 0
    for path in paths:
        try:
            os.unlink(path)
            n += 1
        except OSError:
            pass
    return n


def read_failed(paths: Iterable[str]) -> list[dict[str, Any]]:
    """The failure markers at ``paths`` (missing or unreadable ones skipped)."""
    out = []
    for path in paths:
        try:
            rec = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
