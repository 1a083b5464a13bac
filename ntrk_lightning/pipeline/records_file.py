"""``records.jsonl`` kept in step with the run folder at a cost that does not grow with the
samples earlier runs finished.

``records.jsonl`` holds one line per finished sample of the request. Rewriting it at the end of
every run would copy every earlier record (half a gigabyte at a million samples), so a run
*appends* the lines of the samples that are new since the file was last written, when it can
prove the file still describes the folder; otherwise it rewrites the file from the record shards.

The proof is ``records.index.json``, written right after ``records.jsonl``: the file's size and
mtime_ns, how many records it holds, an order-independent digest of their keys (the sum of a
64-bit hash of each key, so the digest of a union of disjoint sets is the sum of their digests),
and ``shards_through``, the newest record shard that existed then. A resume appends when
``records.jsonl`` still has that size and mtime and the finished samples it accepted from shards
up to ``shards_through`` are exactly the indexed set (same count and digest); the samples found
in later shards (a killed run's, a full check's) and the ones this run generates are appended.
Anything else (a damaged sample deleted, a changed request, an edited or missing file, a folder
from an older version) rewrites the file in full, sorted by (arm, prompt, sample). An appended
block is sorted the same way, so the file is sorted within each run's block.

An append is not atomic: a kill during it can leave a partial last line. The size check then
fails and the next run rewrites the file; readers skip a partial last line.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

from ntrk_lightning.fileio import atomic_write_json
from ntrk_lightning.pipeline import layout

_MASK = (1 << 64) - 1


def key_text(k: layout.Key) -> str:
    """A sample key as text, ``<arm>/p<prompt:05d>_s<sample:05d>`` (``layout.key``)."""
    return f"{k[0]}/p{k[1]:05d}_s{k[2]:05d}"


def text_hash(text: str) -> int:
    """A 64-bit hash of a key's text, the same in every process (CRC-32 and Adler-32)."""
    data = text.encode()
    return (zlib.crc32(data) << 32) | zlib.adler32(data)


def key_hash(k: layout.Key) -> int:
    return text_hash(key_text(k))


def key_digest(keys: Iterable[layout.Key]) -> int:
    """Order-independent digest of a set of keys: the sum of their :func:`key_hash` mod 2**64."""
    return sum(map(key_hash, keys)) & _MASK


class Synced(NamedTuple):
    """What ``records.index.json`` says ``records.jsonl`` held, when the file is still that file."""

    count: int
    digest: int
    shards_through: Optional[str]


def read_synced(out: Path) -> Optional[Synced]:
    """The index of ``records.jsonl``, or ``None`` when either file is missing, unreadable, or
    ``records.jsonl`` no longer has the size and mtime the index recorded."""
    try:
        idx = json.loads((out / layout.RECORDS_INDEX).read_text(encoding="utf-8"))
        st = os.stat(out / layout.RECORDS)
        if [st.st_size, st.st_mtime_ns] != [idx["bytes"], idx["mtime_ns"]]:
            return None
        return Synced(int(idx["count"]), int(idx["digest"]), idx.get("shards_through"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


class Plan(NamedTuple):
    """How the end of a run brings ``records.jsonl`` up to date (decided at resume, rank 0)."""

    #: append the new lines (else rewrite the whole file)
    append: bool
    #: finished samples found at resume (count and digest)
    count: int
    digest: int
    #: finished samples to append besides this run's (found in shards after ``shards_through``)
    fresh: list[layout.Key]
    #: the shards already reflected in ``records.jsonl`` (append mode)
    shards_through: Optional[str]
    #: every finished sample found at resume (what a rewrite writes besides this run's)
    finished: list[layout.Key]


def plan(synced: Optional[Synced], finished: dict[layout.Key, str], fresh: Sequence[layout.Key]) -> Plan:
    """Append when ``records.jsonl`` holds exactly the finished samples that are not ``fresh``
    (``finished``: every finished key with its :func:`key_text`, computed once by the caller)."""
    fresh_set = set(fresh)
    base = [t for k, t in finished.items() if k not in fresh_set]
    base_digest = sum(map(text_hash, base)) & _MASK
    total = (base_digest + key_digest(fresh_set)) & _MASK
    ok = synced is not None and synced.count == len(base) and synced.digest == base_digest
    return Plan(ok, len(finished), total, sorted(fresh_set) if ok else [],
                synced.shards_through if synced is not None else None, list(finished))


def append_lines(out: Path, lines: Sequence[str]) -> None:
    """Append record lines to ``records.jsonl`` in one write, flushed to disk."""
    if not lines:
        return
    with open(out / layout.RECORDS, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_index(out: Path, count: int, digest: int) -> None:
    """Record what ``records.jsonl`` now holds (call right after writing it)."""
    st = os.stat(out / layout.RECORDS)
    shards = layout.shard_files(out)
    atomic_write_json(out / layout.RECORDS_INDEX, {
        "count": int(count), "digest": int(digest) & _MASK, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
        "shards_through": shards[-1].name if shards else None}, indent=None)
