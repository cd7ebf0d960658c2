"""When to grow or shrink the pool under ``--autoscale MIN,MAX``.

Kept apart from the supervisor so the policy reads in one place: grow while tasks wait and
every worker is busy, shrink after a worker has been idle for a while, and never change
twice within the cooldown, so the pool does not flap. With a broker that cannot say how
many tasks wait (every broker but the embedded one), the pool grows while every worker is
full: running as many tasks as it may (``--max-async-tasks``) or using a whole CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Observation:
    now: float
    target: int
    queued: int | None  # None: the broker cannot say
    busy_workers: int
    ready_workers: int
    longest_idle_s: float
    full_workers: int = 0  # at their task limit, or using a whole CPU


class Autoscaler:
    def __init__(self, minimum: int, maximum: int, idle_s: float, cooldown_s: float) -> None:
        if not 0 <= minimum <= maximum or maximum < 1:
            raise ValueError(
                f"autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {minimum},{maximum}"
            )
        self.minimum = minimum
        self.maximum = maximum
        self.idle_s = idle_s
        self.cooldown_s = cooldown_s
        self.last_change = float("-inf")

    def decide(self, seen: Observation) -> tuple[int, str] | None:
        """The new target and why, or ``None`` to keep the current one."""
        if seen.target < self.minimum:
            return self._change(seen, self.minimum, "below the autoscale minimum")
        if seen.target > self.maximum:
            return self._change(seen, self.maximum, "above the autoscale maximum")
        if seen.now - self.last_change < self.cooldown_s:
            return None
        growing = seen.target < self.maximum and seen.ready_workers > 0
        if seen.queued is None:
            if growing and seen.full_workers >= seen.ready_workers:
                return self._change(
                    seen, seen.target + 1, "every worker full (its task limit or a whole CPU)"
                )
        elif growing and seen.queued > 0 and seen.busy_workers >= seen.ready_workers:
            return self._change(
                seen, seen.target + 1, f"{seen.queued} task(s) waiting, every worker busy"
            )
        if (
            not seen.queued
            and seen.target > self.minimum
            and seen.longest_idle_s >= self.idle_s
            and seen.now - self.last_change >= self.idle_s
        ):
            return self._change(
                seen, seen.target - 1, f"a worker idle for {seen.longest_idle_s:.0f} s"
            )
        return None

    def _change(self, seen: Observation, target: int, why: str) -> tuple[int, str]:
        self.last_change = seen.now
        return target, why
