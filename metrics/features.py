"""Feature extractors for FID and diversity, resolved from a short spec.

Specs:

* ``"inception"`` — the standard FID network: torch-fidelity's InceptionV3 (2048-d pool
  features) through torchmetrics' wrapper. Weights come ONLY from a local file (an explicit
  ``weights_path``, else ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``);
  nothing is downloaded. A missing file raises ``FileNotFoundError`` saying where to get it.
* ``"digits"`` — :class:`rewards.digits.DigitFeatures` (64-d, shipped
  weights), the FID space of the digits testbed.
* ``"package.module:ClassName"`` (or ``package.module.ClassName``) — any importable
  ``nn.Module`` built without arguments, returning (N, D) features.
* an ``nn.Module`` instance, used as is.

Every extractor built here receives float images in [0, 1] (B, C, H, W); see
:func:`metrics.images.as_float01`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ntrk_lightning.importing import import_object

from metrics.images import as_float01, to_uint8

PathLike = Union[str, "os.PathLike[str]"]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)

#: attribute set on modules built by :func:`build_feature`: the spec they came from
FEATURE_NAME_ATTR = "ntrk_feature_name"


def default_inception_weights() -> Path:
    """``$TORCH_HOME/hub/checkpoints/<file>`` (torch's hub folder, which honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_weights_path(weights_path: Optional[PathLike] = None) -> Path:
    """The local InceptionV3 weights file, or ``FileNotFoundError`` naming it and how to get it."""
    path = Path(weights_path) if weights_path is not None else default_inception_weights()
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights for FID not found: {path}. Nothing is downloaded at run time: on a "
            f"machine with internet download {INCEPTION_WEIGHTS_URL} and copy it to "
            f"{default_inception_weights()} (or pass its path as the feature weights, e.g. "
            "`ntrk evaluate --feature_weights FILE`), or use another feature (e.g. --feature digits).")
    return path


class InceptionFeatures(nn.Module):
    """InceptionV3 pool features (2048-d) of float images in [0, 1] or ``uint8`` images.

    The network wants ``uint8`` RGB at any size (it resizes to 299 itself): float input is
    quantised to the nearest 8-bit level (exact for images that were saved as 8-bit files) and grey
    images are repeated to three channels. ``net`` may be given directly (tests use a tiny stand-in);
    otherwise the torch-fidelity network is loaded from the local weights file, which is first
    checked to load with ``torch.load(weights_only=True)`` (no pickled code is ever executed).
    """

    num_features = 2048

    def __init__(self, weights_path: Optional[PathLike] = None, net: Optional[nn.Module] = None) -> None:
        super().__init__()
        if net is None:
            path = inception_weights_path(weights_path)
            try:
                torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path} is not a plain InceptionV3 state dict ({type(e).__name__}: {e}); "
                                 f"expected the file from {INCEPTION_WEIGHTS_URL}") from None
            from torchmetrics.image.fid import NoTrainInceptionV3

            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                     feature_extractor_weights_path=str(path))
            self.weights_path = str(path)
        self.net = net
        self.net.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "InceptionFeatures":  # a fixed feature space
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x = to_uint8(images)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"InceptionV3 needs 1 or 3 channels, got shape {tuple(x.shape)}")
        return self.net(x.contiguous()).reshape(x.shape[0], -1)


class _FloatInput(nn.Module):
    """Wraps a user extractor so that it always receives float images in [0, 1]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        if hasattr(net, "num_features"):
            self.num_features = net.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.net(as_float01(images))


def _import_class(spec: str) -> type:
    if ":" not in spec and "." not in spec:
        raise ValueError(f"feature {spec!r}: expected 'inception', 'digits' or an import path 'package.module:Class'")
    return import_object(spec, "feature")


def build_feature(spec: Union[str, nn.Module] = "inception", weights_path: Optional[PathLike] = None) -> nn.Module:
    """Resolve a feature spec (see the module docstring) to an ``nn.Module`` in eval mode with
    frozen parameters, tagged with its spec for cache keys and error messages."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"feature must be a non-empty string or an nn.Module, got {spec!r}")
    name = spec.strip()
    if name.lower() in ("inception", "inception-v3", "inceptionv3"):
        module: nn.Module = InceptionFeatures(weights_path)
        name = "inception"
    elif name.lower() == "digits":
        from rewards.digits import DigitFeatures

        module = DigitFeatures()
        name = "digits"
    else:
        cls = _import_class(name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"feature {spec!r} is not an nn.Module class")
        try:
            module = _FloatInput(cls())
        except TypeError as e:
            raise ValueError(f"feature {spec!r} must be constructible without arguments ({e})") from None
    module.requires_grad_(False)
    module.eval()
    setattr(module, FEATURE_NAME_ATTR, name)
    return module


def feature_name(module: nn.Module) -> str:
    """Human-readable name: the spec the module was built from, else its class path."""
    return getattr(module, FEATURE_NAME_ATTR, None) or f"{type(module).__module__}:{type(module).__qualname__}"


def feature_identity(module: nn.Module) -> str:
    """``name@hash`` where hash digests the module's state dict (names, shapes, dtypes, values):
    two extractors with the same identity compute the same features, so reference statistics
    cached under one are valid for the other."""
    h = hashlib.sha1()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{feature_name(module)}@{h.hexdigest()[:12]}"


def num_features(module: nn.Module) -> Optional[int]:
    """The feature dimension a module declares (``num_features``), if any."""
    n = getattr(module, "num_features", None)
    if isinstance(n, Tensor):
        n = int(n.item())
    return int(n) if n is not None else None


def extract(module: nn.Module, images: Tensor) -> Tensor:
    """(N, D) float64 features of a batch, on the module's device, without gradients."""
    p = next(module.parameters(), None)
    if p is not None:
        images = images.to(p.device)
    with torch.no_grad():
        f = module(as_float01(images))
    if f.ndim == 1:
        f = f.unsqueeze(0)
    if f.ndim != 2:
        f = f.reshape(f.shape[0], -1)
    return f.to(torch.float64)
