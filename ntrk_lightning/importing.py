"""Resolving user-given import paths (``"package.module:attr"``) with errors that say what failed."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(target: str, what: str = "object") -> Any:
    """``"package.module:attr.sub"`` (or ``"package.module.attr"``) -> the object.

    ``what`` names the role of the target in error messages (e.g. ``"reward target"``)."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"{what} must be an import path like 'package.module:name'")
    if ":" in target:
        mod_name, _, attr = target.partition(":")
    else:
        mod_name, _, attr = target.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"{what} {target!r} must look like 'package.module:name'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{what} {target!r}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {target!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
