"""pool's fast paths for taskiq's models and task ids read back as taskiq's own would."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import os
import uuid
from typing import Any

import pytest
from pydantic import BaseModel
from taskiq import TaskiqMessage, TaskiqResult
from taskiq.serializers import JSONSerializer

from pool import PoolBroker
from pool.extensions import model_json


class Order(BaseModel):
    id: int
    note: str


@dataclasses.dataclass
class Point:
    x: int


class Colour(enum.Enum):
    RED = "red"


VALUES = [
    float("inf"), float("nan"), -0.0, 2**70, "ünï\u2028code", "a\"b\\c\n",
    datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.timezone.utc), datetime.date(2026, 1, 1),
    uuid.UUID(int=7), decimal.Decimal("1.10"), {1, 2}, (1, "a"), Order(id=1, note="x"),
    Point(3), Colour.RED, {"k": [1, {"n": None}]}, {1: "an int key"},
]  # fmt: skip


def _models(value: Any) -> list[Any]:
    return [
        TaskiqMessage(task_id="t", task_name="app:f", labels={"l": value}, args=[value],
                      kwargs={"k": value}),
        TaskiqResult(is_err=False, return_value=value, execution_time=0.5, log=None),
    ]  # fmt: skip


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ for v in VALUES])
def test_a_model_written_either_way_reads_back_the_same(value: Any) -> None:
    serializer = JSONSerializer()
    for model in _models(value):
        taskiqs = serializer.dumpb(model.model_dump(mode="json"))
        ours = model_json.dump(model, serializer)
        assert json.loads(ours) == json.loads(taskiqs)
        for data in (taskiqs, ours):  # each side reads what either wrote
            theirs = type(model).model_validate(serializer.loadb(data))
            assert model_json.load(type(model), data, serializer) == theirs


def test_a_value_neither_can_write_fails_and_other_serializers_are_used_as_taskiq_does() -> None:
    serializer = JSONSerializer()
    for model in _models(object()):
        with pytest.raises(Exception, match="serializ"):
            model_json.dump(model, serializer)

    class Upper(JSONSerializer):  # a subclass: its own dumpb is used
        def dumpb(self, value: Any) -> bytes:
            return super().dumpb(value).upper()

    message = _models(1)[0]
    assert (
        model_json.dump(message, Upper())
        == JSONSerializer().dumpb(message.model_dump(mode="json")).upper()
    )


def test_the_pool_broker_formats_messages_so_taskiq_reads_them() -> None:
    broker = PoolBroker()
    message = _models(Order(id=2, note="é"))[0]
    sent = broker.formatter.dumps(message)
    assert TaskiqMessage.model_validate(json.loads(sent.message)) == broker.formatter.loads(
        sent.message
    )
    assert broker.formatter.loads(sent.message).args == [{"id": 2, "note": "é"}]


def test_the_pool_broker_s_task_ids_are_uuid4_as_taskiq_s_are() -> None:
    broker = PoolBroker()
    ids = {broker.id_generator() for _ in range(2000)}
    assert len(ids) == 2000
    for task_id in ids:
        parsed = uuid.UUID(task_id)
        assert parsed.hex == task_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert broker.with_id_generator(lambda: "mine").id_generator() == "mine"


@pytest.mark.timeout(30)
def test_a_forked_producer_does_not_hand_out_its_parent_s_task_ids() -> None:
    from pool.extensions.task_ids import uuid4_hex

    uuid4_hex()  # the parent holds ids read ahead
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, "".join(uuid4_hex() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        theirs = pipe.read().decode()
    os.waitpid(child, 0)
    ours = "".join(uuid4_hex() for _ in range(10))
    assert len(theirs) == 320 and theirs != ours


@pytest.mark.timeout(30)
def test_task_ids_stay_unique_when_threads_take_them_at_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pool.extensions.task_ids import uuid4_hex

    def take(_: int) -> list[str]:
        return [uuid4_hex() for _ in range(5000)]

    with ThreadPoolExecutor(4) as threads:
        ids = [task_id for batch in threads.map(take, range(4)) for task_id in batch]
    assert len(set(ids)) == len(ids) == 20_000
