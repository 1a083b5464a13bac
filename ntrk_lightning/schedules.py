"""Strength schedules over the reverse trajectory (step 0 = the noisiest step)."""

from __future__ import annotations

from typing import Optional, Sequence


def check_window(window: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(w) for w in window)
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"window must satisfy 0 <= start < end <= 1, got {tuple(window)}")
    return lo, hi


def in_window(step: int, num_steps: int, window: Sequence[float]) -> bool:
    """Is ``step`` (0-based) inside the fraction ``window=(start, end)`` of the trajectory?"""
    lo, hi = window
    frac = step / num_steps
    return lo <= frac < hi


def strength(step: int, num_steps: int, start: float, end: Optional[float] = None,
             window: Sequence[float] = (0.0, 1.0)) -> float:
    """Constant ``start`` (``end is None``) or linear from ``start`` at step 0 to ``end`` at the last
    step; 0 outside ``window``."""
    if not in_window(step, num_steps, window):
        return 0.0
    if end is None or num_steps == 1:
        return float(start)
    return float(start) + (float(end) - float(start)) * step / (num_steps - 1)
