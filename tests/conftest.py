"""Test-wide settings: offline hub, a repository-local cache for fitted testbeds."""

import os
from pathlib import Path

# Before anything imports huggingface_hub: an uncached hub id must fail at once, never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NTRK_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "ntrk"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gmm_testbed():
    """(DiffusionModel, DigitsGMM, scheduler) of the exact digits mixture."""
    from ntrk_lightning.backbones.gmm import load_digits_gmm

    return load_digits_gmm()


@pytest.fixture(scope="session")
def gmm_reward():
    """Target-class-3 logit of the 8x8 conv classifier (the guidance reward)."""
    from ntrk_lightning.training.classifier_loop import cached_classifier
    from rewards.digits import ClassLogitReward

    clf, _ = cached_classifier("conv", 8, 0)
    return ClassLogitReward(clf, 3)


@pytest.fixture(scope="session")
def gmm_judge():
    from ntrk_lightning.training.classifier_loop import cached_classifier

    judge, info = cached_classifier("mlp", 8, 1)
    return judge
