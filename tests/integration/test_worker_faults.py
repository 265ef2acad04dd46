"""Workers that die or shut down while holding runs: what they had not started moves on, exactly once.

Each test starts its own stack (its own Redis, its own workers and API),
because it kills or stops workers. Every run calls a counting server on
loopback as it starts (``ctx.http``), so a run that started twice, or on the
wrong worker, or late, shows there. The broker is the stack's Redis: its
``unacked`` hash holds each message a worker fetched and has not yet
acknowledged, the request's sealed secrets included.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests

from flowpool.devstack import Stack
from tests.conftest import TEST_ENV
from tests.helpers import Client, error_of, eventually

pytestmark = pytest.mark.slow

WORKER_ENV = {
    **TEST_ENV,
    "FLOWPOOL_WORKER_TTL_SECONDS": "2",
    "FLOWPOOL_WORKER_HEARTBEAT_SECONDS": "0.5",
    # A run no worker starts answers 503 after this: longer than any "within seconds" below.
    "FLOWPOOL_QUEUE_WAIT_SECONDS": "30",
    # These tests read the broker's list of the queue; with fair share one account's later runs go to the lower
    # priority lanes' lists (tests/integration/test_fair_share.py tests those).
    "FLOWPOOL_FAIR_SHARE": "false",
}

# Kombu's Redis transport keeps fetched, unacknowledged messages in this hash (and their fetch times in a sorted set).
UNACKED = "unacked"

# Says it started (the counting server may hold the answer a little, so the run waits on its channel), then works.
STARTS_THEN_WORKS = """
    import time

    def execute(ctx):
        ctx.http.get(ctx.input["started"])
        time.sleep(ctx.input["seconds"])
        return {"tag": ctx.input["tag"]}
"""

# A worker that fetches one run from the broker and dies before starting it: SIGKILL in the middle of a fetch.
FETCH_AND_DIE = """
import os
import signal

from flowpool.settings import Settings
from flowpool.tasks.app import QUEUE, create_celery

app = create_celery(Settings())
with app.connection_for_read() as connection:
    def die(body, message):
        os.kill(os.getpid(), signal.SIGKILL)

    with connection.Consumer(app.amqp.queues[QUEUE], callbacks=[die], accept=["json"]):
        connection.drain_events(timeout=15)
"""


class StartCounter:
    """An HTTP server on loopback that runs call as they start: which run started, when, and how often."""

    def __init__(self) -> None:
        self.starts: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlsplit(self.path)
                with counter._lock:
                    counter.starts[url.path.rsplit("/", 1)[-1]].append(time.monotonic())
                time.sleep(float(parse_qs(url.query).get("hold", ["0"])[0]))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="start-counter", daemon=True)

    def url(self, tag: str, hold: float = 0.0) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/started/{tag}?hold={hold}"

    def started(self) -> dict[str, list[float]]:
        with self._lock:
            return {tag: list(times) for tag, times in self.starts.items()}

    def __enter__(self) -> StartCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Invocation:
    """One call of a workflow made from a thread of its own: its response, or the exception it raised."""

    def __init__(self, client: Client, ref: str, body: dict[str, Any], read_timeout: float) -> None:
        self.response: requests.Response | None = None
        self.exception: Exception | None = None
        self._thread = threading.Thread(target=self._call, args=(client, ref, body, read_timeout), daemon=True)
        self._thread.start()

    def _call(self, client: Client, ref: str, body: dict[str, Any], read_timeout: float) -> None:
        try:
            self.response = requests.post(
                client.base_url + "/workflow/chat/completions", headers={"x-api-key": client.key},
                json={"model": f"workflow:{ref}", "cache": False, **body}, timeout=(5, read_timeout))
        except requests.RequestException as exc:
            self.exception = exc

    def answer(self, timeout: float) -> requests.Response:
        """The response, once it came; fails the test if none did."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "no answer in time"
        assert self.exception is None, self.exception
        assert self.response is not None
        return self.response


@pytest.fixture
def counter() -> Iterator[StartCounter]:
    with StartCounter() as server:
        yield server


@pytest.fixture
def stack() -> Iterator[Stack]:
    """This test's own Redis and API; each test starts its workers itself."""
    stack = Stack(env=WORKER_ENV)
    try:
        yield stack
    finally:
        stack.stop(timeout=20)


@pytest.fixture
def broker(stack: Stack) -> Iterator[redis.Redis]:
    """A client of the stack's Redis, which is also its broker."""
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


def _start(stack: Stack, name: str, concurrency: int, **env: str) -> subprocess.Popen[bytes]:
    return stack.start_worker("--concurrency", str(concurrency), "--name", f"flowpool@{name}", env=env, quiet=True)


def _client(stack: Stack) -> Client:
    assert stack.api_url is not None
    return Client(stack.api_url, stack.create_account("faults"))


def _forget(stack: Stack, process: subprocess.Popen[bytes]) -> None:
    """Drop a process the test ended from the stack, so ``wait_ready`` does not take it for a failed start."""
    stack.processes.remove(process)


def _invoke(client: Client, counter: StartCounter, tag: str, seconds: float, hold: float = 0.0,
            read_timeout: float = 60, ref: str = "works") -> Invocation:
    return Invocation(client, ref, {"input": {"tag": tag, "seconds": seconds, "started": counter.url(tag, hold)}},
                      read_timeout)


def _worker_of(client: Client, response: requests.Response) -> str:
    return client.run(response.json()["request_id"])["worker"]


def test_runs_a_killed_worker_had_not_started_start_on_another_worker_within_seconds_once(
        stack: Stack, counter: StartCounter, broker: redis.Redis) -> None:
    doomed = _start(stack, "doomed", 2)
    stack.start_api(quiet=True)
    stack.wait_ready()
    client = _client(stack)
    client.upload("works", STARTS_THEN_WORKS, timeout_seconds=25)
    calls = {f"run{n}": _invoke(client, counter, f"run{n}", seconds=8) for n in range(6)}
    # Two run on the doomed worker; the four others wait in the broker's queue, or (prefetched) in the worker.
    eventually(lambda: len(counter.started()) == 2 and broker.llen("flowpool") + broker.hlen(UNACKED) == 4, 20,
               "two runs started, four waiting")
    time.sleep(1)  # time enough to fetch more
    running_on_doomed = set(counter.started())

    _start(stack, "survivor", 4)
    stack.wait_ready(workers=2)
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    doomed.wait(10)
    _forget(stack, doomed)

    # No message stays behind with the request's sealed secrets in it.
    eventually(lambda: broker.hlen(UNACKED) == 0, 10, "the broker's unacked hash is empty")
    answers = {tag: call.answer(60) for tag, call in calls.items()}
    starts = counter.started()
    assert {tag: len(times) for tag, times in starts.items()} == {tag: 1 for tag in calls}, "each run started once"
    for tag, response in answers.items():
        if tag in running_on_doomed:
            assert response.status_code == 500, response.text
            assert error_of(response)["type"] == "worker_lost"
        else:
            assert response.status_code == 200, (tag, response.text)
            assert _worker_of(client, response) == "flowpool@survivor"
            assert starts[tag][0] - killed_at < 20, f"{tag} started {starts[tag][0] - killed_at:.1f}s after the kill"


def test_a_run_fetched_by_a_worker_that_died_before_starting_it_runs_elsewhere_within_seconds_once(
        stack: Stack, counter: StartCounter, broker: redis.Redis) -> None:
    busy = _start(stack, "busy", 1)
    stack.start_api(quiet=True)
    stack.wait_ready()
    client = _client(stack)
    client.upload("works", STARTS_THEN_WORKS, timeout_seconds=25)
    # Longer than the fetch below takes to start, even on a loaded machine.
    holding = _invoke(client, counter, "holding", seconds=12)
    eventually(lambda: "holding" in counter.started(), 20, "the busy worker's one slot is taken")
    fetched = _invoke(client, counter, "fetched", seconds=0)
    eventually(lambda: broker.llen("flowpool") == 1, 10, "the run waits in the broker's queue: no slot is free")

    fetcher = subprocess.run([sys.executable, "-I", "-c", FETCH_AND_DIE], env=stack.env, timeout=30,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    died_at = time.monotonic()
    assert fetcher.returncode == -signal.SIGKILL, fetcher.stderr.decode()
    assert broker.hlen(UNACKED) == 1, "the run's message waits in unacked"

    _start(stack, "other", 2)
    eventually(lambda: broker.hlen(UNACKED) == 0, 15, "the dead fetcher's message leaves unacked")
    response = fetched.answer(40)
    assert response.status_code == 200, response.text
    assert response.json()["output"] == {"tag": "fetched"}
    started = counter.started()
    assert len(started["fetched"]) == 1, "the run started once"
    assert started["fetched"][0] - died_at < 20, f"it started {started['fetched'][0] - died_at:.1f}s after the death"
    assert holding.answer(30).status_code == 200
    assert busy.poll() is None


def test_a_second_delivery_of_a_running_run_is_acked_at_once_and_runs_nothing(
        stack: Stack, counter: StartCounter, broker: redis.Redis) -> None:
    # What a worker slower than the visibility timeout between fetch and start would cause: the message
    # comes back while the run goes on. Injected by pushing a copy of the message.
    _start(stack, "busy", 1)
    stack.start_api(quiet=True)
    stack.wait_ready()
    client = _client(stack)
    client.upload("works", STARTS_THEN_WORKS, timeout_seconds=25)
    holding = _invoke(client, counter, "holding", seconds=4)
    eventually(lambda: "holding" in counter.started(), 20, "the busy worker's one slot is taken")
    twice = _invoke(client, counter, "twice", seconds=3)
    message = eventually(lambda: broker.lindex("flowpool", 0), 10, "the run waits in the broker's queue")

    _start(stack, "other", 2)
    eventually(lambda: "twice" in counter.started(), 20, "the run started")
    broker.lpush("flowpool", message)
    eventually(lambda: broker.llen("flowpool") == 0 and broker.hlen(UNACKED) == 0, 10,
               "the second delivery is taken and acknowledged")
    response = twice.answer(30)
    assert response.status_code == 200, response.text
    assert response.json()["output"] == {"tag": "twice"}
    assert client.run(response.json()["request_id"])["status"] == "succeeded"
    assert holding.answer(30).status_code == 200
    assert {tag: len(times) for tag, times in counter.started().items()} == {"holding": 1, "twice": 1}


@pytest.mark.timeout(240)
def test_sigterm_with_a_backlog_three_times_fails_no_run(
        stack: Stack, counter: StartCounter) -> None:
    workers = [_start(stack, "first", 2), _start(stack, "second", 2)]
    stack.start_api(quiet=True)
    stack.wait_ready(workers=2)
    client = _client(stack)
    client.upload("works", STARTS_THEN_WORKS, timeout_seconds=25)
    for round_ in range(3):
        # Each run waits on its channel for a ctx call's answer: a channel made non-blocking fails it there.
        calls = {f"r{round_}-{n}": _invoke(client, counter, f"r{round_}-{n}", seconds=1, hold=0.3)
                 for n in range(10)}
        eventually(lambda: len([t for t in counter.started() if t in calls]) >= 4, 20, "both workers are busy")
        stopping = workers.pop(0)
        stopping.send_signal(signal.SIGTERM)
        workers.append(_start(stack, f"after-{round_}", 2))
        answers = {tag: call.answer(60) for tag, call in calls.items()}
        failed = {tag: (r.status_code, r.text) for tag, r in answers.items() if r.status_code != 200}
        assert not failed, f"round {round_}: {failed}"
        assert stopping.wait(30) == 0
        _forget(stack, stopping)
    assert all(len(times) == 1 for times in counter.started().values()), "each run started once"


def test_a_run_longer_than_the_drain_time_answers_worker_lost_and_queued_ones_run_elsewhere(
        stack: Stack, counter: StartCounter, broker: redis.Redis) -> None:
    draining = _start(stack, "draining", 1, FLOWPOOL_WORKER_DRAIN_SECONDS="2")
    stack.start_api(quiet=True)
    stack.wait_ready()
    client = _client(stack)
    client.upload("works", STARTS_THEN_WORKS, timeout_seconds=25)
    # It would end after 20 s: its answer must come well before (the read timeout).
    long = _invoke(client, counter, "long", seconds=20, read_timeout=15)
    eventually(lambda: "long" in counter.started(), 20, "the long run started")
    queued = {f"queued{n}": _invoke(client, counter, f"queued{n}", seconds=0) for n in range(2)}
    eventually(lambda: broker.llen("flowpool") + broker.hlen(UNACKED) == 2, 10, "two runs wait")

    draining.send_signal(signal.SIGTERM)
    _start(stack, "other", 2)

    response = long.answer(30)
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "worker_lost"
    record = client.run(error["request_id"])
    assert record["status"] == "lost"
    assert record["error"]["message"] == error["message"]
    for tag, call in queued.items():
        answer = call.answer(40)
        assert answer.status_code == 200, (tag, answer.text)
        assert _worker_of(client, answer) == "flowpool@other"
    assert {tag: len(times) for tag, times in counter.started().items()} == {"long": 1, "queued0": 1, "queued1": 1}
    assert draining.wait(15) == 0
    _forget(stack, draining)
