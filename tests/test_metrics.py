"""The metrics package: reward statistics, FID (+ reference statistics, feature resolution),
diversity and the open_clip CLIP score; exactness across processes on real gloo ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import metrics as M
from ntrk_lightning.data.digits import real_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits16() -> torch.Tensor:
    x, _ = real_images(16)
    return x  # (1797, 1, 16, 16) in [0, 1]


@pytest.fixture(scope="module")
def digit_features():
    return M.build_feature("digits")


# ---------------------------------------------------------------------------------------------
# RewardStatistics
# ---------------------------------------------------------------------------------------------

def test_reward_statistics_match_numpy_and_ignore_batching():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(101, generator=g, dtype=torch.float64) * 3 + 1
    m = M.RewardStatistics()
    for chunk in torch.split(v, [7, 50, 1, 43]):
        m.update(chunk)
    res = m.compute()
    ref = v
    a = v.numpy()
    assert res["count"] == 101 and res["nonfinite"] == 0
    assert res["mean"] == pytest.approx(a.mean(), rel=1e-12)
    assert res["std"] == pytest.approx(a.std(), rel=1e-12)  # population std
    assert (res["min"], res["max"]) == (a.min(), a.max())
    for k, q in M.reward_stats.QUANTILES.items():
        assert res[k] == pytest.approx(np.quantile(a, q), rel=1e-12), k
    # same values in another order and split: bit-identical (statistics from sorted values)
    m2 = M.RewardStatistics()
    perm = torch.randperm(101, generator=g)
    for chunk in torch.split(ref[perm], 33):
        m2.update(chunk)
    assert m2.compute() == res


def test_reward_statistics_nonfinite_and_empty():
    m = M.RewardStatistics()
    m.update(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    res = m.compute()
    assert res["count"] == 2 and res["nonfinite"] == 2
    assert res["mean"] == 2.0 and res["q50"] == 2.0 and res["std"] == 1.0
    empty = M.RewardStatistics()
    with pytest.warns(UserWarning):
        res = empty.compute()
    assert res["count"] == 0
    assert all(math.isnan(res[k]) for k in ("mean", "std", "min", "max", "q05", "q50", "q95"))
    with pytest.raises(ValueError, match="expects a \\(B,\\) tensor"):
        M.RewardStatistics().update(torch.zeros(2, 2))
    f32 = M.RewardStatistics()
    f32.update(torch.tensor([0.1, 0.2], dtype=torch.float32))  # any float dtype, stored as float64
    assert f32.compute()["mean"] == pytest.approx(0.15, rel=1e-7)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

def test_build_feature_specs(digit_features):
    assert digit_features.num_features == 64 and M.feature_name(digit_features) == "digits"
    f = M.build_feature("torch.nn:Identity")
    assert M.feature_name(f) == "torch.nn:Identity"
    x = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(f(x), x.float() / 255.0)  # user extractors always receive float in [0, 1]
    with pytest.raises(ValueError, match="cannot import module"):
        M.build_feature("no_such_package.mod:Thing")
    with pytest.raises(ValueError, match="not an nn.Module"):
        M.build_feature("math:sqrt")
    # identity changes with the weights, not only the name
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    assert M.feature_identity(a) != M.feature_identity(b)
    b.load_state_dict(a.state_dict())
    assert M.feature_identity(a) == M.feature_identity(b)


def test_inception_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / M.INCEPTION_WEIGHTS_FILE
    assert M.default_inception_weights() == expected
    with pytest.raises(FileNotFoundError) as e:
        M.build_feature("inception")
    msg = str(e.value)
    assert str(expected) in msg and M.INCEPTION_WEIGHTS_URL in msg and "Nothing is downloaded" in msg
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        M.FrechetDistance("inception", weights_path=tmp_path / "elsewhere.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a plain InceptionV3 state dict"):
        M.InceptionFeatures(weights_path=bad)


class _SpyNet(nn.Module):
    """Stand-in for InceptionV3: records its input, returns 2048 features."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2048)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.proj(x.float().mean(dim=(2, 3)))


def test_inception_wrapper_feeds_uint8_rgb():
    spy = _SpyNet()
    feat = M.InceptionFeatures(net=spy)
    u8 = torch.randint(0, 256, (3, 1, 9, 7), dtype=torch.uint8)
    f_u8 = feat(u8)
    f_float = feat(u8.float() / 255.0)
    assert f_u8.shape == (3, 2048) and torch.equal(f_u8, f_float)  # float input quantised exactly
    assert all(t.dtype == torch.uint8 and t.shape == (3, 3, 9, 7) for t in spy.seen)
    assert torch.equal(spy.seen[0][:, 0], spy.seen[0][:, 2])  # grey repeated to RGB


# ---------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------

def test_fid_self_zero_shifted_positive_and_matches_torchmetrics(digits16, digit_features, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    x = digits16[:400]
    stats = M.ReferenceStats.from_features(torch.cat([M.features.extract(digit_features, x[i:i + 128])
                                                      for i in range(0, 400, 128)]), M.feature_identity(digit_features))
    same = M.FrechetDistance(digit_features, reference=stats)
    for i in range(0, 400, 100):
        same.update(x[i:i + 100])
    fid_self = float(same.compute())
    assert abs(fid_self) < 1e-6

    shifted = M.FrechetDistance(digit_features, reference=stats)
    shifted.update((x * 0.6 + 0.3).clamp(0, 1))
    fid_shift = float(shifted.compute())
    assert fid_shift > 10.0

    # against torchmetrics' own FID (real images fed directly) on two different sets
    other = digits16[1000:1300]
    ours = M.FrechetDistance(digit_features, reference=stats)
    ours.update(other)
    ref = FrechetInceptionDistance(feature=digit_features, normalize=True)  # torchmetrics' own FID
    ref.update(x, real=True)
    ref.update(other, real=False)
    expected = float(ref.compute())
    assert float(ours.compute()) == pytest.approx(expected, rel=1e-6)
    # uint8 input (the saved 8-bit images) is the same as their float values
    q = (other * 255).round() / 255
    a, b = M.FrechetDistance(digit_features, reference=stats), M.FrechetDistance(digit_features, reference=stats)
    a.update(q)
    b.update((q * 255).round().byte())
    assert float(a.compute()) == float(b.compute())
    # precomputed features give the same as images
    c = M.FrechetDistance(digit_features, reference=stats)
    c.update(features=M.features.extract(digit_features, q))
    assert float(c.compute()) == pytest.approx(float(a.compute()), rel=1e-12)


def test_fid_states_stay_float64_under_a_bf16_cast(digits16, digit_features):
    feats = M.features.extract(digit_features, digits16[:300])
    stats = M.ReferenceStats.from_features(feats[:150], M.feature_identity(digit_features))
    plain = M.FrechetDistance(digit_features, reference=stats)
    plain.update(features=feats[150:])
    cast = M.FrechetDistance(M.build_feature("digits"), reference=stats).to(torch.bfloat16)
    cast.update(features=feats[150:])
    assert cast.fake_features_cov_sum.dtype == torch.float64
    assert float(cast.compute()) == pytest.approx(float(plain.compute()), rel=1e-12)


def test_fid_edge_cases(digit_features, digits16):
    stats = M.ReferenceStats.from_features(M.features.extract(digit_features, digits16[:50]),
                                         M.feature_identity(digit_features))
    one = M.FrechetDistance(digit_features, reference=stats)
    one.update(digits16[:1])
    with pytest.warns(UserWarning, match="at least 2"):
        assert math.isnan(float(one.compute()))
    with pytest.raises(ValueError, match="real images cannot be added"):
        one.update(digits16[:2], real=True)
    with pytest.raises(ValueError, match="have 3 features but the extractor .digits. gives 64"):
        M.FrechetDistance(digit_features, reference=M.ReferenceStats(torch.zeros(3), torch.eye(3), 5, "digits@x"))
    with pytest.raises(ValueError, match="computed with feature 'inception'"):
        M.FrechetDistance(digit_features, reference=M.ReferenceStats(torch.zeros(64), torch.eye(64), 5, "inception@x"))


# ---------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------

def test_reference_stats_digits_cached_once(tmp_path, monkeypatch, digit_features, digits16):
    cache = tmp_path / "cache"
    s1 = M.reference_stats("digits", digit_features, cache_dir=cache)
    files = list(cache.glob("refstats-*.safetensors"))
    assert len(files) == 1 and s1.n == 1797 and s1.source == "digits:16" and s1.dim == 64
    direct = M.ReferenceStats.from_features(M.features.extract(digit_features, digits16), "d")
    assert torch.allclose(s1.mean, direct.mean, rtol=0, atol=1e-10)
    assert torch.allclose(s1.cov, direct.cov, rtol=1e-9, atol=1e-10)

    import metrics.reference as R

    def boom(*a, **k):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(R, "_accumulate", boom)
    s2 = M.reference_stats("digits:16", M.build_feature("digits"), cache_dir=cache)  # same identity
    assert torch.equal(s1.cov, s2.cov)
    with pytest.raises(AssertionError, match="recomputed"):  # another feature: another key
        M.reference_stats("digits", M.build_feature("torch.nn:Flatten"), cache_dir=cache)
    with pytest.raises(AssertionError, match="recomputed"):  # another resolution: another key
        M.reference_stats("digits:8", digit_features, cache_dir=cache)


def test_reference_stats_of_one_digit_class(tmp_path, digit_features, digits16):
    """``digits:R:C``: the real digits of class C only (the reference of samples steered to C)."""
    _, labels = real_images(16)
    s3 = M.reference_stats("digits:16:3", digit_features, cache_dir=tmp_path)
    assert s3.n == int((labels == 3).sum()) and s3.source == "digits:16:3"
    direct = M.ReferenceStats.from_features(M.features.extract(digit_features, digits16[labels == 3]), "d")
    assert torch.allclose(s3.mean, direct.mean, rtol=0, atol=1e-10)
    all_digits = M.reference_stats("digits:16", digit_features, cache_dir=tmp_path)
    assert not torch.allclose(s3.mean, all_digits.mean)
    with pytest.raises(FileNotFoundError, match="digits"):
        M.reference_stats("digits:16:12", digit_features, cache_dir=tmp_path)


def test_reference_stats_folder_file_and_errors(tmp_path, digit_features, digits16):
    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    u8 = (digits16[:30] * 255).round().byte()
    for i in range(30):
        Image.fromarray(u8[i, 0].numpy(), mode="L").save(folder / f"r{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    stats = M.reference_stats(folder, digit_features, cache_dir=tmp_path / "c")
    direct = M.ReferenceStats.from_features(M.features.extract(digit_features, u8), "d")
    assert stats.n == 30 and torch.allclose(stats.cov, direct.cov, rtol=1e-9, atol=1e-12)
    # save / load round trip; a stats file is used as is
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = M.reference_stats(path, digit_features)
    assert torch.equal(loaded.mean, stats.mean) and loaded.n == 30 and loaded.feature == stats.feature
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # a changed folder is a new cache entry
    Image.fromarray(u8[0, 0].numpy(), mode="L").save(folder / "r99.png")
    assert M.reference_stats(folder, digit_features, cache_dir=tmp_path / "c").n == 31
    with pytest.raises(FileNotFoundError, match="neither 'digits"):
        M.reference_stats(tmp_path / "missing", digit_features)
    (tmp_path / "bogus.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a reference statistics file"):
        M.ReferenceStats.load(tmp_path / "bogus.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.ImageFolderError, match="no images"):
        M.reference_stats(tmp_path / "empty", digit_features)


# ---------------------------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------------------------

def _brute_mean_distance(f: torch.Tensor) -> float:
    d = [float((f[i] - f[j]).norm()) for i in range(len(f)) for j in range(i + 1, len(f))]
    return sum(d) / len(d)


def test_diversity_overall_and_per_group(digits16, digit_features):
    x = digits16[:23]
    groups = torch.tensor([0] * 10 + [1] * 12 + [7])  # group 7 has one sample: excluded
    m = M.Diversity(digit_features)
    m.update(x[:9], groups[:9])
    m.update((x[9:] * 255).round().byte(), groups[9:])
    res = m.compute()
    f = M.features.extract(digit_features, torch.cat([x[:9], (x[9:] * 255).round() / 255]))
    assert res["overall"] == pytest.approx(_brute_mean_distance(f), rel=1e-10)
    assert set(res["per_group"]) == {0, 1}
    assert res["per_group"][0] == pytest.approx(_brute_mean_distance(f[:10]), rel=1e-10)
    assert res["per_group"][1] == pytest.approx(_brute_mean_distance(f[10:22]), rel=1e-10)
    # identical images: zero diversity; no groups: empty per_group
    same = M.Diversity(digit_features)
    same.update(x[:1].repeat(4, 1, 1, 1))
    assert same.compute() == {"overall": 0.0, "per_group": {}}
    empty = M.Diversity(digit_features)
    with pytest.warns(UserWarning):
        r = empty.compute()
    assert math.isnan(r["overall"]) and r["per_group"] == {}
    with pytest.raises(ValueError, match="2 group indices for 3"):
        M.Diversity(digit_features).update(x[:3], torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_clip import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_equals_direct_computation(tiny_clip):
    import open_clip
    from torchvision.transforms import v2 as T

    cfg, weights = tiny_clip
    metric = M.OpenCLIPScore(str(cfg), weights)
    model, _, _ = open_clip.create_model_and_transforms(cfg.stem, pretrained=str(weights))
    model.eval()
    tok = open_clip.get_tokenizer(cfg.stem)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 20, 44, generator=g)  # non-square: resize + centre crop matter
    prompts = ["a red digit", "a blue square", "zero", "one", "two", "a cat"]
    pp = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
                    T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    with torch.no_grad():
        img = model.encode_image(pp(images), normalize=True)
        txt = model.encode_text(tok(prompts), normalize=True)
    cos = (img * txt).sum(-1)
    direct = 100 * cos.clamp_min(0)
    assert (direct > 0).any() and (cos < 1).all()
    ours = metric.scores(images, prompts)
    assert torch.allclose(ours, direct, rtol=1e-4, atol=1e-4)
    metric.update(images[:4], prompts[:4])
    metric.update((images[4:] * 255).round().byte(), prompts[4:])
    q = images.clone()
    q[4:] = (q[4:] * 255).round() / 255
    with torch.no_grad():
        expected = 100 * (model.encode_image(pp(q), normalize=True) * txt).sum(-1).clamp_min(0)
    assert float(metric.compute()) == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-4)
    # already-built model: same numbers; gradients reach the images
    built = M.OpenCLIPScore(model=model, tokenizer=tok)
    x = images.clone().requires_grad_(True)
    s = built.scores(x, prompts)
    assert torch.allclose(s.detach(), direct, rtol=1e-4, atol=1e-4)
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_score_grey_images_and_errors(tiny_clip, tmp_path):
    cfg, weights = tiny_clip
    metric = M.OpenCLIPScore(str(cfg), weights)
    grey = torch.rand(2, 1, 32, 32)
    assert torch.allclose(metric.scores(grey, ["a", "b"]), metric.scores(grey.expand(-1, 3, -1, -1), ["a", "b"]))
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        metric.scores(torch.rand(3, 3, 32, 32), ["a", "b"])
    with pytest.warns(UserWarning):
        assert math.isnan(float(M.OpenCLIPScore(str(cfg), weights).compute()))
    with pytest.raises(FileNotFoundError, match="CLIP weights file not found"):
        M.OpenCLIPScore(str(cfg), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="download tag"):
        M.OpenCLIPScore("ViT-B-32", "openai")
    with pytest.raises(ValueError, match="offline"):
        M.OpenCLIPScore("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ValueError, match="needs a local weights file"):
        M.OpenCLIPScore(str(cfg))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        M.OpenCLIPScore("no-such-model", weights)


# ---------------------------------------------------------------------------------------------
# Exact on real gloo ranks: 3 processes, uneven shards, one rank empty
# ---------------------------------------------------------------------------------------------

def test_metrics_exact_across_ranks_with_uneven_and_empty_shards(tmp_path, digits16, digit_features):
    n = 29
    images = (digits16[100:100 + n] * 255).round().byte()
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(5))
    groups = torch.arange(n) % 4
    ref = M.ReferenceStats.from_features(M.features.extract(digit_features, digits16[500:900]),
                                         M.feature_identity(digit_features)).save(tmp_path / "ref.safetensors")
    torch.save({"images": images, "rewards": rewards, "groups": groups, "reference": str(ref)}, tmp_path / "in.pt")

    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_metrics_worker.py"), str(tmp_path / "in.pt"),
                           str(out), "11,0,18"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = json.loads(out.read_text())

    # the same metrics in this process, one rank, batches of 4 over all images
    stats, fid, div = M.RewardStatistics(), M.FrechetDistance("digits", reference=ref), M.Diversity("digits")
    for s in range(0, n, 4):
        stats.update(rewards[s:s + 4])
        fid.update(images[s:s + 4])
        div.update(images[s:s + 4], groups[s:s + 4])
    single_div = div.compute()
    assert multi["stats"]["count"] == n
    assert multi["stats"] == stats.compute()  # statistics of sorted values: bit-identical
    # features are float32 network outputs; other batch compositions move them by ~1e-7
    assert multi["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert multi["diversity"]["overall"] == pytest.approx(single_div["overall"], rel=1e-6)
    assert multi["diversity"]["per_group"].keys() == {"0", "1", "2", "3"}
    for k, v in single_div["per_group"].items():
        assert multi["diversity"]["per_group"][str(k)] == pytest.approx(v, rel=1e-6)


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(8, dtype=torch.float64)
    mu = torch.randn(8, generator=g, dtype=torch.float64)
    d = torch.randn(8, generator=g, dtype=torch.float64)
    # same covariance: the squared mean distance; covariance scaled by 4: + tr(cov)
    assert float(M.frechet_distance(mu, cov, mu + d, cov)) == pytest.approx(float(d @ d), rel=1e-9)
    assert float(M.frechet_distance(mu, cov, mu, 4 * cov)) == pytest.approx(float(cov.trace()), rel=1e-9)
    assert float(M.frechet_distance(mu, cov, mu, cov)) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Metric groups (one builder for predict and evaluate) and their persisted states
# ---------------------------------------------------------------------------------------------

def _group(digit_features, reference):
    from metrics.group import build_groups

    return build_groups(["a"], ["reward", "judge"], digit_features, reference, diversity=True)["a"]


def test_group_runs_the_feature_network_once_per_batch(digits16, digit_features):
    from metrics.group import summarize_group, update_group

    calls = []
    handle = digit_features.register_forward_hook(lambda *_: calls.append(1))
    try:
        stats = M.ReferenceStats.from_features(M.features.extract(digit_features, digits16[:200]),
                                               M.feature_identity(digit_features))
        calls.clear()
        group = _group(digit_features, stats)
        u8 = (digits16[300:340] * 255).round().byte()
        update_group(group, u8, {"reward": torch.arange(40.0), "judge": torch.ones(40)}, torch.arange(40) % 2)
        assert len(calls) == 1  # FID and diversity share one forward pass
    finally:
        handle.remove()
    s = summarize_group(group, ["reward", "judge"])
    assert set(s) == {"rewards", "fid", "diversity", "clip_score"} and s["clip_score"] is None
    assert s["rewards"]["reward"]["mean"] == pytest.approx(19.5) and s["rewards"]["judge"]["count"] == 40
    assert s["fid"] > 0 and set(s["diversity"]["per_group"]) == {"0", "1"}
    # the same numbers as the metrics fed separately
    fid, div = M.FrechetDistance(digit_features, reference=stats), M.Diversity(digit_features)
    fid.update(u8)
    div.update(u8, torch.arange(40) % 2)
    assert s["fid"] == pytest.approx(float(fid.compute()), rel=1e-12)
    assert s["diversity"]["overall"] == pytest.approx(div.compute()["overall"], rel=1e-12)


def test_saved_group_states_merge_to_the_whole_set(digits16, digit_features, tmp_path):
    """Persisted states of one part plus live updates of the rest give the numbers of feeding the
    whole set at once (what a resumed run relies on instead of reading images back)."""
    from metrics.group import group_states, merge_group_states, summarize_group, update_group

    stats = M.ReferenceStats.from_features(M.features.extract(digit_features, digits16[:200]),
                                           M.feature_identity(digit_features))
    u8 = (digits16[400:460] * 255).round().byte()
    rewards = torch.randn(60, generator=torch.Generator().manual_seed(3))
    groups = torch.arange(60) % 3

    def feed(group, lo, hi):
        update_group(group, u8[lo:hi], {"reward": rewards[lo:hi], "judge": -rewards[lo:hi]}, groups[lo:hi])

    whole = _group(digit_features, stats)
    feed(whole, 0, 60)
    first = _group(digit_features, stats)
    feed(first, 0, 35)
    torch.save(group_states(first), tmp_path / "s.pt")
    resumed = _group(digit_features, stats)
    feed(resumed, 35, 60)
    merge_group_states(resumed, torch.load(tmp_path / "s.pt", weights_only=True))
    a, b = summarize_group(whole, ["reward", "judge"]), summarize_group(resumed, ["reward", "judge"])
    assert a["rewards"] == b["rewards"]  # statistics of sorted values: bit-identical
    # features are float32 network outputs; other batch compositions move them by ~1e-7
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
    assert b["diversity"]["overall"] == pytest.approx(a["diversity"]["overall"], rel=1e-6)
    assert b["diversity"]["per_group"].keys() == a["diversity"]["per_group"].keys()
    for k, v in a["diversity"]["per_group"].items():
        assert b["diversity"]["per_group"][k] == pytest.approx(v, rel=1e-6)


def test_fid_is_a_thin_metric_over_the_pure_distance(digits16, digit_features):
    """FrechetDistance.compute is frechet_distance of the Gaussian fit of what it was fed."""
    from torchmetrics import Metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    stats = M.ReferenceStats.from_features(M.features.extract(digit_features, digits16[:300]),
                                           M.feature_identity(digit_features))
    fid = M.FrechetDistance(digit_features, reference=stats)
    assert isinstance(fid, Metric) and not isinstance(fid, FrechetInceptionDistance)
    f = M.features.extract(digit_features, digits16[600:800])
    fid.update(features=f)
    mu, cov = f.mean(0), torch.cov(f.T)
    assert float(fid.compute()) == pytest.approx(float(M.frechet_distance(mu, cov, stats.mean, stats.cov)), rel=1e-9)
