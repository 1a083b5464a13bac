"""Summary statistics of a reward over a generated set, exact under DDP.

The values themselves are the state (a ``cat`` list, gathered with padding, so uneven shards and
empty ranks are fine) because quantiles cannot be merged from per-rank summaries. Every statistic
is computed from the *sorted* values, so the result does not depend on how the samples were split
across processes or batches: 1 rank and 8 ranks give the same numbers bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics._sync import TypedCatStates, cat_state

QUANTILES: dict[str, float] = {"q05": 0.05, "q25": 0.25, "q50": 0.50, "q75": 0.75, "q95": 0.95}
KEYS = ("mean", "std", "min", "max", *QUANTILES, "count")


class RewardStatistics(TypedCatStates, Metric):
    """Mean, std, min, max, quantiles and count of a per-sample reward.

    ``update(values)`` takes a (B,) tensor (any float dtype; stored as float64). ``compute()``
    returns ``{"mean", "std", "min", "max", "q05", "q25", "q50", "q75", "q95", "count",
    "nonfinite"}``:

    * ``std`` is the *population* standard deviation (divide by n, numpy's default), defined for
      any n >= 1; a standard error is ``std / sqrt(count - 1)``.
    * quantiles interpolate linearly between order statistics (numpy's default method).
    * NaN and infinite values are left out of every statistic and counted in ``nonfinite``;
      ``count`` is the number of finite values.
    * with no finite value: ``count == 0`` and NaN for the other statistics (no exception).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False
    _cat_dtypes = {"values": torch.float64}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Union[Tensor, float, list]) -> None:  # type: ignore[override]
        v = torch.as_tensor(values).detach()
        if v.ndim > 1:
            raise ValueError(f"RewardStatistics.update expects a (B,) tensor, got shape {tuple(v.shape)}")
        self.values.append(v.reshape(-1).to(device=self.device, dtype=torch.float64))

    def compute(self) -> dict[str, Union[float, int]]:
        v = cat_state(self.values, torch.float64)
        finite = v[torch.isfinite(v)]
        out: dict[str, Union[float, int]] = {k: math.nan for k in KEYS}
        out["count"] = int(finite.numel())
        out["nonfinite"] = int(v.numel() - finite.numel())
        if finite.numel() == 0:
            return out
        s = torch.sort(finite).values.cpu()
        n = s.numel()
        mean = s.sum() / n
        out["mean"] = float(mean)
        out["std"] = float(((s - mean) ** 2).sum().div(n).sqrt())
        out["min"], out["max"] = float(s[0]), float(s[-1])
        qs = torch.quantile(s, torch.tensor(list(QUANTILES.values()), dtype=torch.float64), interpolation="linear")
        for k, q in zip(QUANTILES, qs.tolist()):
            out[k] = float(q)
        return out

    def all_values(self) -> Tensor:
        """Every value of every rank (finite or not), in no particular order, on the CPU
        (collective under DDP: every rank calls it), e.g. for a histogram."""
        with self.sync_context():
            return cat_state(self.values, torch.float64).detach().cpu().clone()
