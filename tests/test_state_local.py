"""SPEC 2 on a process-local ``TaskiqState()``: both API styles, atomics, locks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from shared_state import TaskiqState
from tests.pool_support import wait_for


@pytest.fixture
def state() -> TaskiqState:
    return TaskiqState()


# --------------------------------------------------------------------- the seed's methods
def test_set_get_delete_values(state: TaskiqState) -> None:
    state.set_value("a", 1)
    state.set_value("b", {"x": [1, 2]})
    assert state.get_value("a") == 1
    assert state.get_value("b") == {"x": [1, 2]}
    assert state.get_value("missing") is None
    assert state.get_value("missing", "dflt") == "dflt"
    state.delete_value("a")
    assert state.get_value("a", "gone") == "gone"


def test_delete_value_of_a_missing_key_is_not_an_error(state: TaskiqState) -> None:
    state.delete_value("never-set")
    state.set_value("k", 1)
    state.delete_value("k")
    state.delete_value("k")
    assert "k" not in state


def test_keys_values_items_are_lists(state: TaskiqState) -> None:
    state.set_value("a", 1)
    state.set_value("b", 2)
    keys, values, items = state.keys(), state.values(), state.items()
    assert type(keys) is list and type(values) is list and type(items) is list
    assert sorted(keys) == ["a", "b"]
    assert sorted(values) == [1, 2]
    assert sorted(items) == [("a", 1), ("b", 2)]
    assert all(type(item) is tuple for item in items)


def test_clear_removes_everything(state: TaskiqState) -> None:
    state.set_value("a", 1)
    state.b = 2
    state.clear()
    assert state.keys() == []
    assert len(state) == 0


# ------------------------------------------------------- taskiq's dict and attribute style
def test_dict_style(state: TaskiqState) -> None:
    state["k"] = "v"
    assert state["k"] == "v"
    assert "k" in state
    assert "other" not in state
    assert len(state) == 1
    del state["k"]
    assert "k" not in state
    assert len(state) == 0


def test_attribute_style(state: TaskiqState) -> None:
    db = object()
    state.db = db
    assert state.db is db
    assert state.get_value("db") is db
    assert "db" in state
    del state.db
    assert "db" not in state


def test_both_styles_see_the_same_values(state: TaskiqState) -> None:
    state.set_value("a", 1)
    state["b"] = 2
    state.c = 3
    assert (state.a, state["a"]) == (1, 1)
    assert (state.get_value("b"), state.b) == (2, 2)
    assert (state.get_value("c"), state["c"]) == (3, 3)


def test_missing_attribute_raises_attribute_error(state: TaskiqState) -> None:
    with pytest.raises(AttributeError):
        _ = state.db
    with pytest.raises(AttributeError):
        del state.db
    assert getattr(state, "db", "fallback") == "fallback"
    assert not hasattr(state, "db")


def test_missing_item_raises_key_error(state: TaskiqState) -> None:
    with pytest.raises(KeyError):
        _ = state["nope"]
    with pytest.raises(KeyError):
        del state["nope"]


def test_stored_none_is_a_value_not_a_missing_key(state: TaskiqState) -> None:
    state.set_value("n", None)
    assert "n" in state
    assert state["n"] is None
    assert state.n is None


_NON_STR_KEY_CALLS: list[tuple[str, Callable[[TaskiqState], Any]]] = [
    ("set_value", lambda s: s.set_value(1, "v")),
    ("get_value", lambda s: s.get_value(1)),
    ("delete_value", lambda s: s.delete_value(1)),
    ("incr", lambda s: s.incr(1)),
    ("update", lambda s: s.update(1, lambda old: old)),
    ("setdefault", lambda s: s.setdefault(1, 0)),
    ("lock", lambda s: s.lock(1)),
    ("is_shared", lambda s: s.is_shared(1)),
    ("__getitem__", lambda s: s[1]),
    ("__setitem__", lambda s: s.__setitem__(1, "v")),
    ("__delitem__", lambda s: s.__delitem__(1)),
    ("__contains__", lambda s: 1 in s),
    ("bytes key", lambda s: s.set_value(b"k", "v")),
    ("tuple key", lambda s: s.get_value(("a", "b"))),
]


@pytest.mark.parametrize(
    "call", [c for _, c in _NON_STR_KEY_CALLS], ids=[n for n, _ in _NON_STR_KEY_CALLS]
)
def test_non_str_key_raises_type_error(
    state: TaskiqState, call: Callable[[TaskiqState], Any]
) -> None:
    with pytest.raises(TypeError):
        call(state)
    assert state.keys() == []


# --------------------------------------------------------------------- atomic operations
def test_incr_counts_a_missing_key_as_zero_and_returns_the_new_value(state: TaskiqState) -> None:
    assert state.incr("n") == 1
    assert state.incr("n") == 2
    assert state.incr("n", 5) == 7
    assert state.incr("n", -10) == -3
    assert state.incr("f", 0.5) == 0.5
    assert state.get_value("n") == -3


def test_incr_of_a_non_number_raises_type_error(state: TaskiqState) -> None:
    state.set_value("s", "text")
    with pytest.raises(TypeError):
        state.incr("s")
    assert state.get_value("s") == "text"


def test_incr_is_exact_with_eight_threads(state: TaskiqState) -> None:
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(1000):
            state.incr("hits")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state.get_value("hits") == 8000


def test_update_applies_fn_once_and_returns_the_new_value(state: TaskiqState) -> None:
    calls: list[Any] = []

    def append(old: list[int]) -> list[int]:
        calls.append(old)
        return [*old, len(old)]

    assert state.update("lst", append, default=[]) == [0]
    assert state.update("lst", append, default=[]) == [0, 1]
    assert calls == [[], [0]]
    assert state.get_value("lst") == [0, 1]


def test_update_of_a_missing_key_without_default_gets_none(state: TaskiqState) -> None:
    seen: list[Any] = []

    def fn(old: Any) -> str:
        seen.append(old)
        return "new"

    assert state.update("k", fn) == "new"
    assert seen == [None]


def test_update_is_exact_with_eight_threads(state: TaskiqState) -> None:
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(500):
            state.update("n", lambda old: old + 1, default=0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state.get_value("n") == 4000


def test_setdefault_stores_only_when_missing(state: TaskiqState) -> None:
    assert state.setdefault("k", [1]) == [1]
    assert state.setdefault("k", [2]) == [1]
    assert state.get_value("k") == [1]
    state.set_value("n", None)
    assert state.setdefault("n", 5) is None


# --------------------------------------------------------------------- locks
def test_lock_as_with_excludes_a_second_holder(state: TaskiqState) -> None:
    order: list[str] = []
    started = threading.Event()

    def contender() -> None:
        started.set()
        with state.lock("job"):
            order.append("second")

    with state.lock("job") as first:
        assert first.locked_by_me()
        assert state.lock("job").acquire(blocking=False) is False
        thread = threading.Thread(target=contender)
        thread.start()
        assert started.wait(10)
        thread.join(0.3)
        assert thread.is_alive(), "the second holder got in while the first held the lock"
        assert order == []
        order.append("first")
    thread.join(10)
    assert not thread.is_alive()
    assert order == ["first", "second"]
    assert not first.locked_by_me()


def test_lock_acquire_with_timeout_gives_up(state: TaskiqState) -> None:
    with state.lock("busy"):
        assert state.lock("busy").acquire(timeout=0.05) is False
    other = state.lock("busy")
    assert other.acquire(timeout=0.05) is True
    other.release()


def test_locks_with_different_names_are_independent(state: TaskiqState) -> None:
    with state.lock("a"), state.lock("b") as b:
        assert b.locked_by_me()


async def test_lock_as_async_with_excludes_a_second_holder(state: TaskiqState) -> None:
    inside = 0
    most_inside = 0
    first_in = asyncio.Event()
    order: list[str] = []

    async def holder(name: str, hold: asyncio.Event | None) -> None:
        nonlocal inside, most_inside
        async with state.lock("shared-resource"):
            inside += 1
            most_inside = max(most_inside, inside)
            order.append(name)
            first_in.set()
            if hold is not None:
                await hold.wait()
            inside -= 1

    release = asyncio.Event()
    first = asyncio.create_task(holder("first", release))
    await first_in.wait()
    second = asyncio.create_task(holder("second", None))
    assert state.lock("shared-resource").acquire(blocking=False) is False
    done, _ = await asyncio.wait({second}, timeout=0.3)
    assert not done, "the second holder got in while the first held the lock"
    assert order == ["first"]
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert order == ["first", "second"]
    assert most_inside == 1


async def test_async_lock_wait_does_not_block_the_event_loop(state: TaskiqState) -> None:
    lock = state.lock("x")
    lock.acquire()
    waiter = asyncio.create_task(_enter_and_leave(state.lock("x")))
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 5 and not waiter.done()
    lock.release()
    await asyncio.wait_for(waiter, 10)


async def _enter_and_leave(lock: Any) -> None:
    async with lock:
        pass


def test_releasing_an_unheld_lock_is_an_error(state: TaskiqState) -> None:
    with pytest.raises(RuntimeError):
        state.lock("free").release()


# --------------------------------------------------------------------- tiers
def test_a_local_state_shares_nothing(state: TaskiqState) -> None:
    state.set_value("plain", 1)
    state.client = threading.Lock()
    assert state.is_shared("plain") is False
    assert state.is_shared("client") is False
    assert state.is_shared("missing") is False
    assert state.shared is False
    assert sorted(state.keys()) == ["client", "plain"]


def test_values_are_kept_by_reference_in_a_local_state(state: TaskiqState) -> None:
    cache: dict[str, int] = {}
    state.set_value("cache", cache)
    state.get_value("cache")["x"] = 1
    assert cache == {"x": 1}


def test_copying_a_state_copies_its_local_tier() -> None:
    import copy

    state = TaskiqState()
    state.set_value("a", [1])
    twin = copy.copy(state)
    twin.set_value("b", 2)
    assert twin.get_value("a") == [1]
    assert "b" not in state


# --------------------------------------------------------------------- taskiq's class
def test_it_is_a_taskiq_state(state: TaskiqState) -> None:
    import taskiq

    assert isinstance(state, taskiq.TaskiqState)
    assert state.data == {}  # taskiq's storage: the local tier


def test_internals_never_become_values(state: TaskiqState) -> None:
    state.set_value("k", 1)
    state.data = "a value named data"  # type: ignore[assignment]  # a value, as in taskiq
    assert state["data"] == "a value named data"
    assert state.data == {"k": 1, "data": "a value named data"}
    assert sorted(state.keys()) == ["data", "k"]


def test_userdict_methods_read_every_value(state: TaskiqState) -> None:
    state.set_value("a", 1)
    state.b = [2]
    assert state.get("a") == 1 and state.get("zz", 0) == 0
    assert list(iter(state)) == ["a", "b"]
    assert state == {"a": 1, "b": [2]} and state != {"a": 1}
    assert state.copy() == state and type(state.copy()) is TaskiqState
    merged = state | {"c": 3}
    assert merged == {"a": 1, "b": [2], "c": 3} and "c" not in state
    assert ({"z": 0} | state) == {"z": 0, "a": 1, "b": [2]}
    state |= {"c": 3}
    assert state["c"] == 3
    assert TaskiqState.fromkeys(["x", "y"], 0) == {"x": 0, "y": 0}


def test_update_forms_are_told_apart_by_their_arguments(state: TaskiqState) -> None:
    assert state.update("n", lambda old: old + 1, 0) == 1
    assert state.update("n", fn=lambda old: old + 1) == 2
    assert state.update(key="n", fn=lambda old: old * 10) == 20
    assert state.update({"key": "stored", "fn": "as values"}) is None
    assert state.get_value("key") == "stored" and state.get_value("fn") == "as values"
    state.update(key="a keyword named key")  # without fn: MutableMapping's form
    assert state.get_value("key") == "a keyword named key"
    with pytest.raises(TypeError):
        state.update("n", "not callable")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        state.update({"x": 1}, {"y": 2})  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        state.update({"ok": 1, 2: "not a str key"})  # type: ignore[dict-item]
    assert "ok" not in state, "a bad key in update(mapping) must stop it before any write"


def test_pickling_keeps_values_local_keys_and_once_records(state: TaskiqState) -> None:
    import pickle

    state.set_value("a", [1])
    state.set_local("mine", 2)
    state.init_once("setup", lambda s: None)
    back = pickle.loads(pickle.dumps(state))
    assert back == {"a": [1], "mine": 2}
    assert back.init_once("setup", lambda s: pytest.fail("ran twice")) is False
    with back.lock("works"):  # a new object gets locks of its own
        pass


def test_deepcopy_copies_the_local_tier(state: TaskiqState) -> None:
    import copy

    state.set_value("a", [1])
    twin = copy.deepcopy(state)
    twin.get_value("a").append(2)
    assert state.get_value("a") == [1] and twin.get_value("a") == [1, 2]


# --------------------------------------------------------------------- set_local
def test_set_local_keeps_a_value_local(state: TaskiqState) -> None:
    state.set_local("cache", {"x": 1})
    assert state.get_value("cache") == {"x": 1} and state.cache == {"x": 1}
    assert state.is_shared("cache") is False
    assert state.incr("hits") == 1
    with pytest.raises(TypeError):
        state.set_local(1, "x")  # type: ignore[arg-type]


# --------------------------------------------------------------------- init_once
def test_init_once_runs_once_per_state_object(state: TaskiqState) -> None:
    calls: list[str] = []
    assert state.init_once("setup", lambda s: calls.append("ran")) is True
    assert state.init_once("setup", lambda s: calls.append("again")) is False
    assert state.init_once("other", lambda s: calls.append("other")) is True
    assert calls == ["ran", "other"]
    assert TaskiqState().init_once("setup", lambda s: calls.append("new state")) is True
    assert state.keys() == [], "a record of init_once is not a value"
    state.clear()
    assert state.init_once("setup", lambda s: calls.append("after clear")) is False


def test_init_once_gives_fn_the_state(state: TaskiqState) -> None:
    state.init_once("counter", lambda s: s.set_value("counter", 0))
    state.incr("counter")
    state.init_once("counter", lambda s: s.set_value("counter", 0))
    assert state.get_value("counter") == 1


def test_init_once_whose_fn_raises_runs_again_next_time(state: TaskiqState) -> None:
    def broken(_: TaskiqState) -> None:
        raise ValueError("no database")

    with pytest.raises(ValueError, match="no database"):
        state.init_once("setup", broken)
    assert state.init_once("setup", lambda s: None) is True


def test_init_once_from_inside_its_own_fn_is_an_error(state: TaskiqState) -> None:
    def nested(s: TaskiqState) -> None:
        s.init_once("setup", lambda _: None)

    with pytest.raises(RuntimeError, match="inside its own fn"):
        state.init_once("setup", nested)
    assert state.init_once("setup", lambda s: None) is True


def test_init_once_refuses_async_functions(state: TaskiqState) -> None:
    async def setup(_: TaskiqState) -> None:
        pytest.fail("must not run")

    with pytest.raises(TypeError, match="ainit_once"):
        state.init_once("setup", setup)
    with pytest.raises(TypeError, match="ainit_once"):
        state.init_once("setup", lambda s: setup(s))
    with pytest.raises(TypeError):
        state.init_once("setup", "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        state.init_once(1, lambda s: None)  # type: ignore[arg-type]


def test_init_once_in_eight_threads_runs_once_and_the_others_wait(state: TaskiqState) -> None:
    start = threading.Barrier(8)
    release = threading.Event()
    ran: list[int] = []
    seen: list[Any] = []

    def setup(s: TaskiqState) -> None:
        ran.append(1)
        assert release.wait(10)
        s.set_value("ready", True)

    def worker() -> None:
        start.wait(10)
        state.init_once("setup", setup)
        seen.append(state.get_value("ready"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: ran == [1], 10, "fn to start")
    threads[0].join(0.2)
    assert seen == [], "a caller returned while fn was still running"
    release.set()
    for thread in threads:
        thread.join(10)
    assert ran == [1] and seen == [True] * 8


async def test_ainit_once_takes_sync_and_async_functions(state: TaskiqState) -> None:
    async def connect(s: TaskiqState) -> None:
        await asyncio.sleep(0)
        s.set_value("connected", True)

    assert await state.ainit_once("connect", connect) is True
    assert await state.ainit_once("connect", connect) is False
    assert await state.ainit_once("plain", lambda s: s.set_value("plain", 1)) is True
    assert state.init_once("connect", lambda s: None) is False
    assert state.get_value("connected") is True and state.get_value("plain") == 1


async def test_ainit_once_waiters_do_not_block_the_loop(state: TaskiqState) -> None:
    release = asyncio.Event()

    async def slow(s: TaskiqState) -> None:
        await release.wait()
        s.set_value("ready", True)

    first = asyncio.create_task(state.ainit_once("setup", slow))
    await asyncio.sleep(0)
    second = asyncio.create_task(state.ainit_once("setup", slow))
    done, _ = await asyncio.wait({second}, timeout=0.2)
    assert not done, "the second caller must wait for the first one's fn"
    release.set()  # only possible because the waiting second caller left the loop free
    assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [True, False]
    assert state.get_value("ready") is True


# --------------------------------------------------------------------- async lock waits
async def test_async_lock_waiting_on_a_thread_keeps_the_loop_ticking(state: TaskiqState) -> None:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with state.lock("resource"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert await asyncio.to_thread(held.wait, 10)
        waiter = asyncio.create_task(_enter_and_leave(state.lock("resource")))
        ticks = 0
        while ticks < 20:
            await asyncio.sleep(0.005)
            ticks += 1
        assert not waiter.done()
    finally:
        release.set()
    await asyncio.wait_for(waiter, 10)
    thread.join(10)


async def test_async_lock_waiters_leave_the_default_executor_free(state: TaskiqState) -> None:
    import concurrent.futures

    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)  # one thread: a single waiter parked there would show
    lock = state.lock("busy")
    lock.acquire()
    waiters = [asyncio.create_task(_enter_and_leave(state.lock("busy"))) for _ in range(16)]
    try:
        await asyncio.sleep(0)  # every waiter tried once and now waits
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: "free"), 5) == "free"
        assert not any(waiter.done() for waiter in waiters)
    finally:
        lock.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 20)
    executor.shutdown(wait=True)


async def test_a_cancelled_async_waiter_leaves_the_lock_free(state: TaskiqState) -> None:
    lock = state.lock("job")
    lock.acquire()
    waiter = asyncio.create_task(_enter_and_leave(state.lock("job")))
    await asyncio.sleep(0)  # the waiter tried once and now waits in its thread
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    lock.release()
    later = state.lock("job")
    assert await asyncio.to_thread(later.acquire, True, 5) is True
    later.release()
