"""Order statistics for the benchmarks' reports (nearest rank, no interpolation)."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (0 to 1) of `values`, by nearest rank: always a sample."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
