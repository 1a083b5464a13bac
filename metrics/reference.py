"""Gaussian statistics (mean, covariance) of the features of a real image set, for FID.

Real statistics are computed once and cached, never recomputed per run: a generation run or an
``ntrk evaluate`` call only extracts features of its *generated* images. Sources:

* ``"digits"`` / ``"digits:R"`` — all 1797 real scikit-learn digits at resolution R (default 16),
  as ``ntrk_lightning.data.digits.real_images`` gives them; ``"digits:R:C"`` — only the real
  digits of class C (the reference for samples steered toward digit C);
* a folder of images (``metrics.images`` conventions);
* a statistics file written by :meth:`ReferenceStats.save` (used as is).

Cache files live in ``cache_dir`` (default ``$NTRK_CACHE`` or ``~/.cache/ntrk_lightning``), named
by a hash of the source (for a folder: its path and every file's name, size and mtime) and of the
feature extractor's identity (its spec and a digest of its weights), so a changed folder or
another extractor never reuses stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ntrk_lightning.fileio import atomic_write, cache_dir as default_cache_dir
from metrics.features import build_feature, extract, feature_identity, feature_name
from metrics.images import batches_by_shape, folder_fingerprint, list_images

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "ntrk-reference-stats/1"
_DIGITS = re.compile(r"^digits(?::(\d+))?(?::(\d))?$")


@dataclass
class ReferenceStats:
    """Feature mean (D,) and covariance (D, D) (unbiased, n - 1), both float64, of ``n`` real
    images under the extractor ``feature`` (its :func:`~metrics.features.feature_identity`)."""

    mean: Tensor
    cov: Tensor
    n: int
    feature: str
    source: str = ""

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean, dtype=torch.float64).reshape(-1).cpu()
        self.cov = torch.as_tensor(self.cov, dtype=torch.float64).cpu()
        d = self.mean.numel()
        if self.cov.shape != (d, d):
            raise ValueError(f"reference covariance has shape {tuple(self.cov.shape)}, expected ({d}, {d})")
        self.n = int(self.n)
        if self.n < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {self.n}")

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def feature_name(self) -> str:
        return self.feature.split("@", 1)[0]

    @classmethod
    def from_sums(cls, total: Tensor, outer: Tensor, n: int, feature: str, source: str = "") -> "ReferenceStats":
        """From running sums (sum of features, sum of outer products): the same estimator as
        torchmetrics' FID states, so a set compared with its own statistics gives FID ~ 0."""
        if n < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {n}")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        return cls(mean=mean, cov=cov, n=n, feature=feature, source=source)

    @classmethod
    def from_features(cls, features: Tensor, feature: str, source: str = "") -> "ReferenceStats":
        f = features.to(torch.float64).reshape(features.shape[0], -1)
        return cls.from_sums(f.sum(0), f.T @ f, f.shape[0], feature, source)

    def save(self, path: PathLike) -> Path:
        """Write a safetensors file (tensors ``mean``, ``cov``; metadata ``n``, ``feature``,
        ``source``) atomically."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "n": str(self.n), "feature": self.feature, "source": self.source}
        tensors = {"mean": self.mean.contiguous(), "cov": self.cov.contiguous()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: PathLike) -> "ReferenceStats":
        """Read a file written by :meth:`save`; a clear error for anything else."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")
        except Exception as e:
            raise ValueError(f"{path} is not a reference statistics file written by ReferenceStats.save "
                             f"({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown statistics format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(mean=mean, cov=cov, n=int(meta["n"]), feature=meta.get("feature", ""), source=meta.get("source", ""))


def _accumulate(feature: nn.Module, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor, int]:
    total: Optional[Tensor] = None
    outer: Optional[Tensor] = None
    n = 0
    for b in batches:
        f = extract(feature, b).cpu()
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        n += f.shape[0]
    if total is None or outer is None:
        raise ValueError("no images to compute reference statistics from")
    return total, outer, n


def _digits_source(m: "re.Match[str]") -> tuple[int, Optional[int], str]:
    """(resolution, class or None, canonical text) of a ``digits[:R[:C]]`` source."""
    res = int(m.group(1) or 16)
    cls = None if m.group(2) is None else int(m.group(2))
    return res, cls, f"digits:{res}" + ("" if cls is None else f":{cls}")


def _digit_batches(resolution: int, batch_size: int, cls: Optional[int] = None) -> Iterable[Tensor]:
    from ntrk_lightning.data.digits import real_images

    x, y = real_images(resolution)
    if cls is not None:
        x = x[y == cls]
    for s in range(0, len(x), batch_size):
        yield x[s:s + batch_size]


def describe_source(source: Union[str, PathLike]) -> str:
    """Canonical text of a reference source (``digits:16``, an absolute path)."""
    s = str(source)
    m = _DIGITS.match(s)
    if m and not Path(s).exists():
        return _digits_source(m)[2]
    return str(Path(s).resolve())


def check_reference_source(source: Union["ReferenceStats", str, PathLike]) -> None:
    """Cheap validation (no features computed): refuse a source that cannot work, early."""
    if isinstance(source, ReferenceStats):
        return
    s = str(source)
    m = _DIGITS.match(s)
    if m and not Path(s).exists():
        if int(m.group(1) or 16) < 8:
            raise ValueError(f"reference {s!r}: digits resolution must be >= 8")
        return
    p = Path(s)
    if p.is_dir():
        list_images(p)
        return
    if p.is_file():
        ReferenceStats.load(p)
        return
    raise FileNotFoundError(f"reference {s!r} is neither 'digits[:R[:C]]', a folder of images nor a statistics "
                            "file (none exists at that path)")


def reference_stats(source: Union["ReferenceStats", str, PathLike], feature: Union[nn.Module, str] = "inception",
                    cache_dir: Optional[PathLike] = None, batch_size: int = 256) -> ReferenceStats:
    """Real-set statistics under ``feature``, computed once and cached (see the module docstring).

    A statistics file (or a :class:`ReferenceStats`) is returned as is after checking that it was
    made with the same extractor (same identity, or at least the same name and dimension when the
    file came from elsewhere); a mismatch is an error, never a silently wrong FID.
    """
    module = build_feature(feature)
    ident = feature_identity(module)
    if isinstance(source, ReferenceStats):
        return _checked(source, module, ident, "the given statistics")
    s = str(source)
    m = _DIGITS.match(s)
    p = Path(s)
    if m and not p.exists():
        res, cls, src = _digits_source(m)
        key_src: object = src
        batches = lambda: _digit_batches(res, batch_size, cls)  # noqa: E731
    elif p.is_dir():
        paths = list_images(p)
        src = str(p.resolve())
        key_src = {"folder": src, "files": folder_fingerprint(paths)}
        batches = lambda: batches_by_shape(paths, batch_size)  # noqa: E731
    elif p.is_file():
        return _checked(ReferenceStats.load(p), module, ident, str(p))
    else:
        raise FileNotFoundError(f"reference {s!r} is neither 'digits[:R[:C]]', a folder of images nor a statistics "
                                "file (none exists at that path)")
    key = hashlib.sha1(json.dumps({"source": key_src, "feature": ident, "v": 1}, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{feature_name(module)}-{Path(src).name or src}").strip("-")[:60]
    path = default_cache_dir(cache_dir) / f"refstats-{slug}-{key}.safetensors"
    if path.is_file():
        try:
            stats = ReferenceStats.load(path)
            if stats.feature == ident:
                return stats
        except (ValueError, FileNotFoundError):
            pass  # unreadable cache entry: recompute and overwrite
    total, outer, n = _accumulate(module, batches())
    stats = ReferenceStats.from_sums(total, outer, n, feature=ident, source=src)
    try:
        stats.save(path)
    except OSError:
        pass  # a read-only cache only costs time
    return stats


def _checked(stats: ReferenceStats, module: nn.Module, ident: str, what: str) -> ReferenceStats:
    d = getattr(module, "num_features", None)
    if d is not None and int(d) != stats.dim:
        raise ValueError(f"{what}: reference statistics have {stats.dim} features but the extractor "
                         f"{feature_name(module)!r} gives {int(d)}")
    if stats.feature and stats.feature != ident and stats.feature_name != feature_name(module):
        raise ValueError(f"{what}: reference statistics were computed with feature {stats.feature_name!r}, "
                         f"but FID uses {feature_name(module)!r}; recompute them with that feature")
    if stats.feature and stats.feature != ident:
        import warnings

        warnings.warn(f"{what}: reference statistics were computed with {stats.feature}, the extractor is {ident} "
                      "(same name, other weights); FID may not be comparable", stacklevel=3)
    return stats
