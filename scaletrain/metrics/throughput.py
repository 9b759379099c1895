"""Smoothed throughput (tokens/s, samples/s, images/s) over a window of recent steps.

The first steps are skipped: they include torch.compile, cuDNN autotuning and allocator
warm-up, and averaging them in would drag the reported rate down for the whole window.
The rate is the ratio of sums (units in window / seconds in window), not the mean of
per-step rates, so one slow step weighs by the time it really took.
"""

from __future__ import annotations

from collections import deque


class Throughput:
    """Feed `update(units, seconds)` once per step; read `rate` and `seconds_per_step`."""

    def __init__(self, window: int = 20, skip_first: int = 1) -> None:
        if window < 1:
            raise ValueError(f"Throughput window must be >= 1, got {window}")
        if skip_first < 0:
            raise ValueError(f"Throughput skip_first must be >= 0, got {skip_first}")
        self.window = window
        self.skip_first = skip_first
        self.steps_seen = 0
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)

    def update(self, units: float, seconds: float) -> None:
        """Record one step that processed `units` in `seconds` of wall time."""
        if seconds < 0:
            raise ValueError(f"Throughput.update: negative step time {seconds}")
        self.steps_seen += 1
        if self.steps_seen > self.skip_first:
            self._recent.append((float(units), float(seconds)))

    @property
    def rate(self) -> float | None:
        """Units per second over the window; None until a post-warmup step was recorded."""
        seconds = sum(s for _, s in self._recent)
        if not self._recent or seconds <= 0:
            return None
        return sum(u for u, _ in self._recent) / seconds

    @property
    def seconds_per_step(self) -> float | None:
        """Mean wall time of a step over the window (what MFU needs); None during warmup."""
        if not self._recent:
            return None
        return sum(s for _, s in self._recent) / len(self._recent)
