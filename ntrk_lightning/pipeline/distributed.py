"""The one teardown of the process group, shared by ``ntrk predict`` and ``ntrk evaluate``."""

from __future__ import annotations

from typing import Any

import torch


def destroy_process_group(barrier: bool = True) -> None:
    """Barrier + destroy: without it gloo processes intermittently abort at exit ("terminate
    called without an active exception"). After an error or a signal the barrier is skipped:
    another rank may never reach it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            if barrier:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


def all_gather_objects(local: Any) -> list[Any]:
    """Every rank's ``local`` (a picklable object), in rank order; ``[local]`` without a group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        got: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(got, local)
        return got
    return [local]
