"""Worker queues (worker groups): the names workflows and workers give them, and the broker queue of each.

A workflow names the queue its runs go to (``QUEUE = "heavy"`` in its
script, or the ``queue`` upload field; ``default`` when it names none), and a
worker consumes the queues it is started with (``flowpool worker --queues
heavy,default``, or ``FLOWPOOL_WORKER_QUEUES``). The ``default`` queue is the
broker queue ``flowpool``, the one every earlier release used, so runs queued
by an older API still reach a newer worker; any other queue ``q`` is
``flowpool.q``.
"""
from __future__ import annotations

import re

__all__ = ["BROKER_QUEUE", "DEFAULT_QUEUE", "QUEUE_NAME", "broker_queue", "check_queue_name", "is_queue_name",
           "queue_of_broker"]

DEFAULT_QUEUE = "default"
BROKER_QUEUE = "flowpool"  # the broker queue of the default queue; others are "flowpool.<name>"

# 1-32 lower-case letters, digits, '_' or '-', starting with a letter: safe in a Redis key, a broker queue
# name, a Prometheus label and a Kubernetes object name (KEDA's ScaledObject per queue).
QUEUE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def is_queue_name(value: object) -> bool:
    """Whether ``value`` is a valid queue name."""
    return isinstance(value, str) and QUEUE_NAME.fullmatch(value) is not None


def check_queue_name(value: object) -> str:
    """``value`` if it is a valid queue name; ValueError saying what one looks like otherwise."""
    if not is_queue_name(value):
        raise ValueError(f"a queue name is 1 to 32 lower-case letters, digits, '_' or '-', starting with a letter; "
                         f"got {value!r}")
    return str(value)


def broker_queue(name: str) -> str:
    """The broker (Celery) queue that runs of the flowpool queue ``name`` travel on."""
    return BROKER_QUEUE if name == DEFAULT_QUEUE else f"{BROKER_QUEUE}.{name}"


def queue_of_broker(name: str) -> str | None:
    """The flowpool queue whose runs travel on the broker queue ``name`` (None: not one of flowpool's)."""
    if name == BROKER_QUEUE:
        return DEFAULT_QUEUE
    prefix = BROKER_QUEUE + "."
    if name.startswith(prefix) and is_queue_name(name[len(prefix):]):
        return name[len(prefix):]
    return None
