"""Seed derivation and per-sample noise streams as properties over many keys: every key of
``derive_seed`` (run seed, prompt/group, sample index, stream tag) matters, streams depend only on
their own seed, and spawned child streams are distinct from each other and from their parent."""

import random

import pytest
import scipy.stats as st
import torch

from ntrk_lightning.noise import NoiseSource, derive_seed, sample_seeds

pytestmark = pytest.mark.core


def _random_keys(rng, n, length=3):
    # keys below 2**32, and some 63-bit ones (sample seeds are fed back as keys by spawn)
    return [tuple(rng.choice([rng.randrange(1 << 32), rng.randrange(1 << 63), rng.randrange(50)])
                  for _ in range(length)) for _ in range(n)]


def test_every_key_changes_the_seed():
    """For 300 random key tuples, replacing any one key (by key + 1, or by another random value)
    changes the seed; a seed collision of two 63-bit hashes has probability ~2^-63 per pair."""
    rng = random.Random(0)
    for keys in _random_keys(rng, 300):
        base = derive_seed(*keys)
        assert 0 <= base < (1 << 63) and derive_seed(*keys) == base
        for pos in range(len(keys)):
            for new in (keys[pos] + 1, rng.randrange(1 << 40)):
                if new == keys[pos]:
                    continue
                changed = list(keys)
                changed[pos] = new
                assert derive_seed(*changed) != base, (keys, pos, new)
        if keys[0] != keys[1]:
            assert derive_seed(keys[1], keys[0], keys[2]) != base  # order matters


def test_seeds_of_a_run_are_all_distinct_across_runs_prompts_and_samples():
    seeds = [s for run in range(4) for prompt in range(12) for s in sample_seeds(run, 25, group=prompt)]
    assert len(set(seeds)) == len(seeds) == 4 * 12 * 25
    assert sample_seeds(7, 5, group=3) == [derive_seed(7, 3, i) for i in range(5)]
    assert sample_seeds(7, 5) == sample_seeds(7, 5, group=0)
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(1, -1)


def test_a_row_stream_depends_only_on_its_seed():
    seeds = sample_seeds(3, 6)
    whole = NoiseSource(seeds, (2, 3))
    alone = [NoiseSource([s], (2, 3)) for s in seeds]
    for _ in range(3):
        a = whole.randn()
        assert a.shape == (6, 2, 3) and a.dtype == torch.float32
        assert torch.equal(a, torch.cat([n.randn() for n in alone]))
    # drawing for some rows advances only those rows
    part = whole.randn(rows=[1, 4])
    assert torch.equal(part, torch.cat([alone[1].randn(), alone[4].randn()]))
    assert torch.equal(whole.randn()[0], alone[0].randn()[0])
    u = whole.rand()
    assert u.shape == (6,) and u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all()
    assert len(whole) == 6 and whole.seeds == seeds
    assert NoiseSource(seeds, (4,), dtype=torch.float64).randn().dtype == torch.float64


def test_spawned_streams_are_distinct_and_keyed_on_the_parent_seed_tag_and_slot():
    seeds = sample_seeds(11, 3)
    parent = NoiseSource(seeds, (16,))
    for tag in (0, 5):
        child = parent.spawn(4, tag=tag)
        assert len(child) == 12
        assert child.seeds == [derive_seed(s, tag, j) for s in seeds for j in range(4)]
        draws = child.randn()
        # 12 distinct streams, none equal to a parent's stream
        assert len({tuple(r.tolist()) for r in draws}) == 12
        par = NoiseSource(seeds, (16,)).randn()
        assert not any(torch.equal(d, p) for d in draws for p in par)
        # a sample's children do not depend on the other samples of the batch
        assert torch.equal(NoiseSource(seeds[1:2], (16,)).spawn(4, tag=tag).randn(), draws[4:8])
    assert parent.spawn(2, tag=0).seeds != parent.spawn(2, tag=1).seeds
    with pytest.raises(ValueError, match="k must"):
        parent.spawn(0)


def test_noise_is_standard_normal_and_independent_across_streams():
    """20 streams x 2000 draws: KS against N(0, 1) (p > 1e-3), and the correlation of neighbouring
    streams within 5 / sqrt(2000) (5 SE)."""
    src = NoiseSource(sample_seeds(0, 20), (2000,))
    x = src.randn().double()
    assert st.kstest(x.flatten().numpy(), "norm").pvalue > 1e-3
    corr = torch.corrcoef(x)
    off = corr - torch.eye(20, dtype=torch.float64)
    assert off.abs().max() < 5 / 2000 ** 0.5


def test_uniforms_come_from_each_rows_own_stream():
    seeds = sample_seeds(5, 4)
    a, b = NoiseSource(seeds, (2,)), NoiseSource(seeds[2:], (2,))
    ua, ub = a.rand(), b.rand()
    assert torch.equal(ua[2:], ub) and len(set(ua.tolist())) == 4
    torch.manual_seed(0)  # the global generator must play no part
    assert torch.equal(NoiseSource(seeds, (2,)).rand(), ua)


def test_spawn_reduces_seeds_modulo_two_to_the_63():
    big = (1 << 63) + 5  # a caller's 64-bit seed: children are keyed on it modulo 2^63
    assert NoiseSource([big], (1,)).spawn(2, tag=3).seeds == [derive_seed(5, 3, j) for j in range(2)]


def test_derived_seeds_use_both_hash_words():
    """The 63 bits combine two independent 32-bit hash words: no derived seed repeats its own bits
    (bits 1..30 equal to bits 32..61 happens with probability 2^-30 per seed)."""
    mask = (1 << 30) - 1
    seeds = sample_seeds(3, 1000)
    assert not any(((s >> 32) & mask) == ((s >> 1) & mask) for s in seeds)


def test_noise_does_not_depend_on_the_global_default_dtype():
    seeds = sample_seeds(1, 3)
    # 64 values: torch draws fewer than 16 normals the same way in float32 and float64, more not
    ref = NoiseSource(seeds, (64,)).randn()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        again = NoiseSource(seeds, (64,)).randn()
    finally:
        torch.set_default_dtype(old)
    assert again.dtype == torch.float32 and torch.equal(again, ref)
