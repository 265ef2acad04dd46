"""A run sent through the held Redis client reaches the broker as the very message kombu's producer would push.

Both go to a real Redis, and the two queue entries are compared field by field
(less what differs per message by design: the delivery tag, and the
``expires`` instant). That a Celery worker consumes it is what every
integration test of an invocation shows.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from kombu.transport.redis import Channel as RedisChannel

from flowpool.publish import RunSender, lane_list
from flowpool.redis_server import RedisServer
from flowpool.settings import Settings
from flowpool.tasks.app import RUN_TASK, create_celery

_SEND = dict(kwargs={"job": {"secret": "s3cr3t", "n": [1, 2.5, None]}}, task_id="req_1", expires=30,
             argsrepr="()", kwargsrepr="{'job': <run req_1 of w@1.0.0>}", queue="flowpool.heavy")


def _entry(raw: bytes) -> dict[str, Any]:
    entry = json.loads(raw)
    entry["body"] = json.loads(base64.b64decode(entry["body"]))
    assert entry["properties"].pop("delivery_tag")
    assert entry["headers"].pop("expires")
    return entry


def test_the_held_client_pushes_what_kombu_pushes(redis_server: RedisServer, redis_db: redis.Redis) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15")
    celery = create_celery(settings)
    sender = RunSender(celery, settings)
    assert sender.held  # a plain Redis broker without task events: the held client sends
    celery.send_task(RUN_TASK, **_SEND)  # through kombu's producer
    sender.send(RUN_TASK, **_SEND)
    ours, kombus = (_entry(raw) for raw in redis_db.lrange("flowpool.heavy", 0, -1))
    assert ours == kombus
    assert ours["headers"]["kwargsrepr"] == _SEND["kwargsrepr"] and ours["headers"]["id"] == "req_1"
    assert ours["properties"]["expiration"] == "30000"


@pytest.mark.parametrize("priority, lane", [(3, "\x06\x163"), (7, "\x06\x166"), (9, "\x06\x169")])
def test_a_prioritised_run_goes_to_kombus_lane(redis_server: RedisServer, redis_db: redis.Redis, priority: int,
                                               lane: str) -> None:
    """Fair share's lanes: the same list and the same message as kombu's producer, for a priority above 0."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15")
    celery = create_celery(settings)
    sender = RunSender(celery, settings)
    assert sender.held and sender.lanes
    celery.send_task(RUN_TASK, priority=priority, **_SEND)  # through kombu's producer
    sender.send(RUN_TASK, priority=priority, **_SEND)
    assert redis_db.llen("flowpool.heavy") == 0  # nothing in lane 0
    assert lane_list("flowpool.heavy", priority) == "flowpool.heavy" + lane
    ours, kombus = (_entry(raw) for raw in redis_db.lrange("flowpool.heavy" + lane, 0, -1))
    assert ours == kombus
    assert ours["properties"]["priority"] == priority


def test_lane_lists_are_kombus() -> None:
    """Every priority maps to the list kombu's Redis channel keeps it in."""
    channel = object.__new__(RedisChannel)  # _q_for_pri reads only the class's priority steps and separator
    for priority in (None, "x", -1, 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, "6"):
        assert lane_list("flowpool", priority) == channel._q_for_pri("flowpool", _kombu_priority(priority))


def _kombu_priority(priority: object) -> int:
    """The priority kombu's virtual channel reads back from a message's properties."""
    channel = object.__new__(RedisChannel)
    return channel._get_message_priority({"properties": {"priority": priority or 0}})


def test_task_events_go_through_kombus_producers(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", worker_events=True)
    sender = RunSender(create_celery(settings), settings)
    assert not sender.held and sender.lanes  # kombu's own Redis producer keeps the lanes


def test_an_amqp_broker_has_no_lanes(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
                        broker_url="amqp://guest:guest@127.0.0.1:1//")  # never connected to
    assert not RunSender(create_celery(settings), settings).lanes


def test_other_redis_urls_go_through_kombus_producers(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
                        broker_url=f"sentinel://127.0.0.1:{redis_server.port}/15")
    assert not RunSender(create_celery(settings), settings).held
