"""Whitening operators W: map a vector onto a set of vectors that look like white Gaussian noise.

``kind="typical"`` (the default) is the operator of NoiseTilt (arXiv:2606.18066) as described by a
summary of the paper (its exact construction, Appendix B, was not available to us; every choice
below is a named option): a composition of Euclidean projections onto high-confidence sets of
N(0, I), which leaves typical Gaussian noise (almost) unchanged and whitens structured input.
The other kinds are ablations: ``wgnc`` is the predecessor's projection (Hwang & Sung,
arXiv:2602.08646), ``spectral``/``radial``/``sphere`` are per-block hard energy projections, and
``standardize``/``identity`` are baselines. The full derivations and the measurements behind the
defaults are in docs/whitening.md.

typical
-------
Building block, **2OS** (two-level order statistics), for M tiles of D entries, Y in R^{M x D}:
sort every tile (row), then every column across tiles, giving Z with Z[r, j] = the r-th smallest
of the M tiles' j-th order statistics. Under N(0, I) the j-th order statistic U_(j) of D uniforms
is Beta(j, D-j+1); F_j(U_(j)) is uniform, so the r-th smallest of M of them is Beta(r, M-r+1).
Hence P(Z[r, j] < L[r, j]) = alpha'/2 exactly for

    L[r, j] = Phi^-1( Q_{j, D-j+1}( Q_{r, M-r+1}(alpha'/2) ) ),   U[r, j] = -L[M+1-r, D+1-j]

(Q_{a,b} the Beta quantile function; the upper band follows from the symmetry x -> -x, which
avoids quantiles of probabilities near 1). The projection clips Z into [L, U] and undoes both
sorts. By the rearrangement inequality ||X - Y|| >= ||Z(X) - Z(Y)|| >= ||Z(X) - clip(Z(X))|| for
every Y in C = {Y : L <= Z(Y) <= U}, and sort-clip-unsort attains this bound whenever the unsorted
result keeps every tile's order: then it is the Euclidean projection (always so with one tile).
With several tiles, clipping columns can break a tile's order (a tile ranked high in column j but
low in column j+1 gets L[r, j] > U[r', j+1]); the result then is not in C. We therefore repeat
sort-clip-unsort until Z lies in the bands (measured: <= 16 rounds; the distance stays within 5%
of the lower bound on structured input, see ``lower_bound_2os``). C is permutation invariant and
a union of convex cells (one per ordering), not convex.

W applies, in every domain named in ``domains`` (orthonormal transforms, so N(0, I) stays
N(0, I)):

1. 2OS on the entries (tiles: square ``tile`` x ``tile`` patches per channel; for (B, D) vectors
   contiguous chunks of ``tile**2`` entries; entries not covered by whole patches — the bottom and
   right strips of sizes that ``tile`` does not divide — are chunked in raster order into further
   tiles of the same size, and the final < tile**2 entries form one tile of their own);
2. 1-level order-statistic bands (2OS with one tile) on the standardized tile means
   s_k = sqrt(D) mean_k ~ N(0, 1); s_k is the coordinate of the tile along its unit constant
   vector, so the projection shifts each tile by (s'_k - s_k)/sqrt(D);
3. the same on the tile norms ||tile_k||, ||tile_k||^2 ~ chi^2_D, bands sqrt(F_chi2_D^-1(Q_{r,M-r+1}))
   (upper via the survival function); the projection rescales each tile to its clipped norm (a
   zero tile becomes a constant tile of that norm).

Before that, once, the global norm is clipped into the chi^2_N band (an atypical scale, e.g. a
raw reward gradient, is mapped into the band first). Domains: ``"space"`` (the input itself) and ``"dct"`` (the
orthonormal DCT-II over H and W per channel, over D for vectors: real, any size, and its square
tiles are frequency bands). One sweep = for each domain in order: entries, means, norms; W runs
``sweeps`` sweeps (default ``TYPICAL_SWEEPS``). The per-constraint level alpha' = alpha / K with K = the number of
band constraints (1 + per domain N entries + 2 per tile): by the union bound, N(0, I) lands in
the intersection of all sets with probability >= 1 - alpha (Bonferroni; conservative, since the
order statistics are strongly dependent).

wgnc
----
Orthonormal FFT over H, W per channel (over D for vectors); one complex coefficient per conjugate
pair (self-conjugate real coefficients are paired as (r1 + i r2)/sqrt(2), a last unpaired one
stays real), so every packed coefficient is CN(0, 1) under N(0, I); blocks of ``block``
coefficients (``block < 2`` means 16; a ragged rest joins the last block) are projected onto
{||y||_2^2 = b, ||y||_1 = (sqrt(pi)/2) b}, keeping phases. For moduli a the nearest feasible
moduli are m = kappa (a - tau)_+ on the top-k entries (KKT), with
tau = mu_k - sigma_k sqrt(rho / (k - rho)), rho = pi b / 4, kappa = (sqrt(pi)/2) b / sum(a_i - tau);
all k are tried and the nearest valid one kept. Blocks of one coefficient keep only the energy.

The hard energy projections
---------------------------
``spectral`` etc. compute W(v) = F^-1(B(F v)) where F is the orthonormal 2-D DFT over the spatial
axes of every channel (identity for plain vectors) and B rescales every block of coefficients so
that its energy equals the energy white N(0, I) noise has there in expectation: one unit per
coefficient. Blocks are closed under k -> -k, so scaling keeps Hermitian symmetry and the output
real. W is idempotent, invariant to positive scaling of v, and <W(v), v> > 0 for v != 0.

* ``"spectral"`` — square tiles of ``block`` x ``block`` frequencies (``block=1``: one block per
  conjugate pair of frequencies, a perfectly flat spectrum where only the phase carries signal);
  for (B, D) vectors, contiguous chunks of ``block`` coordinates.
* ``"radial"``   — rings of width ``block`` in radial frequency (images only).
* ``"sphere"``   — one global block per sample: the projection onto ||z|| = sqrt(d).
* ``"standardize"`` — per-sample zero mean, unit variance.
* ``"identity"`` — no whitening (NTRK then reduces to mean-shift guidance).

A block with no energy at all has no nearest point (every point of its sphere is equally near);
it gets the deterministic real coefficient 1 everywhere, which keeps the energy exact and the
output real.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional

import numpy as np
import torch
from torch import Tensor

WhiteningKind = Literal["typical", "wgnc", "spectral", "radial", "sphere", "standardize", "identity"]
KINDS: tuple[str, ...] = ("typical", "wgnc", "spectral", "radial", "sphere", "standardize", "identity")
_ALIASES = {"global": "sphere", "none": "identity", "tiles": "spectral", "rings": "radial", "paper": "typical"}
DOMAINS: tuple[str, ...] = ("space", "dct")

# Defaults of "typical", chosen by measurement (docs/whitening.md).
DEFAULT_TILE = 4
DEFAULT_DOMAINS: tuple[str, ...] = ("dct", "space")
TYPICAL_SWEEPS = 2
WGNC_BLOCK = 16

# Energies below this (relative to the block size) count as "no energy": avoids dividing by ~0.
_TINY = 1e-30


def canonical_kind(kind: str) -> str:
    k = _ALIASES.get(kind, kind)
    if k not in KINDS:
        raise ValueError(f"unknown whitening kind {kind!r}; expected one of {KINDS + tuple(_ALIASES)}")
    return k


def _check_options(tile: Optional[int], domains: Optional[tuple[str, ...]], alpha: float) -> tuple[int, tuple[str, ...]]:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or not 0.0 < alpha < 1.0:
        raise ValueError(f"whitening alpha must be a finite number in (0, 1), got {alpha!r}")
    if tile is None:
        tile = DEFAULT_TILE
    if isinstance(tile, bool) or int(tile) != tile or int(tile) < 2:
        raise ValueError(f"whitening tile must be an integer >= 2, got {tile!r}")
    if domains is None:
        domains = DEFAULT_DOMAINS
    if isinstance(domains, str):
        domains = (domains,)
    domains = tuple(domains)
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise ValueError(f"unknown whitening domain(s) {bad or list(domains)!r}; expected a non-empty tuple of {DOMAINS}")
    return int(tile), domains


def whiten(v: Tensor, kind: str = "typical", block: int = 1, *, tile: Optional[int] = None,
           domains: Optional[tuple[str, ...]] = None, alpha: float = 1e-4, sweeps: Optional[int] = None) -> Tensor:
    """Whiten ``v`` of shape (B, C, H, W) or (B, D), per sample. Returns a tensor of the same shape
    and dtype (float16/bfloat16 are computed in float32). See the module docstring for the kinds.

    ``block``: tile size (spectral), ring width (radial), coefficients per block (wgnc; < 2 means
    16). ``tile``, ``domains``, ``alpha``: the typical operator's tile side (default 8), transform
    domains in order of application (default ("space", "dct")) and confidence level 1 - alpha of
    the whole set under N(0, I); ``sweeps``: how often the composition runs (default 2). Options a
    kind does not use are validated and ignored."""
    kind = canonical_kind(kind)
    tile, domains = _check_options(tile, domains, alpha)
    if sweeps is None:
        sweeps = TYPICAL_SWEEPS
    if isinstance(sweeps, bool) or int(sweeps) != sweeps or int(sweeps) < 1:
        raise ValueError(f"whitening sweeps must be an integer >= 1, got {sweeps!r}")
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
    if kind == "typical":
        out = _typical(work.reshape(v.shape[0], 1, 1, -1) if v.dim() == 2 else work, tile, domains, float(alpha),
                       int(sweeps)).reshape(v.shape)
    elif kind == "wgnc":
        out = _wgnc(work.reshape(v.shape[0], 1, 1, -1) if v.dim() == 2 else work,
                    WGNC_BLOCK if int(block) < 2 else int(block)).reshape(v.shape)
    elif kind == "sphere":
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


# ----------------------------------------------------------------------------------- typical

@lru_cache(maxsize=256)
def order_stat_bands(m: int, d: int, alpha_entry: float) -> tuple[np.ndarray, np.ndarray]:
    """2OS bands (L, U), float64 arrays (m, d), for m tiles of d i.i.d. N(0, 1) entries: each
    Z[r, j] leaves its band with probability alpha_entry (alpha_entry/2 per side)."""
    from scipy.special import ndtri
    from scipy.stats import beta

    r = np.arange(1, m + 1, dtype=np.float64)
    j = np.arange(1, d + 1, dtype=np.float64)
    outer = beta.ppf(alpha_entry / 2.0, r, m - r + 1.0)            # (m,) r-th smallest of m uniforms
    lo = ndtri(beta.ppf(outer[:, None], j[None, :], d - j[None, :] + 1.0))
    hi = -lo[::-1, ::-1]
    return np.ascontiguousarray(lo), np.ascontiguousarray(hi)


@lru_cache(maxsize=256)
def norm_bands(m: int, d: int, alpha_entry: float) -> tuple[np.ndarray, np.ndarray]:
    """Bands for the sorted norms of m tiles of d i.i.d. N(0, 1) entries (||tile||^2 ~ chi^2_d)."""
    from scipy.stats import beta, chi2

    r = np.arange(1, m + 1, dtype=np.float64)
    lo = np.sqrt(chi2.ppf(beta.ppf(alpha_entry / 2.0, r, m - r + 1.0), d))
    hi = np.sqrt(chi2.isf(beta.ppf(alpha_entry / 2.0, m - r + 1.0, r), d))
    return lo, hi


@dataclass(frozen=True)
class TileGroup:
    """``m`` tiles of ``d`` entries, stored contiguously at ``start`` of the permuted vector, with
    their bands (float64, CPU): entries (m, d), standardized means (m,), norms (m,)."""
    start: int
    m: int
    d: int
    entry_lo: Tensor
    entry_hi: Tensor
    mean_lo: Tensor
    mean_hi: Tensor
    norm_lo: Tensor
    norm_hi: Tensor


@dataclass(frozen=True)
class TypicalTables:
    """Everything ``typical`` needs for one (shape, tile, alpha, number of domains)."""
    shape: tuple[int, int, int]
    tile: int
    alpha: float
    alpha_entry: float          # per-constraint level (Bonferroni)
    n_constraints: int
    perm: Tensor                # (N,) flat index of the permuted (tiled) layout
    inv_perm: Tensor            # its inverse
    groups: tuple[TileGroup, ...]
    global_lo: float            # band of the global norm (chi^2_N)
    global_hi: float
    dct_h: Tensor               # orthonormal DCT-II matrices (float64)
    dct_w: Tensor


def tile_layout(c: int, h: int, w: int, tile: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Permutation of the c*h*w entries into tiles and the (m, d) sizes of the tile groups.

    Whole tile x tile patches of every channel come first; the entries they miss (bottom and right
    strips) follow in raster order, chunked into further tiles of tile**2 entries; the final
    < tile**2 entries form a group of one tile."""
    idx = torch.arange(c * h * w).view(c, h, w)
    nh, nw = h // tile, w // tile
    d = tile * tile
    patches = idx[:, :nh * tile, :nw * tile].reshape(c, nh, tile, nw, tile).permute(0, 1, 3, 2, 4).reshape(-1)
    covered = torch.zeros(c, h, w, dtype=torch.bool)
    covered[:, :nh * tile, :nw * tile] = True
    rest = idx[~covered]
    perm = torch.cat([patches, rest])
    n = perm.numel()
    groups = []
    m_main = n // d
    if m_main:
        groups.append((m_main, d))
    if n - m_main * d:
        groups.append((1, n - m_main * d))
    return perm, groups


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix (n, n), float64: row k = sqrt(2/n) cos(pi (2i+1) k / 2n), row 0 / sqrt 2."""
    i = torch.arange(n, dtype=torch.float64)
    mat = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    mat[0] /= math.sqrt(2.0)
    return mat


@lru_cache(maxsize=64)
def typical_tables(shape: tuple[int, int, int], tile: int = DEFAULT_TILE, alpha: float = 1e-4,
                   n_domains: int = len(DEFAULT_DOMAINS)) -> TypicalTables:
    """Band tables of ``typical`` for per-sample shape (C, H, W) (vectors: (1, 1, D)); cached."""
    from scipy.stats import chi2

    c, h, w = shape
    perm, sizes = tile_layout(c, h, w, tile)
    n = c * h * w
    n_tiles = sum(m for m, _ in sizes)
    k = 1 + n_domains * (n + 2 * n_tiles)
    a = alpha / k
    groups, start = [], 0
    for m, d in sizes:
        elo, ehi = order_stat_bands(m, d, a)
        slo, shi = order_stat_bands(1, m, a)   # one "tile" of m standardized means
        nlo, nhi = norm_bands(m, d, a)
        t = lambda x: torch.from_numpy(np.array(x, dtype=np.float64))  # noqa: E731  (copy: tables are shared)
        groups.append(TileGroup(start, m, d, t(elo), t(ehi), t(slo[0]), t(shi[0]), t(nlo), t(nhi)))
        start += m * d
    return TypicalTables((c, h, w), tile, alpha, a, k, perm, torch.argsort(perm), tuple(groups),
                         float(math.sqrt(chi2.ppf(a / 2, n))), float(math.sqrt(chi2.isf(a / 2, n))),
                         dct_matrix(h), dct_matrix(w))


@lru_cache(maxsize=64)
def _tables_on(shape: tuple[int, int, int], tile: int, alpha: float, n_domains: int,
               device: torch.device, dtype: torch.dtype) -> TypicalTables:
    """typical_tables on ``device`` in ``dtype``; the entry bands here are stored transposed (d, m)."""
    tb = typical_tables(shape, tile, alpha, n_domains)
    mv = lambda x: x.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    groups = tuple(TileGroup(g.start, g.m, g.d, mv(g.entry_lo.T), mv(g.entry_hi.T), mv(g.mean_lo), mv(g.mean_hi),
                             mv(g.norm_lo), mv(g.norm_hi)) for g in tb.groups)
    return TypicalTables(tb.shape, tb.tile, tb.alpha, tb.alpha_entry, tb.n_constraints, tb.perm.to(device), tb.inv_perm.to(device), groups,
                         tb.global_lo, tb.global_hi, mv(tb.dct_h), mv(tb.dct_w))


def project_2os(y: Tensor, lo: Tensor, hi: Tensor, max_rounds: int = 32) -> Tensor:
    """Projection of tiles y (..., m, d) onto C = {L <= Z(y) <= U}: sort, clip, unsort — repeated
    until Z(y) lies in the bands (at most ``max_rounds`` times; see the module docstring)."""
    return _project_2os_t(y, lo.transpose(-1, -2).contiguous(), hi.transpose(-1, -2).contiguous(), max_rounds)[0]


def _project_2os_t(y: Tensor, lo_t: Tensor, hi_t: Tensor, max_rounds: int = 32) -> tuple[Tensor, bool]:
    """project_2os with the bands given transposed, (d, m); also says whether anything moved."""
    changed = False
    for _ in range(max_rounds):
        s, i_row = y.sort(dim=-1)
        # the column sort runs on the transpose: contiguous short rows sort faster than strided columns
        zt, i_col = s.transpose(-1, -2).contiguous().sort(dim=-1)
        zc = zt.clamp(lo_t, hi_t)
        if torch.equal(zc, zt):  # y is in C: nothing to do (also makes the projection idempotent)
            break
        changed = True
        s_back = torch.empty_like(zt).scatter_(-1, i_col, zc).transpose(-1, -2)
        y = torch.empty_like(y).scatter_(-1, i_row, s_back)
    return y, changed


def lower_bound_2os(y: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """||Z(y) - clip(Z(y))||^2 (per leading index): no point of C is nearer to y than this."""
    z = y.sort(dim=-1)[0].sort(dim=-2)[0]
    return (z - torch.minimum(torch.maximum(z, lo), hi)).pow(2).sum((-1, -2))


def project_sorted(s: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Projection of statistics s (..., m) onto {lo <= sort(s) <= hi} (1-level order statistics)."""
    return _project_sorted(s, lo, hi)[0]


def _project_sorted(s: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, bool]:
    z, i = s.sort(dim=-1)
    zc = z.clamp(lo, hi)
    if torch.equal(zc, z):
        return s, False
    return torch.empty_like(s).scatter_(-1, i, zc), True


def project_means(y: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Shift every tile of y (..., m, d) so its standardized mean sqrt(d) mean lies in the bands."""
    return _project_means(y, lo, hi)[0]


def _project_means(y: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, bool]:
    d = y.shape[-1]
    s = y.sum(-1) / math.sqrt(d)
    s2, changed = _project_sorted(s, lo, hi)
    if not changed:
        return y, False
    return y + ((s2 - s) / math.sqrt(d)).unsqueeze(-1), True


def project_norms(y: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Rescale every tile of y (..., m, d) so that its norm lies in the bands (sorted)."""
    return _project_norms(y, lo, hi)[0]


def _project_norms(y: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, bool]:
    d = y.shape[-1]
    norm = y.norm(dim=-1)
    target, changed = _project_sorted(norm, lo, hi)
    if not changed:
        return y, False
    zero = norm <= 0
    scaled = y * (target / torch.where(zero, torch.ones_like(norm), norm)).unsqueeze(-1)
    # a zero tile has no nearest point on its sphere: take the constant tile of the target norm
    const = (target / math.sqrt(d)).unsqueeze(-1).expand_as(y)
    return torch.where(zero.unsqueeze(-1), const, scaled), True


def _project_tiles(flat: Tensor, tb: TypicalTables) -> tuple[Tensor, bool]:
    """Entries, tile means, tile norms of every group; flat (B, N) in the permuted layout."""
    parts, changed = [], False
    for g in tb.groups:
        y = flat[:, g.start:g.start + g.m * g.d].reshape(-1, g.m, g.d)
        y, c1 = _project_2os_t(y, g.entry_lo, g.entry_hi)  # tables on a device hold them transposed
        y, c2 = _project_means(y, g.mean_lo, g.mean_hi)
        y, c3 = _project_norms(y, g.norm_lo, g.norm_hi)
        parts.append(y.flatten(1))
        changed = changed or c1 or c2 or c3
    return (torch.cat(parts, 1) if len(parts) > 1 else parts[0]), changed


def project_global_norm(flat: Tensor, lo: float, hi: float) -> Tensor:
    norm = flat.norm(dim=1, keepdim=True)
    target = norm.clamp(lo, hi)
    zero = norm <= 0
    out = flat * (target / torch.where(zero, torch.ones_like(norm), norm))
    return torch.where(zero, torch.full_like(flat, lo / math.sqrt(flat.shape[1])), out)


def _typical(v: Tensor, tile: int, domains: tuple[str, ...], alpha: float, sweeps: int) -> Tensor:
    b, c, h, w = v.shape
    tb = _tables_on((c, h, w), tile, alpha, len(domains), v.device, v.dtype)
    perm, inv = tb.perm, tb.inv_perm
    x = project_global_norm(v.reshape(b, -1), tb.global_lo, tb.global_hi).view(b, c, h, w)
    for _ in range(sweeps):
        moved = False
        for dom in domains:
            y = tb.dct_h @ x @ tb.dct_w.T if dom == "dct" else x
            y, changed = _project_tiles(y.reshape(b, -1)[:, perm], tb)
            if changed:  # otherwise keep x as it is (no transform round-trip rounding)
                y = y[:, inv].view(b, c, h, w)
                x = tb.dct_h.T @ y @ tb.dct_w if dom == "dct" else y
                moved = True
        if not moved:  # x is in every set: later sweeps would do nothing
            break
    return x


# -------------------------------------------------------------------------------------- wgnc

@lru_cache(maxsize=64)
def wgnc_layout(h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices (row-major, h x w DFT grid) of one member of every conjugate pair, of its
    mirror -k, and of the self-conjugate (real) frequencies."""
    idx = torch.arange(h * w)
    ky, kx = idx // w, idx % w
    neg = ((-ky) % h) * w + (-kx) % w
    pairs = idx[idx < neg]
    return pairs, neg[pairs], idx[idx == neg]


def wgnc_moduli(a: Tensor) -> Tensor:
    """Nearest m >= 0 to moduli a (..., b) with sum(m^2) = b and sum(m) = (sqrt(pi)/2) b."""
    b = a.shape[-1]
    if b < 2:  # the two constraints conflict for one coefficient: keep the energy only
        return torch.ones_like(a)
    a = a.double()
    l1 = math.sqrt(math.pi) / 2.0 * b
    rho = l1 * l1 / b                                  # = pi b / 4 < b
    m = _wgnc_kkt(a, b, l1, rho)
    bad = torch.isnan(m).any(-1)
    if bad.any():
        # Ties make the nearest point non-unique (a constant block, the zero block included, is
        # equally far from every feasible point): break them with a tiny deterministic ramp in
        # the (stable) order of a, which picks the feasible point closest to that ramp.
        ab = a[bad]
        rank = ab.argsort(dim=-1, stable=True).argsort(dim=-1).double()
        scale = ab.abs().amax(-1, keepdim=True).clamp_min(1.0)
        m[bad] = _wgnc_kkt(ab + 1e-6 * scale * (rank + 1.0) / b, b, l1, rho)
    return m


def _wgnc_kkt(a: Tensor, b: int, l1: float, rho: float) -> Tensor:
    """The KKT points m = kappa (a - tau)_+ whose support is the top-k of a, for every k; the
    nearest valid one (NaN rows where none is valid: ties)."""
    srt, _ = a.sort(-1, descending=True)
    center = srt.mean(-1, keepdim=True)               # centred sums: no cancellation in the variance
    c = srt - center
    k = torch.arange(1, b + 1, dtype=a.dtype, device=a.device)
    mu_c = c.cumsum(-1) / k
    sig = ((c * c).cumsum(-1) / k - mu_c * mu_c).clamp_min(0.0).sqrt()
    ok_k = k > rho
    gap = sig * torch.sqrt(torch.where(ok_k, rho / (k - rho).clamp_min(1e-12), torch.zeros_like(k)))  # mu - tau
    tau = center + mu_c - gap
    kappa = l1 / (k * gap).clamp_min(1e-300)
    nxt = torch.cat([srt[..., 1:], torch.full_like(srt[..., :1], -math.inf)], -1)
    tol = 1e-12 * srt[..., :1].abs().clamp_min(1e-300)
    valid = ok_k & (gap > tol) & (srt >= tau - tol) & (nxt <= tau + tol)
    # distance of every candidate, computed directly (b x b per block; b is small)
    cand = kappa.unsqueeze(-1) * (srt.unsqueeze(-2) - tau.unsqueeze(-1)).clamp_min(0.0)   # (..., k, i)
    in_support = torch.arange(b, device=a.device)[None, :] < torch.arange(1, b + 1, device=a.device)[:, None]
    cand = torch.where(in_support, cand, torch.zeros_like(cand))
    dist = (cand - srt.unsqueeze(-2)).pow(2).sum(-1)
    dist = torch.where(valid, dist, torch.full_like(dist, math.inf))
    best = dist.argmin(-1, keepdim=True)
    k_b = (best + 1).to(a.dtype)
    # On the support the solution is the affine map of a with mean l1/k and the variance b/k - (l1/k)^2
    # (equal to kappa (a - tau), but free of kappa ~ 1/gap, which is huge for near-tied blocks).
    rank = a.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1).to(a.dtype)
    support = rank < k_b
    m = _affine_on_support(a - center, support, k_b, l1, b)
    m = _affine_on_support(m, support, k_b, l1, b)  # polish: the constraints then hold to rounding
    none = ~valid.any(-1, keepdim=True)
    return torch.where(none, torch.full_like(m, math.nan), m)


def _affine_on_support(x: Tensor, support: Tensor, k: Tensor, l1: float, b: int) -> Tensor:
    """The affine increasing image of x on ``support`` (k entries) with sum l1 and sum of squares b;
    zero elsewhere."""
    xs = torch.where(support, x, torch.zeros_like(x))
    mean = xs.sum(-1, keepdim=True) / k
    dev = torch.where(support, x - mean, torch.zeros_like(x))
    sd = (dev.pow(2).sum(-1, keepdim=True) / k).sqrt()
    target_sd = (b / k - (l1 / k) ** 2).clamp_min(0.0).sqrt()
    return torch.where(support, l1 / k + target_sd * dev / sd.clamp_min(1e-300), torch.zeros_like(x))


def _wgnc(v: Tensor, block: int) -> Tensor:
    b, c, h, w = v.shape
    pairs, mirror, selfs = (t.to(v.device) for t in wgnc_layout(h, w))
    coef = torch.fft.fft2(v, norm="ortho").reshape(b, c, h * w)
    n_self = selfs.numel()
    s_even, s_odd = selfs[0:n_self - 1:2], selfs[1::2]
    lone = selfs[n_self - 1:] if n_self % 2 else selfs[:0]
    re = coef.real
    y = torch.cat([coef[..., pairs],
                   torch.complex(re[..., s_even], re[..., s_odd]) / math.sqrt(2.0),
                   torch.complex(re[..., lone], torch.zeros_like(re[..., lone]))], -1)
    n = y.shape[-1]
    a = y.abs()
    nb = max(n // block, 1)
    cut = (nb - 1) * block   # the ragged rest joins the last block
    m = torch.cat([wgnc_moduli(a[..., :cut].reshape(b, c, nb - 1, block)).reshape(b, c, cut),
                   wgnc_moduli(a[..., cut:])], -1).to(a.dtype)
    phase = torch.where(a > 0, y / torch.where(a > 0, a, torch.ones_like(a)), torch.ones_like(y))
    y = m * phase
    n_pair, n_sp = pairs.numel(), s_odd.numel()
    out = torch.zeros_like(coef)
    out[..., pairs] = y[..., :n_pair]
    out[..., mirror] = y[..., :n_pair].conj()
    ys = y[..., n_pair:n_pair + n_sp] * math.sqrt(2.0)
    out[..., s_even] = torch.complex(ys.real, torch.zeros_like(ys.real))
    out[..., s_odd] = torch.complex(ys.imag, torch.zeros_like(ys.imag))
    if lone.numel():
        yl = y[..., n_pair + n_sp:]
        out[..., lone] = torch.complex(yl.real, torch.zeros_like(yl.real))
    return torch.fft.ifft2(out.view(b, c, h, w), norm="ortho").real


# ------------------------------------------------------------------- hard energy projections

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
