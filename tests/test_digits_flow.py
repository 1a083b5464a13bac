"""The shipped digits rectified-flow model ``digits_flow`` (trained by this project, loaded offline):
files and interface, what the network learned, bit-reproducible training, plain-sample quality
through the core's stochastic flow step, and NTRK on the flow main-job config."""

import json
import math

import pytest
import torch

import ntrk_lightning as ntrk
from ntrk_lightning.backbones import DigitsFlowBackbone
from ntrk_lightning.backbones.digits_flow import (load_config, load_digits_flow, load_flow_unet, make_scheduler,
                                                  weights_dir)
from ntrk_lightning.backbones.digits_unet import load_unet
from ntrk_lightning.data.digits import real_halves, real_images
from ntrk_lightning.training.flow import sample_flow_times
from ntrk_lightning.training.quality import core_sample, fid
from pipeline_utils import predict_args, records, run_cli
from rewards.digits import DigitFeatures, load_shipped_classifier


#: the model card's quality bound: FID(samples, real half) / FID(real half, real half) at 25 steps
FID_RATIO_BOUND = 1.5


@pytest.fixture(scope="module")
def flow_model():
    return load_digits_flow(), make_scheduler()


def _card():
    return json.loads((weights_dir() / "digits_flow_card.json").read_text())


def test_shipped_flow_model_is_small_loads_offline_and_speaks_the_flow_interface(flow_model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, sch = flow_model
    assert (weights_dir() / "digits_flow.safetensors").stat().st_size <= 1.5 * 1024 * 1024
    # same size budget as digits16: same architecture, same parameter count
    n_params = sum(p.numel() for p in model.denoiser.parameters())
    assert n_params == sum(p.numel() for p in load_unet().parameters())
    assert isinstance(sch, FlowMatchEulerDiscreteScheduler) and sch.config.shift == 1.0
    assert not sch.config.use_dynamic_shifting
    sch.set_timesteps(25)
    # the scheduler's float timesteps are sigma * 1000, from pure noise down
    assert torch.allclose(sch.timesteps, sch.sigmas[:-1] * 1000)
    assert sch.sigmas[0] == 1.0 and sch.sigmas[-1] == 0.0
    x = torch.randn(3, *model.sample_shape)
    with torch.no_grad():
        v = model.denoiser(x, sch.timesteps[:3].float())
        v_scalar = model.denoiser(x, float(sch.timesteps[5]))
    assert model.sample_shape == (1, 16, 16) and v.shape == x.shape == v_scalar.shape
    assert torch.isfinite(v).all() and model.decode(x).shape == x.shape

    bb = DigitsFlowBackbone()
    bb.load()
    assert isinstance(bb.make_scheduler(), FlowMatchEulerDiscreteScheduler)
    assert DigitsFlowBackbone(shift=3.0).make_scheduler().config.shift == 3.0
    with torch.no_grad():
        assert torch.equal(bb.model().denoiser(x, sch.timesteps[:3].float()), v)

    with pytest.raises(FileNotFoundError, match="digits_flow_config.json"):
        load_flow_unet(root="/nonexistent")
    with pytest.raises(FileNotFoundError, match="digits_flow.safetensors"):
        DigitsFlowBackbone(weights_dir="/nonexistent")
    with pytest.raises(ValueError, match="unknown digits flow model"):
        DigitsFlowBackbone(model_name="digits16")
    assert load_config()["prediction_type"] == "flow_velocity"


@pytest.mark.slow
def test_network_predicts_the_velocity_of_held_out_digits(flow_model):
    """On the 359 test digits (never seen in training), the exported network's prediction of
    v = eps - x0 at x_s = (1 - s) x0 + s eps, t = 1000 s, explains most of the target's variance
    at every noise level: the mean squared error is under 30% of the target's variance (what the
    best input-free predictor achieves; the shipped model: 8-15%). Measured while writing this
    test: a flipped sign or swapped roles of x0 and eps give ~400%, timesteps s instead of
    1000 s give 48-80%."""
    model, _ = flow_model
    x0 = real_images(16, "test")[0] * 2 - 1
    g = torch.Generator().manual_seed(0)
    for lo, hi in ((0.02, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.0)):
        errs, var = [], []
        for _ in range(4):
            eps = torch.randn(x0.shape, generator=g)
            s = lo + (hi - lo) * torch.rand(len(x0), generator=g)
            s_ = s.view(-1, 1, 1, 1)
            target = eps - x0
            with torch.no_grad():
                v = model.denoiser((1 - s_) * x0 + s_ * eps, s * 1000)
            errs.append(((v - target) ** 2).mean())
            var.append(target.var())
        rel = float(torch.stack(errs).mean() / torch.stack(var).mean())
        assert rel < 0.3, (lo, hi, rel)


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_flow_times(200_000, "uniform", generator=g)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # U(0, 1): mean 1/2, 5% of the draws below 0.05 (standard errors ~0.0006 and ~0.0005)
    assert float(u.mean()) == pytest.approx(0.5, abs=0.004)
    assert float((u < 0.05).float().mean()) == pytest.approx(0.05, abs=0.003)
    ln = sample_flow_times(200_000, "logit_normal", logit_mean=0.5, logit_std=1.0, generator=g)
    z = torch.logit(ln.double())
    assert float(z.mean()) == pytest.approx(0.5, abs=0.01) and float(z.std()) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="time_sampling"):
        sample_flow_times(3, "beta")


@pytest.mark.slow
def test_flow_training_is_deterministic(tmp_path):
    """Two short `ntrk fit` runs of the shipped flow config with the same seed give the same
    weights (what makes the full retrain reproducible), with the shipped file's layout."""
    from safetensors.torch import load_file

    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        run_cli(["fit", "-c", "configs/digits_flow_fit.yaml", "--trainer.max_steps", "6",
                 "--model.init_args.warmup_steps", "2", "--model.init_args.export_dir", str(out),
                 "--model.init_args.eval_samples", "0", "--trainer.default_root_dir", str(out / "fit"),
                 "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                 ], timeout=600)
        outs.append(load_file(str(out / "digits_flow.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
    shipped = load_file(str(weights_dir() / "digits_flow.safetensors"))
    assert shipped.keys() == outs[0].keys()
    assert not all(torch.equal(shipped[k], outs[0][k]) for k in shipped)  # 6 steps are not the shipped 3000
    cfg = json.loads((tmp_path / "r0" / "digits_flow_config.json").read_text())
    assert cfg["scheduler_class"] == "FlowMatchEulerDiscreteScheduler" and cfg["prediction_type"] == "flow_velocity"


@pytest.mark.slow
def test_plain_flow_samples_are_close_to_real_digits(flow_model):
    """300 plain 25-step samples (the core's stochastic flow step, eta = 1) against real half B,
    relative to 300 real digits from half A against the same half B (equal set sizes, so the
    small-sample bias of the two FIDs is alike): the ratio is within the card's bound of 1.5.
    A denoiser whose velocity is scaled by 0.9 fails (ratio 2.4 measured while writing this test)."""
    model, sch = flow_model
    feat = DigitFeatures(load_shipped_classifier("reward"))
    half_a, half_b = real_halves(16)
    n = 300
    fake = core_sample(model, sch, n, num_steps=25, eta=1.0, seed=1)
    ratio = fid(feat, fake, half_b) / fid(feat, half_a[:n], half_b)
    assert _card()["quality"]["fid_ratio"] <= FID_RATIO_BOUND  # the card's 1000-sample measurement
    assert ratio <= FID_RATIO_BOUND, ratio
    # every digit class appears (no mode dropping): at least 4% each (10% expected)
    judge = load_shipped_classifier("judge")
    with torch.no_grad():
        hist = torch.bincount(judge(fake).argmax(1), minlength=10).float() / n
    assert float(hist.min()) >= 0.04, hist.tolist()


@pytest.mark.slow
def test_ntrk_beats_plain_on_the_flow_main_job_config(tmp_path):
    """`ntrk predict -c configs/digits_flow_ntrk.yaml` with few samples: NTRK's reward is far above
    plain's on the same seeds (more than 10 standard errors of the difference), and the held-out
    judge agrees."""
    out = tmp_path / "run"
    run_cli(predict_args(out, ["--data.init_args.samples_per_prompt", "48", "--data.init_args.batch_size", "48",
                               "--model.init_args.num_steps", "25"], config="configs/digits_flow_ntrk.yaml"),
            timeout=600)
    recs = records(out)
    by = {a: [r for r in recs if r["arm"] == a] for a in ("ntrk", "plain")}
    assert len(by["ntrk"]) == len(by["plain"]) == 48
    assert all(r["nfe"] == 25 for r in recs)
    r_n = torch.tensor([r["rewards"]["reward"] for r in by["ntrk"]])
    r_p = torch.tensor([r["rewards"]["reward"] for r in by["plain"]])
    se = math.sqrt(r_n.var() / len(r_n) + r_p.var() / len(r_p))
    assert float(r_n.mean() - r_p.mean()) > 10 * se, (float(r_n.mean()), float(r_p.mean()), se)
    acc_n = sum(r["rewards"]["judge_accuracy"] for r in by["ntrk"]) / 48
    acc_p = sum(r["rewards"]["judge_accuracy"] for r in by["plain"]) / 48
    assert acc_n > 0.7 and acc_n > acc_p + 0.4, (acc_p, acc_n)
