"""Properties of the whitening operator W (DESIGN §1.2)."""

import math

import pytest
import scipy.stats as st
import torch

from ntrk_lightning.whitening import KINDS, block_labels, whiten

pytestmark = pytest.mark.core

PROJECTIONS = [("spectral", 1), ("spectral", 2), ("spectral", 3), ("spectral", 4), ("radial", 1),
               ("radial", 3), ("sphere", 1)]
SHAPES = [(3, 2, 8, 8), (2, 1, 16, 16), (2, 3, 7, 10), (2, 4, 9, 9)]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(shape, generator=g, dtype=torch.float64)
    heavy = torch.distributions.StudentT(1.5).sample(shape).double()  # Cauchy-like tails
    low_rank = torch.ones(shape, dtype=torch.float64) * torch.linspace(-1, 2, shape[-1], dtype=torch.float64)
    spike = torch.zeros(shape, dtype=torch.float64)
    spike[..., 0, 0] = 5.0
    return [gauss, heavy, low_rank, spike, 1e-20 * gauss]


def _block_energies(w, kind, block):
    h, wd = w.shape[-2:]
    labels, n = block_labels(h, wd, kind, block)
    c = torch.fft.fft2(w, norm="ortho").flatten(-2)
    e = torch.zeros(*c.shape[:-1], n, dtype=torch.float64)
    e.scatter_add_(-1, labels.expand(*c.shape[:-1], -1), c.abs().double() ** 2)
    return e, torch.bincount(labels, minlength=n).double()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_real_same_shape_dtype(kind, shape):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        v = torch.randn(shape).to(dtype)
        w = whiten(v, kind, 2)
        assert w.shape == v.shape and w.dtype == dtype and not w.is_complex()
        assert torch.isfinite(w).all()


@pytest.mark.parametrize("kind,block", PROJECTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_energies_exact_for_any_input(kind, block, shape):
    for v in _inputs(shape):
        w = whiten(v, kind, block)
        if kind == "sphere":
            # one block per sample over all channels
            assert torch.allclose(w.flatten(1).pow(2).sum(1), torch.full((shape[0],), float(v[0].numel()),
                                  dtype=torch.float64), rtol=1e-10)
            continue
        e, size = _block_energies(w, kind, block)
        assert torch.allclose(e, size.expand_as(e), rtol=1e-9, atol=1e-9)
        # ...and so the total norm is exactly sqrt(d) per sample and channel
        assert torch.allclose(w.pow(2).sum((-1, -2)), torch.full(shape[:2], float(shape[-1] * shape[-2]),
                              dtype=torch.float64), rtol=1e-9)


def test_blocks_are_closed_under_negation():
    for h, w in [(8, 8), (7, 10), (16, 16), (9, 9), (6, 1)]:
        for kind, block in PROJECTIONS:
            if kind == "sphere":
                continue
            labels, _ = block_labels(h, w, kind, block)
            lab = labels.view(h, w)
            ky, kx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            assert torch.equal(lab, lab[(-ky) % h, (-kx) % w])


def test_per_frequency_block_is_a_flat_spectrum_keeping_phase():
    v = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    w = whiten(v, "spectral", 1)
    cv, cw = torch.fft.fft2(v, norm="ortho"), torch.fft.fft2(w, norm="ortho")
    assert torch.allclose(cw.abs(), torch.ones_like(cw.abs()), atol=1e-12)
    assert torch.allclose(torch.angle(cw * cv.conj()), torch.zeros(cw.shape, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("kind,block", PROJECTIONS + [("standardize", 1), ("identity", 1)])
def test_idempotent_scale_invariant_and_positively_aligned(kind, block):
    for shape in SHAPES:
        v = torch.randn(shape, dtype=torch.float64)
        w = whiten(v, kind, block)
        assert torch.allclose(whiten(w, kind, block), w, atol=1e-10)
        if kind != "identity":
            for a in (1e-3, 0.5, 7.0, 1e4):
                assert torch.allclose(whiten(a * v, kind, block), w, atol=1e-9)
        assert ((w * v).flatten(1).sum(1) > 0).all()


def test_vectors():
    v = torch.randn(5, 64, dtype=torch.float64)
    w1 = whiten(v, "spectral", 1)
    assert torch.allclose(w1, torch.sign(v), atol=1e-12)  # block size 1 on plain vectors: unit magnitude, same sign
    w4 = whiten(v, "spectral", 4)
    assert torch.allclose(w4.view(5, 16, 4).pow(2).sum(-1), torch.full((5, 16), 4.0, dtype=torch.float64))
    ws = whiten(v, "sphere")
    assert torch.allclose(ws.norm(dim=1), torch.full((5,), 8.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="radial"):
        whiten(v, "radial", 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown whitening kind"):
        whiten(torch.randn(2, 4), "pink")
    with pytest.raises(ValueError, match="shape"):
        whiten(torch.randn(2, 3, 4), "spectral")
    with pytest.raises(ValueError, match="block"):
        whiten(torch.randn(2, 1, 4, 4), "spectral", 0)


@pytest.mark.parametrize("kind,block", PROJECTIONS)
def test_white_noise_stays_statistically_white_gaussian(kind, block):
    """For v ~ N(0, I), W(v) must look like white Gaussian noise. Fixed seed, N = 2000 samples of
    16x16. Tolerances (measured values in brackets, per kind, on this seed):
    - squared norm is exactly d per sample (it is a projection onto blocks summing to d);
    - per-frequency power, averaged over N: each coefficient's power has variance <= 1, so the
      mean has SE <= 1/sqrt(2000) = 0.022; we allow 0.15 (~7 SE) [0.94..1.07];
    - pooled pixel moments (512k values): mean SE 0.0014 -> 0.01; kurtosis of a Gaussian is 3 with
      SE ~ sqrt(24/n) = 0.007, and the blockwise projection lowers it by O(1/d): allow 0.05 [2.984..2.988];
    - off-diagonal pixel covariances: each has SE 1/sqrt(N) = 0.022; the max over 32640 pairs of
      a Gaussian is ~4.5 SE: allow 6/sqrt(N) = 0.134 [0.09..0.105];
    - one pixel across samples vs N(0, 1): KS p-value > 1e-3 [0.17..0.63]."""
    n = 2000
    v = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    w = whiten(v, kind, block)
    assert torch.allclose(w.flatten(1).pow(2).sum(1), torch.full((n,), 256.0, dtype=torch.float64))
    power = (torch.fft.fft2(w, norm="ortho").abs() ** 2).mean(0)
    assert (power - 1).abs().max() < 0.15
    p = w.flatten()
    assert abs(p.mean()) < 0.01
    assert abs((p ** 3).mean()) < 0.02
    kurt = ((p - p.mean()) ** 4).mean() / p.var() ** 2
    assert abs(kurt - 3.0) < 0.05
    cov = torch.cov(w.flatten(1).T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 6 / math.sqrt(n)
    assert st.kstest(w[:, 0, 3, 5].numpy(), "norm").pvalue > 1e-3
