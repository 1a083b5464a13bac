"""Whitening operators W: map a vector onto the set of vectors that look like white Gaussian noise.

The main operator is the closed-form Euclidean projection

    W(v) = F^-1( B( F v ) )

where ``F`` is the orthonormal 2-D DFT over the spatial axes of every channel (identity for plain
vectors) and ``B`` rescales every block of coefficients so that its energy equals the energy white
N(0, I) noise has there in expectation: one unit per coefficient. Blocks are closed under
k -> -k, so scaling keeps Hermitian symmetry and the output real. Because each block is only
multiplied by a positive number, W is idempotent, invariant to positive scaling of v, and
<W(v), v> > 0 for v != 0.

Partitions (``kind``):

* ``"spectral"`` — square tiles of ``block`` x ``block`` frequencies (``block=1``: one block per
  conjugate pair of frequencies, a perfectly flat spectrum where only the phase carries signal);
  for (B, D) vectors, contiguous chunks of ``block`` coordinates.
* ``"radial"``   — rings of width ``block`` in radial frequency (images only).
* ``"sphere"``   — one global block per sample: the projection onto ||z|| = sqrt(d).
* ``"standardize"`` — ablation: per-sample zero mean, unit variance.
* ``"identity"`` — ablation: no whitening (NTRK then reduces to mean-shift guidance).

A block with no energy at all has no nearest point (every point of its sphere is equally near);
it gets the deterministic real coefficient 1 everywhere, which keeps the energy exact and the
output real.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

WhiteningKind = Literal["spectral", "radial", "sphere", "standardize", "identity"]
KINDS: tuple[str, ...] = ("spectral", "radial", "sphere", "standardize", "identity")
_ALIASES = {"global": "sphere", "none": "identity", "tiles": "spectral", "rings": "radial"}

# Energies below this (relative to the block size) count as "no energy": avoids dividing by ~0.
_TINY = 1e-30


def canonical_kind(kind: str) -> str:
    k = _ALIASES.get(kind, kind)
    if k not in KINDS:
        raise ValueError(f"unknown whitening kind {kind!r}; expected one of {KINDS + tuple(_ALIASES)}")
    return k


def whiten(v: Tensor, kind: str = "spectral", block: int = 1) -> Tensor:
    """Whiten ``v`` of shape (B, C, H, W) or (B, D), per sample. Returns a tensor of the same shape
    and dtype. See the module docstring for the kinds; ``block`` is the tile size (spectral) or the
    ring width (radial) and is ignored by the other kinds."""
    kind = canonical_kind(kind)
    if v.dim() not in (2, 4):
        raise ValueError(f"whiten expects (B, C, H, W) or (B, D), got shape {tuple(v.shape)}")
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if kind == "identity":
        return v
    if not v.is_floating_point():
        raise TypeError(f"whiten expects a floating tensor, got {v.dtype}")
    # FFTs need float32/float64 (CPU half FFTs are unsupported); cast back at the end.
    work = v if v.dtype in (torch.float32, torch.float64) else v.float()
    if kind == "sphere":
        out = _sphere(work)
    elif kind == "standardize":
        out = _standardize(work)
    elif v.dim() == 2:
        if kind == "radial":
            raise ValueError("radial blocks need spatial axes; use (B, C, H, W) input or kind='spectral'")
        out = _vector_blocks(work, int(block))
    else:
        out = _spectral(work, kind, int(block))
    return out.to(v.dtype)


def _sphere(v: Tensor) -> Tensor:
    flat = v.flatten(1)
    d = flat.shape[1]
    norm2 = flat.pow(2).sum(1, keepdim=True)
    ok = norm2 > _TINY
    scaled = flat * torch.sqrt(d / norm2.clamp_min(_TINY))
    fallback = torch.ones_like(flat)  # zero input: the constant vector of norm sqrt(d)
    return torch.where(ok, scaled, fallback).view_as(v)


def _standardize(v: Tensor) -> Tensor:
    flat = v.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True)
    return ((flat - mean) / std.clamp_min(1e-12)).view_as(v)


def _vector_blocks(v: Tensor, block: int) -> Tensor:
    b, d = v.shape
    labels = torch.arange(d, device=v.device) // block
    return _rescale_blocks(v, labels, int(labels.max()) + 1)


def _spectral(v: Tensor, kind: str, block: int) -> Tensor:
    h, w = v.shape[-2:]
    labels, n_blocks = block_labels(h, w, kind, block)
    coeffs = torch.fft.fft2(v, norm="ortho")
    flat = coeffs.flatten(-2)
    scaled = _rescale_blocks(flat, labels.to(v.device), n_blocks)
    return torch.fft.ifft2(scaled.view_as(coeffs), norm="ortho").real


def _rescale_blocks(c: Tensor, labels: Tensor, n_blocks: int) -> Tensor:
    """Rescale coefficients ``c`` (..., N) so each block (given by ``labels`` (N,)) has energy equal
    to its number of coefficients. Works for real and complex ``c``."""
    energy_elems = c.real.pow(2) + c.imag.pow(2) if c.is_complex() else c.pow(2)
    lead = energy_elems.shape[:-1]
    energy = torch.zeros(*lead, n_blocks, dtype=energy_elems.dtype, device=c.device)
    energy.scatter_add_(-1, labels.expand(*lead, -1), energy_elems)
    size = torch.bincount(labels, minlength=n_blocks).to(energy.dtype)
    empty = energy <= _TINY * size
    scale = torch.sqrt(size / energy.clamp_min(_TINY))
    per_elem_scale = scale.gather(-1, labels.expand(*lead, -1))
    per_elem_empty = empty.gather(-1, labels.expand(*lead, -1))
    return torch.where(per_elem_empty, torch.ones_like(c), c * per_elem_scale)


@lru_cache(maxsize=64)
def block_labels(h: int, w: int, kind: str, block: int) -> tuple[Tensor, int]:
    """Block id of every frequency of an h x w orthonormal DFT, flattened row-major.

    Raw blocks (tiles of the centred frequency grid, or radial rings) are merged with their mirror
    image under k -> -k (union-find over raw ids), so every returned block is closed under
    negation; a tile and its mirror hold conjugate coefficients, so together they carry b*b complex
    degrees of freedom. (The Nyquist row/column of even sizes is its own mirror up to the sign of
    the other axis, which merges a few edge tiles.)
    """
    ky = torch.arange(h)
    kx = torch.arange(w)
    fy = torch.where(ky < (h + 1) // 2, ky, ky - h)  # centred frequency, in [-h/2, h/2)
    fx = torch.where(kx < (w + 1) // 2, kx, kx - w)
    FY, FX = torch.meshgrid(fy, fx, indexing="ij")
    if kind == "spectral":
        # Tiles symmetric about the zero frequency: index sign(f) * ceil(|f| / b), so the DC
        # row/column are tiles of their own and negation maps tile n onto tile -n.
        ty = torch.sign(FY) * torch.div(FY.abs() + block - 1, block, rounding_mode="floor")
        tx = torch.sign(FX) * torch.div(FX.abs() + block - 1, block, rounding_mode="floor")
        span = 2 * (w // block + 2) + 1
        raw = (ty + span) * (2 * span + 1) + (tx + span)
    elif kind == "radial":
        # Radius in units of the shorter side's frequency spacing, so rings are circles in
        # normalised frequency also for non-square inputs.
        scale = min(h, w)
        r = torch.sqrt((FY.double() / h * scale) ** 2 + (FX.double() / w * scale) ** 2)
        raw = torch.floor(r / block).long()
    else:
        raise ValueError(f"no spectral partition for kind {kind!r}")
    raw = raw.flatten()
    neg = ((-ky[:, None]) % h * w + (-kx[None, :]) % w).flatten()  # flat index of -k
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(raw.tolist(), raw[neg].tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = torch.tensor([find(a) for a in raw.tolist()])
    _, labels = torch.unique(roots, return_inverse=True)
    return labels, int(labels.max()) + 1
