"""What taskiq's own state tests check, on taskiq's class and on pool's, local and shared.

taskiq's suite (tests/test_state.py) sets, reads and deletes values as items and as
attributes, and reads a deleted value back with ``get``. The same behaviours, and the rest of
the ``UserDict`` surface a taskiq user relies on, are asserted here for each kind of state.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import taskiq

from shared_state import TaskiqState
from tests.test_state_shared import serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["taskiq", "pool-local", "pool-shared"])
def state(request: pytest.FixtureRequest) -> Iterator[taskiq.TaskiqState]:
    if request.param == "taskiq":
        yield taskiq.TaskiqState()
    elif request.param == "pool-local":
        yield TaskiqState()
    else:
        with serving() as server:
            yield server.connect()


def test_every_kind_is_a_taskiq_state(state: taskiq.TaskiqState) -> None:
    assert isinstance(state, taskiq.TaskiqState)


# ------------------------------------------------------------------- item style
def test_an_item_written_reads_back(state: taskiq.TaskiqState) -> None:
    state["answer"] = 42
    assert state["answer"] == 42


def test_an_item_overwritten_reads_the_new_value(state: taskiq.TaskiqState) -> None:
    state["mode"] = "fast"
    state["mode"] = "safe"
    assert state["mode"] == "safe"


def test_a_deleted_item_is_none_through_get(state: taskiq.TaskiqState) -> None:
    state["answer"] = 42
    del state["answer"]
    assert state.get("answer") is None
    assert state.get("answer", "fallback") == "fallback"


def test_a_missing_item_is_a_key_error(state: taskiq.TaskiqState) -> None:
    with pytest.raises(KeyError):
        _ = state["nothing"]
    with pytest.raises(KeyError):
        del state["nothing"]


# ------------------------------------------------------------------- attribute style
def test_an_attribute_written_is_an_item(state: taskiq.TaskiqState) -> None:
    state.answer = 42
    assert state["answer"] == 42


def test_an_item_written_is_an_attribute(state: taskiq.TaskiqState) -> None:
    state["answer"] = 42
    assert state.answer == 42


def test_a_deleted_attribute_is_none_through_get(state: taskiq.TaskiqState) -> None:
    state["answer"] = 42
    del state.answer
    assert state.get("answer") is None
    assert "answer" not in state


def test_a_missing_attribute_is_an_attribute_error(state: taskiq.TaskiqState) -> None:
    with pytest.raises(AttributeError, match="object has no attribute 'nothing'"):
        _ = state.nothing
    with pytest.raises(AttributeError, match="'nothing'"):
        del state.nothing
    assert getattr(state, "nothing", "fallback") == "fallback"
    assert not hasattr(state, "nothing")


# ------------------------------------------------------------------- the mapping
def test_membership_length_and_iteration(state: taskiq.TaskiqState) -> None:
    assert len(state) == 0 and not state
    state["a"] = 1
    state.b = 2
    assert "a" in state and "b" in state and "c" not in state
    assert len(state) == 2 and state
    assert sorted(state) == ["a", "b"]
    assert dict(state) == {"a": 1, "b": 2}


def test_keys_values_items(state: taskiq.TaskiqState) -> None:
    state["a"] = 1
    state["b"] = [2]
    assert sorted(state.keys()) == ["a", "b"]
    assert sorted(map(repr, state.values())) == ["1", "[2]"]
    assert sorted(state.items()) == [("a", 1), ("b", [2])]


def test_equality_with_a_dict(state: taskiq.TaskiqState) -> None:
    state["a"] = 1
    assert state == {"a": 1}
    assert state != {"a": 2}


def test_setdefault_pop_and_popitem(state: taskiq.TaskiqState) -> None:
    assert state.setdefault("a", 1) == 1
    assert state.setdefault("a", 2) == 1
    assert state.pop("a") == 1
    assert state.pop("a", "gone") == "gone"
    with pytest.raises(KeyError):
        state.pop("a")
    state["only"] = "one"
    assert state.popitem() == ("only", "one")
    assert len(state) == 0


def test_update_with_a_mapping_pairs_and_keywords(state: taskiq.TaskiqState) -> None:
    state.update({"a": 1})
    state.update([("b", 2)])
    state.update(c=3)
    state.update({"d": 4}, e=5)
    assert dict(state) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}


def test_clear_empties_it(state: taskiq.TaskiqState) -> None:
    state["a"] = 1
    state.b = 2
    state.clear()
    assert len(state) == 0 and "a" not in state and state.get("b") is None


def test_a_stored_none_is_present(state: taskiq.TaskiqState) -> None:
    state["nothing"] = None
    assert "nothing" in state and state["nothing"] is None and state.nothing is None


def test_str_and_repr_show_the_values(state: taskiq.TaskiqState) -> None:
    state["a"] = 1
    assert str(state) == "TaskiqState({'a': 1})"
    assert repr(state) == "{'a': 1}"


def test_a_copy_has_the_same_values(state: taskiq.TaskiqState) -> None:
    state["a"] = [1]
    twin = copy.copy(state)
    assert type(twin) is type(state)
    assert twin["a"] == [1] and twin == state
