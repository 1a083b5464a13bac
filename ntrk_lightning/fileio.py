"""Writing files so that readers never see half of one, reading JSON lines with errors that name
the line, and the project's cache folder.

Every file goes to a unique temporary name in the target folder and is then renamed into place:
concurrent writers (several ranks filling one cache) each produce a complete file and the last
rename wins, and a killed process leaves at most a ``.<name>.*.tmp`` file behind, never a
truncated output. The file is flushed to stable storage (``fsync``) before the rename and the
folder after it, so that after a power loss a name never points at empty or partial content
(cluster file systems commit metadata and data separately).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ntrk_lightning.jsonnum import plain as json_safe  # noqa: F401  (the one JSON/number helper)

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what open() would
        _fsync_path(tmp)  # the content is durable before any name points at it
        os.replace(tmp, path)
        _fsync_path(str(path.parent))  # ...and so is the rename itself
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _fsync_path(path: str) -> None:
    """``fsync`` a file or folder by path (folders: where the OS allows opening them).
    ``NTRK_FSYNC=0`` skips it (scratch runs on a local disk; about 15 ms per file on a busy VM)."""
    if os.environ.get("NTRK_FSYNC", "1") == "0":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. folders on Windows cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on folders
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, _write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """JSON with non-finite floats written as ``null`` (strict JSON readers reject NaN)."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent) + "\n")


def read_jsonl(path: PathLike, error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (blank lines skipped); ``error`` is raised, naming the
    file and line, for an unreadable file, invalid JSON or a line that is not an object."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}, line {i}: expected a JSON object")
        rows.append(row)
    return rows


class WeightsFileError(ValueError):
    """A weights file that is missing, truncated or not in the expected format; the message names
    the file and says how to get a good copy."""


def load_safetensors(path: PathLike, hint: str = "", what: str = "weights file") -> dict[str, Any]:
    """``safetensors.torch.load_file`` with a one-line :class:`WeightsFileError` naming ``path``
    (and ``hint``: where a good copy comes from) for a missing, truncated or corrupt file."""
    from safetensors.torch import load_file

    path = Path(path)
    suffix = f" {hint}" if hint else ""
    if not path.is_file():
        raise WeightsFileError(f"{what} not found: {path}.{suffix}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsFileError(f"{what} {path} is truncated or corrupt ({type(e).__name__}: {reason}); "
                               f"replace it with a good copy.{suffix}") from None


def safetensors_metadata(path: PathLike, hint: str = "", what: str = "weights file") -> dict[str, str]:
    """The metadata header of a safetensors file, with the same one-line errors as
    :func:`load_safetensors`."""
    from safetensors import safe_open

    path = Path(path)
    suffix = f" {hint}" if hint else ""
    if not path.is_file():
        raise WeightsFileError(f"{what} not found: {path}.{suffix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsFileError(f"{what} {path} is truncated or corrupt ({type(e).__name__}: {reason}); "
                               f"replace it with a good copy.{suffix}") from None


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: PathLike, cache: Optional[PathLike] = None) -> dict[str, Any]:
    """``{"name", "bytes", "sha256"}`` of a file. Hashes of large files (weights) are remembered
    in ``<cache>/file_sha256.json`` keyed by (absolute path, size, mtime), so that a rerun does not
    read gigabytes again; any change of size or mtime hashes the file anew."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir(cache) / "file_sha256.json"
    known: dict[str, str] = {}
    if st.st_size >= (1 << 20):
        try:
            known = json.loads(store.read_text(encoding="utf-8"))
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}
    digest = known.get(key)
    if not isinstance(digest, str):
        digest = sha256_file(path)
        if st.st_size >= (1 << 20):
            known[key] = digest
            try:
                atomic_write_text(store, json.dumps(known, indent=0, sort_keys=True))
            except OSError:
                pass  # a read-only cache only costs the hashing time
    return {"name": path.name, "bytes": int(st.st_size), "sha256": digest}


def cache_dir(override: Optional[PathLike] = None) -> Path:
    """Where derived artefacts (fitted GMMs, classifiers, reference statistics) are cached:
    ``override``, else ``$NTRK_CACHE``, else ``~/.cache/ntrk_lightning``."""
    if override is not None:
        return Path(override)
    root = os.environ.get("NTRK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ntrk_lightning")
    return Path(root)
