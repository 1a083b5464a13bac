"""Numbers in and out of the run files' JSON: one set of helpers for the writer, ``ntrk evaluate``,
``ntrk report`` and the metrics.

Strict JSON has no NaN or infinity: a value that is not finite is written as ``null`` and read
back as NaN. Tensors and numpy scalars become Python numbers, dict keys strings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


def finite_or_none(v: Any) -> Optional[float]:
    """A number (Python, numpy or 0-dim tensor) as a float, or ``None`` when it is missing, not a
    number, NaN or infinite. A ``{"overall": x, ...}`` summary (diversity) gives its ``overall``."""
    if isinstance(v, dict):
        v = v.get("overall")
    if v is None or isinstance(v, (bool, str)):
        return None
    if hasattr(v, "item"):
        v = v.item()
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def nan_if_none(v: Any) -> float:
    """A value read from JSON as a float, ``null`` as NaN."""
    return math.nan if v is None else float(v)


def plain(v: Any) -> Any:
    """``v`` with tensors as Python numbers or lists, dict keys as strings and non-finite floats
    as ``None``: what strict JSON can hold."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return plain(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def mean_or_none(values: list[Any]) -> Optional[float]:
    """Mean of the values that are numbers (``None`` entries skipped); ``None`` when there are none."""
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dumps_line(obj: Any) -> str:
    """One JSON-lines line (``plain`` first), newline included."""
    return json.dumps(plain(obj)) + "\n"
