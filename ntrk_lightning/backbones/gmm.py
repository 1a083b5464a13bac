"""An analytic diffusion model: a Gaussian mixture fitted to scikit-learn's 8x8 digits.

For a mixture p_0 = sum_k w_k N(mu_k, S_k) and the forward process x_t = a x_0 + s eps
(a = sqrt(abar_t), s = sqrt(1 - abar_t)), the noised marginal is again a mixture,
p_t = sum_k w_k N(a mu_k, a^2 S_k + s^2 I), so its score, the optimal eps prediction
eps*(x_t, t) = -s * grad log p_t(x_t), and the data log-likelihood log p_0 are exact. This makes
the testbed where reward gains can be weighed against exact likelihood, with no training noise.

Each class gets ``components_per_class`` full-covariance components (scikit-learn
GaussianMixture, fixed seed), weighted by class frequency; fits are cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ntrk_lightning.data.digits import NUM_CLASSES, digits
from ntrk_lightning.backbones.base import Backbone
from ntrk_lightning.denoiser import DiffusionModel, identity_decode
from ntrk_lightning.fileio import atomic_write, cache_dir

SIDE = 8
DIM = SIDE * SIDE


@dataclass(frozen=True)
class GMMParams:
    weights: np.ndarray      # (K,)
    means: np.ndarray        # (K, D)
    covariances: np.ndarray  # (K, D, D)
    labels: np.ndarray       # (K,) digit class of each component


def fit_digits_gmm(components_per_class: int = 3, reg_covar: float = 1e-2, seed: int = 0) -> GMMParams:
    """Fit the mixture (deterministic for fixed arguments); cached in memory and on disk."""
    return _fit_cached(int(components_per_class), float(reg_covar), int(seed))


@lru_cache(maxsize=8)
def _fit_cached(per_class: int, reg_covar: float, seed: int) -> GMMParams:
    key = hashlib.sha1(json.dumps([per_class, reg_covar, seed, 1]).encode()).hexdigest()[:12]
    path = cache_dir() / f"digits-gmm-{key}.npz"
    if path.exists():
        z = np.load(path)
        return GMMParams(z["weights"], z["means"], z["covariances"], z["labels"])
    from sklearn.mixture import GaussianMixture

    x, y = digits(SIDE)
    x = x.flatten(1).double().numpy()
    y = y.numpy()
    weights, means, covs, labels = [], [], [], []
    for c in range(NUM_CLASSES):
        xc = x[y == c]
        gm = GaussianMixture(per_class, covariance_type="full", reg_covar=reg_covar,
                             random_state=seed, n_init=1, max_iter=200).fit(xc)
        weights.append(gm.weights_ * len(xc) / len(x))
        means.append(gm.means_)
        covs.append(gm.covariances_)
        labels.append(np.full(per_class, c))
    params = GMMParams(np.concatenate(weights), np.concatenate(means), np.concatenate(covs),
                       np.concatenate(labels))
    def _save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, weights=params.weights, means=params.means, covariances=params.covariances,
                     labels=params.labels)

    atomic_write(path, _save)
    return params


class DigitsGMM(torch.nn.Module):
    """Exact eps-predictor, log-density and sampler of the digits mixture under a DDPM schedule.

    ``alphas_cumprod`` is the schedule's abar_t table (from the diffusers scheduler); all maths is
    in float64 in the eigenbasis of each component covariance, results cast to the input dtype.
    """

    def __init__(self, params: GMMParams, alphas_cumprod: Tensor) -> None:
        super().__init__()
        lam, U = np.linalg.eigh(params.covariances)
        self.register_buffer("log_w", torch.from_numpy(np.log(params.weights)))
        self.register_buffer("means", torch.from_numpy(params.means))
        self.register_buffer("U", torch.from_numpy(U))             # (K, D, D), columns = eigvecs
        self.register_buffer("lam", torch.from_numpy(lam))         # (K, D)
        self.register_buffer("labels", torch.from_numpy(params.labels))
        self.register_buffer("alphas_cumprod", alphas_cumprod.double().clone())

    def _component_terms(self, x: Tensor, a: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log-densities (B, K), whitened residual coordinates (B, K, D) and
        variances (B, K, D) of N(a mu_k, a^2 S_k + s2 I) at x (B, D)."""
        var = a[:, None, None] ** 2 * self.lam[None] + s2[:, None, None]
        resid = x[:, None, :] - a[:, None, None] * self.means[None]
        proj = torch.bmm(resid.transpose(0, 1), self.U).transpose(0, 1)  # (B, K, D): U_k^T resid
        maha = (proj ** 2 / var).sum(-1)
        logdet = var.log().sum(-1)
        logn = -0.5 * (maha + logdet + DIM * math.log(2 * math.pi))
        return logn + self.log_w[None], proj, var

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact optimal eps prediction E[eps | x_t] for state ``x`` ((B, 1, 8, 8) or (B, 64))."""
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], DIM).double()
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(shape[0])
        abar = self.alphas_cumprod[t]
        a, s2 = abar.sqrt(), 1.0 - abar
        logp, proj, var = self._component_terms(xf, a, s2)
        resp = torch.softmax(logp, dim=1)                       # (B, K)
        # -score = sum_k r_k Cov_k^-1 (x - a mu_k) = sum_k r_k U_k (proj / var)
        coef = (resp[:, :, None] * proj / var).transpose(0, 1)         # (K, B, D)
        neg_score = torch.bmm(coef, self.U.transpose(1, 2)).sum(0)       # sum_k U_k coef_k
        return (s2.sqrt()[:, None] * neg_score).to(dtype).reshape(shape)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.eps(x, t)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact rectified-flow velocity E[eps - x0 | x_t] for x_t = (1 - s) x0 + s eps, where
        ``t`` holds flow-scheduler timesteps s * 1000 (diffusers' FlowMatchEulerDiscreteScheduler).

        The noised mixture is again a mixture, N((1 - s) mu_k, (1 - s)^2 S_k + s^2 I); per component
        E[x0 | x_t, k] = mu_k + a S_k (a^2 S_k + s^2 I)^-1 (x_t - a mu_k) (a = 1 - s), which stays
        finite at s = 1 (pure noise), and E[eps | x_t] = -s grad log p_t(x_t)."""
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], DIM).double()
        sigma = (torch.as_tensor(t, device=x.device).double().reshape(-1) / 1000.0).expand(shape[0])
        a, s2 = 1.0 - sigma, sigma * sigma
        logp, proj, var = self._component_terms(xf, a, s2)
        resp = torch.softmax(logp, dim=1)                                   # (B, K)
        whitened = proj / var                                               # Cov_k^-1 resid, eigenbasis
        neg_score = torch.bmm((resp[:, :, None] * whitened).transpose(0, 1), self.U.transpose(1, 2)).sum(0)
        shrink = (resp[:, :, None] * a[:, None, None] * self.lam[None] * whitened).transpose(0, 1)
        x0_mean = (resp @ self.means) + torch.bmm(shrink, self.U.transpose(1, 2)).sum(0)
        eps_mean = sigma[:, None] * neg_score
        return (eps_mean - x0_mean).to(dtype).reshape(shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p_0(x) of the mixture, (B,), for state-space x in [-1, 1] units."""
        xf = x.reshape(x.shape[0], DIM).double()
        one = torch.ones(xf.shape[0], dtype=torch.float64, device=x.device)
        logp, _, _ = self._component_terms(xf, one, torch.zeros_like(one))
        return torch.logsumexp(logp, dim=1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Exact draws from p_0: (samples (n, 1, 8, 8) float32, class of their component (n,))."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, DIM, generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("ndj,nj->nd", self.U[k], self.lam[k].sqrt() * z)
        return x.float().reshape(n, 1, SIDE, SIDE), self.labels[k]


def make_scheduler(num_train_timesteps: int = 1000):
    """The DDIM scheduler over the standard DDPM linear schedule (1e-4 .. 0.02), with no x0
    clipping so the analytic model stays exact; "trailing" spacing starts at t = T - 1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, clip_sample=False,
                         set_alpha_to_one=True, timestep_spacing="trailing",
                         prediction_type="epsilon")


def make_flow_scheduler(shift: float = 1.0):
    """The rectified-flow schedule (diffusers' FlowMatchEulerDiscreteScheduler, static shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))


def load_digits_flow_gmm(components_per_class: int = 3, reg_covar: float = 1e-2, seed: int = 0,
                         shift: float = 1.0) -> tuple[DiffusionModel, "DigitsGMM", object]:
    """The analytic mixture as a rectified-flow model: (DiffusionModel whose denoiser is the exact
    velocity, the DigitsGMM, a FlowMatchEulerDiscreteScheduler)."""
    scheduler = make_flow_scheduler(shift)
    gmm = DigitsGMM(fit_digits_gmm(components_per_class, reg_covar, seed), make_scheduler().alphas_cumprod)
    model = DiffusionModel(denoiser=gmm.velocity, decode=identity_decode, sample_shape=(1, SIDE, SIDE),
                           name="digits-gmm-flow", meta={"components_per_class": components_per_class,
                                                         "reg_covar": reg_covar, "seed": seed, "shift": shift})
    return model, gmm, scheduler


def load_digits_gmm(components_per_class: int = 3, reg_covar: float = 1e-2, seed: int = 0,
                    scheduler=None) -> tuple[DiffusionModel, "DigitsGMM", object]:
    """The analytic backbone: (DiffusionModel for the core, the DigitsGMM itself, its scheduler)."""
    scheduler = scheduler or make_scheduler()
    gmm = DigitsGMM(fit_digits_gmm(components_per_class, reg_covar, seed), scheduler.alphas_cumprod)
    model = DiffusionModel(denoiser=gmm.eps, decode=identity_decode, sample_shape=(1, SIDE, SIDE),
                           name="digits-gmm", meta={"components_per_class": components_per_class,
                                                    "reg_covar": reg_covar, "seed": seed})
    return model, gmm, scheduler


class DigitsGMMBackbone(Backbone):
    """The analytic 8x8 digits mixture as a Lightning-shell backbone (unconditional, exact score).

    Rewards see 8x8 images; the shipped 16x16 classifiers therefore do not apply to it (use
    ``rewards.digits.ClassLogitReward`` with an 8x8 classifier, as the tests and benchmarks do).
    """

    conditional = False

    def __init__(self, components_per_class: int = 3, reg_covar: float = 1e-2, seed: int = 0,
                 flow: bool = False) -> None:
        """``flow=True``: the same mixture as a rectified-flow model (exact velocity, flow schedule)."""
        super().__init__()
        if int(components_per_class) < 1:
            raise ValueError(f"components_per_class must be >= 1, got {components_per_class}")
        self.flow = bool(flow)
        self.name = "digits-gmm-flow" if self.flow else "digits-gmm"
        self.components_per_class, self.reg_covar, self.seed = int(components_per_class), float(reg_covar), int(seed)
        self.gmm: DigitsGMM | None = None

    def _load(self) -> None:
        self.gmm = DigitsGMM(fit_digits_gmm(self.components_per_class, self.reg_covar, self.seed),
                             make_scheduler().alphas_cumprod)

    def model(self) -> DiffusionModel:
        if self.gmm is None:
            raise RuntimeError("call load() first")
        fn = self.gmm.velocity if self.flow else self.gmm.eps
        return DiffusionModel(denoiser=fn, decode=identity_decode, sample_shape=(1, SIDE, SIDE), name=self.name)

    def make_scheduler(self):
        return make_flow_scheduler() if self.flow else make_scheduler()

    def describe(self) -> dict:
        return {"name": self.name, "components_per_class": self.components_per_class,
                "reg_covar": self.reg_covar, "seed": self.seed, "flow": self.flow}
