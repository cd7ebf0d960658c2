"""The autoscale policy, on its own: when it grows and shrinks the pool, and why."""

from __future__ import annotations

from pool.runtime.autoscale import Autoscaler, Observation


def seen(**fields: object) -> Observation:
    base: dict[str, object] = dict(
        now=100.0, target=2, queued=0, busy_workers=0, ready_workers=2, longest_idle_s=0.0
    )
    base.update(fields)
    return Observation(**base)  # type: ignore[arg-type]


def test_grows_while_tasks_wait_and_every_worker_is_busy() -> None:
    policy = Autoscaler(1, 4, idle_s=10, cooldown_s=2)
    assert policy.decide(seen(queued=5, busy_workers=2)) == (
        3,
        "5 task(s) waiting, every worker busy",
    )
    assert (
        policy.decide(seen(now=101.0, target=3, queued=5, busy_workers=3, ready_workers=3)) is None
    )


def test_an_unknown_queue_grows_only_when_every_worker_is_full() -> None:
    policy = Autoscaler(1, 4, idle_s=10, cooldown_s=2)
    assert policy.decide(seen(queued=None, busy_workers=2, full_workers=1)) is None
    decision = policy.decide(seen(queued=None, busy_workers=2, full_workers=2))
    assert decision is not None and decision[0] == 3


def test_an_unknown_queue_still_shrinks_after_a_worker_stayed_idle() -> None:
    policy = Autoscaler(1, 4, idle_s=10, cooldown_s=2)
    decision = policy.decide(seen(queued=None, target=3, ready_workers=3, longest_idle_s=12))
    assert decision is not None and decision[0] == 2


def test_never_beyond_its_bounds() -> None:
    policy = Autoscaler(1, 2, idle_s=10, cooldown_s=2)
    assert policy.decide(seen(queued=None, busy_workers=2, full_workers=2)) is None
    assert policy.decide(seen(target=1, ready_workers=1, longest_idle_s=60)) is None
