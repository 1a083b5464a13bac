"""The whitening projection against an independent construction.

The block partition of the DFT grid is rebuilt here from its definition, with different code:
centred frequencies from numpy's fftfreq, tile indices sign(f) * ceil(|f| / b) with Python
integers, rings from numpy's hypot, and the closure under k -> -k as connected components of a
graph (scipy) instead of a union-find. The projection is then recomputed block by block with numpy
(scale each block's coefficients to energy = its size; an empty block becomes all ones) and
compared with ``whiten``: an off-by-one tile index, a wrong mirror or a wrong scale changes it."""

import math

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ntrk_lightning.whitening import block_labels, whiten

pytestmark = pytest.mark.core

GRIDS = [(6, 6), (5, 7), (8, 8), (7, 4), (9, 10), (1, 6)]


def _centred(n):
    return np.rint(np.fft.fftfreq(n) * n).astype(int)  # 0, 1, ..., then the negative frequencies


def reference_partition(h, w, kind, block):
    """Component id of every frequency (row-major) of an h x w grid."""
    fy, fx = _centred(h), _centred(w)
    raw = {}
    for iy in range(h):
        for ix in range(w):
            if kind == "spectral":
                key = tuple(int(math.copysign(math.ceil(abs(f) / block), f)) if f else 0 for f in (fy[iy], fx[ix]))
            else:
                side = min(h, w)
                key = int(np.floor(np.hypot(fy[iy] / h * side, fx[ix] / w * side) / block))
            raw.setdefault(key, []).append(iy * w + ix)
    rows, cols = [], []
    for members in raw.values():  # same raw tile / ring: chain its members together
        rows += members[:-1]
        cols += members[1:]
    for iy in range(h):  # k and -k in one block
        for ix in range(w):
            rows.append(iy * w + ix)
            cols.append(((-iy) % h) * w + (-ix) % w)
    n = h * w
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("kind,block", [("spectral", 1), ("spectral", 2), ("spectral", 3), ("radial", 1),
                                        ("radial", 2)])
def test_block_labels_match_the_independent_partition(h, w, kind, block):
    labels, n_blocks = block_labels(h, w, kind, block)
    ref = reference_partition(h, w, kind, block)
    assert same_partition(labels.numpy(), ref)
    assert n_blocks == len(set(ref.tolist())) and sorted(set(labels.tolist())) == list(range(n_blocks))


def test_per_frequency_blocks_are_conjugate_pairs():
    """block = 1: every block is {k, -k}, one coefficient when k = -k (DC, Nyquist), else two."""
    for h, w in GRIDS:
        labels, _ = block_labels(h, w, "spectral", 1)
        lab = labels.view(h, w)
        for iy in range(h):
            for ix in range(w):
                members = {tuple(m) for m in torch.nonzero(lab == lab[iy, ix]).tolist()}
                assert members == {(iy, ix), ((-iy) % h, (-ix) % w)}


def reference_whiten(v, kind, block):
    """Block-wise rescaling of the orthonormal 2-D DFT of every (sample, channel), in numpy."""
    x = v.numpy()
    h, w = x.shape[-2:]
    comp = reference_partition(h, w, kind, block)
    c = np.fft.fft2(x, norm="ortho").reshape(*x.shape[:-2], h * w)
    out = np.empty_like(c)
    for b in set(comp.tolist()):
        idx = np.nonzero(comp == b)[0]
        energy = (np.abs(c[..., idx]) ** 2).sum(-1, keepdims=True)
        empty = energy <= 1e-30 * len(idx)
        out[..., idx] = np.where(empty, 1.0, c[..., idx] * np.sqrt(len(idx) / np.maximum(energy, 1e-300)))
    return torch.from_numpy(np.fft.ifft2(out.reshape(x.shape), norm="ortho").real)


@pytest.mark.parametrize("h,w", [(6, 6), (5, 7), (8, 8)])
@pytest.mark.parametrize("kind,block", [("spectral", 1), ("spectral", 2), ("spectral", 3), ("radial", 1),
                                        ("radial", 2)])
def test_whiten_equals_the_reference_projection(h, w, kind, block):
    g = torch.Generator().manual_seed(h * 100 + w)
    v = torch.randn(3, 2, h, w, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, w, dtype=torch.float64)
    v[1, 1] = 0.0  # an all-zero channel: every block empty
    assert torch.allclose(whiten(v, kind, block), reference_whiten(v, kind, block), atol=1e-10)
    # float32 in, float32 out, same projection up to float32 round-off
    w32 = whiten(v.float(), kind, block)
    assert w32.dtype == torch.float32
    assert torch.allclose(w32.double(), reference_whiten(v, kind, block), atol=1e-4)


def test_vector_blocks_are_contiguous_chunks_of_the_block_size():
    v = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for block in (1, 3, 4, 10, 16):
        out = whiten(v, "spectral", block)
        for start in range(0, 10, block):
            chunk, orig = out[:, start:start + block], v[:, start:start + block]
            n = chunk.shape[1]
            assert torch.allclose(chunk.pow(2).sum(1), torch.full((4,), float(n), dtype=torch.float64))
            # a positive rescaling of the input chunk: same direction
            assert torch.allclose(chunk, orig * math.sqrt(n) / orig.norm(dim=1, keepdim=True))
    zero = whiten(torch.zeros(2, 6, dtype=torch.float64), "spectral", 4)
    assert torch.equal(zero, torch.ones(2, 6, dtype=torch.float64))


def test_standardize_gives_zero_mean_and_unit_variance_per_sample():
    g = torch.Generator().manual_seed(3)
    for shape in ((5, 37), (3, 2, 6, 5)):
        v = torch.randn(shape, generator=g, dtype=torch.float64) * 4.0 + 2.5
        v[0] = v[0] * 1e-3 - 7.0
        out = whiten(v, "standardize").flatten(1)
        assert torch.allclose(out.mean(1), torch.zeros(shape[0], dtype=torch.float64), atol=1e-12)
        assert torch.allclose(out.var(1, unbiased=False), torch.ones(shape[0], dtype=torch.float64), atol=1e-10)
        # an affine map of each sample: correlation with the input is exactly 1
        vf = v.flatten(1)
        assert torch.allclose(out, (vf - vf.mean(1, keepdim=True)) / vf.std(1, unbiased=False, keepdim=True))


def test_sphere_is_the_radial_projection_and_zero_goes_to_the_constant_vector():
    v = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    v[2] = 0.0
    out = whiten(v, "sphere")
    d = v[0].numel()
    for i in (0, 1, 3):
        assert torch.allclose(out[i], v[i] * math.sqrt(d) / v[i].norm())
    assert torch.equal(out[2], torch.ones_like(out[2]))
    assert torch.equal(whiten(v, "identity"), v) and torch.equal(whiten(v, "none"), v)
    assert torch.allclose(whiten(v, "global"), out)  # the alias
