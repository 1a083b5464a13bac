"""Writing files so that readers never see half of one, reading JSON lines with errors that name
the line, and the project's cache folder.

Every file goes to a unique temporary name in the target folder and is then renamed into place:
concurrent writers (several ranks filling one cache) each produce a complete file and the last
rename wins, and a killed process leaves at most a ``.<name>.*.tmp`` file behind, never a
truncated output.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

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
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


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


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: non-finite floats become ``None``, tensors and
    numpy scalars become Python numbers, dict keys become strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # tensors, numpy
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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


def cache_dir(override: Optional[PathLike] = None) -> Path:
    """Where derived artefacts (fitted GMMs, classifiers, reference statistics) are cached:
    ``override``, else ``$NTRK_CACHE``, else ``~/.cache/ntrk_lightning``."""
    if override is not None:
        return Path(override)
    root = os.environ.get("NTRK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ntrk_lightning")
    return Path(root)
