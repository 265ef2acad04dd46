"""The sandbox's sockets stay blocking whatever default timeout the worker process has set.

Celery's shutdown calls ``socket.setdefaulttimeout(5)`` for the whole worker
while runs may still start. A socket made meanwhile is in timeout mode, that
is O_NONBLOCK on its file description, which the process it is handed to
shares: a run process's blocking ``recv`` then raised BlockingIOError and the
run failed with sandbox_error.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Iterator

import pytest

from flowpool.sandbox import Sandbox, SandboxLimits
from flowpool.sandbox.channel import blocking_pair, blocking_socket
from tests.helpers import compiled

LIMITS = SandboxLimits(memory_bytes=256 << 20, processes=16, open_files=64, file_bytes=1 << 20, tmp_bytes=8 << 20,
                       max_result_bytes=64 << 10, max_log_bytes=64 << 10, max_chunks=20, max_chunk_bytes=4 << 10)

# The run waits on its channel for the answer to a ctx call.
WAITS_FOR_AN_ANSWER = """
    def execute(ctx):
        return ctx.chat.completions.create(messages=[])
"""


def _answer_late(method: str, params: dict, deadline: float) -> Any:
    time.sleep(0.3)
    return {"answered": method}


@pytest.fixture
def default_timeout() -> Iterator[None]:
    """What Celery's shutdown does to the worker process: a default timeout for every socket made from now on."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


@pytest.fixture
def sandbox(default_timeout: None) -> Iterator[Sandbox]:
    """A sandbox started, and running, under the default timeout, with a process started ahead of need."""
    box = Sandbox(LIMITS, slots=2, hard_grace_seconds=1.0, prestart=1, backend="process")
    box.start()
    try:
        yield box
    finally:
        box.stop()


def test_sockets_handed_to_other_processes_are_blocking_under_a_default_timeout(default_timeout: None) -> None:
    ours, theirs = blocking_pair()
    adopted = blocking_socket(os.dup(theirs.fileno()))
    try:
        for sock in (ours, theirs, adopted):
            assert sock.gettimeout() is None
            assert os.get_blocking(sock.fileno())
    finally:
        for sock in (ours, theirs, adopted):
            sock.close()


def test_runs_started_under_a_default_timeout_wait_on_their_channel(sandbox: Sandbox) -> None:
    # The first run takes the process started ahead of need, the second one started for it.
    for _ in range(2):
        outcome = sandbox.run(compiled(WAITS_FOR_AN_ANSWER), {}, 10, on_call=_answer_late)
        assert outcome.ok, outcome.error
        assert outcome.result == {"answered": "chat"}


def test_the_zygote_started_under_a_default_timeout_outlives_that_timeout_of_silence(sandbox: Sandbox) -> None:
    zygote = sandbox.isolation["pid"]
    time.sleep(5.5)  # the worker's read of the zygote's control socket stayed silent past the timeout
    outcome = sandbox.run(compiled(WAITS_FOR_AN_ANSWER), {}, 10, on_call=_answer_late)
    assert outcome.ok, outcome.error
    assert sandbox.isolation["pid"] == zygote, "the zygote was taken for dead and started again"
