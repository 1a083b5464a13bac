"""Exact cross-rank gathering of ``cat`` list states, including ranks that saw no data.

torchmetrics gathers list states with padding, so uneven shards are fine, but a rank whose list
is still empty substitutes ``torch.tensor([])`` in the metric's default dtype (float32): its
dtype (and for 2-D states its rank) then disagrees with the other ranks' tensors. Metrics here
keep every list state 1-D and declare its dtype, and this mixin fills an empty list with a typed
empty tensor before the gather.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors


class TypedCatStates:
    """Mixin for :class:`torchmetrics.Metric` subclasses; set ``_cat_dtypes = {state: dtype}``."""

    _cat_dtypes: dict[str, torch.dtype] = {}

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Optional[Any] = None) -> None:
        for name, dtype in self._cat_dtypes.items():
            value = getattr(self, name)
            if isinstance(value, list) and len(value) == 0:
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])  # type: ignore[attr-defined]
        super()._sync_dist(dist_sync_fn, process_group)  # type: ignore[misc]


def cat_state(value: Any, dtype: torch.dtype) -> Tensor:
    """A list state (local: list of tensors; after a sync: one tensor) as one 1-D tensor."""
    if isinstance(value, Tensor):
        return value.reshape(-1).to(dtype)
    if not value:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([v.reshape(-1).to(dtype) for v in value])
