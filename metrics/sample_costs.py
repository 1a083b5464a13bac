"""What the finished samples of an arm cost: their count and the sums of their per-sample NFE,
reward gradients, seconds and NaN fallbacks, as a torchmetrics state.

Being a state (sums, reduced with ``sum`` under DDP, saved and merged like the other metric
states of a run), it gives a resumed run its per-arm means without going through the records of
the samples earlier runs finished.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor
from torchmetrics import Metric

#: the per-sample quantities summed (the record fields of the same names)
COST_FIELDS = ("nfe", "grad_evals", "seconds", "nan_fallbacks")


class SampleCosts(Metric):
    """``update({field: (B,) values})`` for every field of :data:`COST_FIELDS`; ``compute()`` returns
    ``{"count": int, "sum": {field: float}, "mean": {field: float or None}}`` (means ``None``
    before any sample)."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for name in COST_FIELDS:
            self.add_state(f"sum_{name}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, costs: Mapping[str, Union[Tensor, list, float]]) -> None:  # type: ignore[override]
        sizes = set()
        for name in COST_FIELDS:
            if name not in costs:
                raise ValueError(f"SampleCosts.update: missing {name!r} (needs {', '.join(COST_FIELDS)})")
            v = torch.as_tensor(costs[name], dtype=torch.float64).reshape(-1)
            sizes.add(v.numel())
            setattr(self, f"sum_{name}", getattr(self, f"sum_{name}") + v.sum().to(self.device))
        if len(sizes) != 1:
            raise ValueError(f"SampleCosts.update: the fields have different lengths {sorted(sizes)}")
        self.count += sizes.pop()

    def compute(self) -> dict[str, Any]:
        n = int(self.count)
        sums = {name: float(getattr(self, f"sum_{name}")) for name in COST_FIELDS}
        means: dict[str, Optional[float]] = {name: (v / n if n else None) for name, v in sums.items()}
        return {"count": n, "sum": sums, "mean": means}
