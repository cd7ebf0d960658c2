"""The task bodies both frameworks run in the benchmarks, so they do the same work."""

from __future__ import annotations


def spin(n: int) -> int:
    """CPU-bound work: a sum of squares."""
    total = 0
    for i in range(n):
        total += i * i
    return total
