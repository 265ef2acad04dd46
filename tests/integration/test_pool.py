"""GET /api/v1/pool and the queue gauges through the whole stack: what waits, what runs, and the workers it needs.

The module's stack has its own Redis (so no other test's worker counts), an
API with FLOWPOOL_ADMIN_TOKEN set, a worker of 2 slots consuming ``default``
and one of 1 slot consuming ``heavy``. Each run waits at a gate on loopback
(``ctx.http``) until the test opens it, so the pool holds still while it is
read: the slots full, the rest queued.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from flowpool.devstack import Stack
from tests.conftest import SESSION_PIDS, TEST_ENV
from tests.helpers import Client, eventually, ok, run_flowpool

ADMIN_TOKEN = "pool-admin-token-3c9f1a7e55d0"
POOL_ENV = {**TEST_ENV, "FLOWPOOL_ADMIN_TOKEN": ADMIN_TOKEN, "FLOWPOOL_WORKER_CONCURRENCY": "2",
            # Runs wait queued behind the full slots for as long as the test holds the gate.
            "FLOWPOOL_QUEUE_WAIT_SECONDS": "60"}
# Each worker its own block of sandbox uids, away from the other tests' workers.
UID_BASES = {"default": "119000", "heavy": "119100", "doomed": "119200"}
OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

WAITS_AT_THE_GATE = """
    {queue}
    def execute(ctx):
        ctx.http.get(ctx.input["gate"], timeout=60)
        return {{"tag": ctx.input["tag"]}}
"""


class Gate:
    """An HTTP server on loopback that holds each request until the test opens it (60 s at most)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.arrived: list[str] = []
        self._lock = threading.Lock()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with gate._lock:
                    gate.arrived.append(self.path)
                gate.opened.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="gate", daemon=True)
        self._thread.start()

    def url(self, tag: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{tag}"

    def waiting(self) -> int:
        with self._lock:
            return len(self.arrived)

    def close(self) -> None:
        self.opened.set()
        self.server.shutdown()
        self.server.server_close()


class Call:
    """One invocation made from a thread of its own."""

    def __init__(self, client: Client, ref: str, tag: str, gate: Gate) -> None:
        self.response: requests.Response | None = None
        body = {"model": f"workflow:{ref}", "cache": False, "input": {"tag": tag, "gate": gate.url(tag)}}
        self._thread = threading.Thread(target=self._call, args=(client, body), daemon=True)
        self._thread.start()

    def _call(self, client: Client, body: dict[str, Any]) -> None:
        self.response = requests.post(client.base_url + "/workflow/chat/completions",
                                      headers={"x-api-key": client.key}, json=body, timeout=(5, 90))

    def answer(self, timeout: float = 90) -> requests.Response:
        self._thread.join(timeout)
        assert self.response is not None, "no answer in time"
        return self.response


def _start_worker(stack: Stack, queues: str, name: str, slots: int, uids: str) -> Any:
    return stack.start_worker("--queues", queues, "--concurrency", str(slots), "--name", name, quiet=True,
                              env={"FLOWPOOL_SANDBOX_UID_BASE": UID_BASES[uids]})


@pytest.fixture(scope="module")
def pool_stack() -> Iterator[Stack]:
    """A Redis of its own, an API with an admin token, a 2-slot ``default`` worker and a 1-slot ``heavy`` one."""
    stack = Stack(env=POOL_ENV)
    try:
        _start_worker(stack, "default", "flowpool@pool-default", 2, "default")
        _start_worker(stack, "heavy", "flowpool@pool-heavy", 1, "heavy")
        stack.start_api(quiet=True)
        stack.wait_ready(workers=2)
        kept = {process.pid for process in stack.processes}
        SESSION_PIDS.update(kept)  # they and their run processes outlive each test of the module, on purpose
        try:
            yield stack
        finally:
            SESSION_PIDS.difference_update(kept)
    finally:
        stack.stop(timeout=20)


@pytest.fixture
def gate() -> Iterator[Gate]:
    server = Gate()
    yield server
    server.close()


def _pool(stack: Stack) -> dict[str, Any]:
    response = requests.get(f"{stack.api_url}/api/v1/pool", headers=OPERATOR, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _gauges(stack: Stack) -> dict[str, dict[str, float]]:
    """The flowpool_queue_* gauges of /metrics by name, each {queue: value}; flowpool_queue_length under ''."""
    response = requests.get(f"{stack.api_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name.startswith("flowpool_queue_"):
            for sample in family.samples:
                found.setdefault(sample.name, {})[sample.labels.get("queue", "")] = sample.value
    return found


def _demand(pool: dict[str, Any], queue: str) -> tuple[int, ...]:
    q = pool["queues"][queue]
    return q["queued"], q["reserved"], q["running"], q["slots_per_worker"], q["workers"], q["desired_workers"]


def test_the_pool_is_an_operator_route_that_wants_the_admin_token_even_from_loopback(pool_stack: Stack) -> None:
    url = f"{pool_stack.api_url}/api/v1/pool"

    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer not-the-admin-token!"}, timeout=10).status_code == 401
    assert requests.get(url, headers=OPERATOR, timeout=10).status_code == 200


def test_the_pool_shows_full_slots_as_running_the_rest_as_queued_and_the_workers_that_needs(
        pool_stack: Stack, gate: Gate) -> None:
    assert pool_stack.api_url is not None
    client = Client(pool_stack.api_url, pool_stack.create_account(f"pool-{uuid.uuid4().hex[:8]}"))
    client.upload("gated", WAITS_AT_THE_GATE.format(queue=""))
    client.upload("gated-heavy", WAITS_AT_THE_GATE.format(queue='QUEUE = "heavy"'))
    idle = _pool(pool_stack)
    assert _demand(idle, "default") == (0, 0, 0, 2, 1, 0)
    assert _demand(idle, "heavy") == (0, 0, 0, 1, 1, 0)

    calls = [Call(client, "gated", f"d{n}", gate) for n in range(5)]
    calls += [Call(client, "gated-heavy", f"h{n}", gate) for n in range(3)]
    # Both slots of the default worker and the heavy worker's one are taken; the rest wait in their queues.
    eventually(lambda: gate.waiting() == 3, 60, "three runs at the gate")
    # The workers report what they run with their next heartbeat (every half second here).
    busy = eventually(lambda: (p := _pool(pool_stack))["queues"]["default"]["running"] == 2
                      and p["queues"]["heavy"]["running"] == 1 and p, 20, "three runs reported running")

    # desired_workers = ceil((queued + reserved + running) / slots): (3 + 2) / 2 and (2 + 1) / 1.
    assert _demand(busy, "default") == (3, 0, 2, 2, 1, 3)
    assert _demand(busy, "heavy") == (2, 0, 1, 1, 1, 3)
    workers = {w["name"]: w for w in busy["workers"]}
    assert set(workers) == {"flowpool@pool-default", "flowpool@pool-heavy"}
    assert (workers["flowpool@pool-default"]["queues"], workers["flowpool@pool-default"]["slots"]) == (["default"], 2)
    assert workers["flowpool@pool-default"]["running"] == {"default": 2}
    assert workers["flowpool@pool-heavy"]["running"] == {"heavy": 1}
    assert all(0 <= w["last_beat_age"] < float(POOL_ENV["FLOWPOOL_WORKER_TTL_SECONDS"]) for w in workers.values())
    gauges = _gauges(pool_stack)  # the same numbers, while the gate holds them still
    for field, index in (("queued", 0), ("reserved", 1), ("running", 2), ("slots_per_worker", 3), ("workers", 4),
                         ("desired_workers", 5)):
        assert gauges[f"flowpool_queue_{field}"]["default"] == _demand(busy, "default")[index], field
        assert gauges[f"flowpool_queue_{field}"]["heavy"] == _demand(busy, "heavy")[index], field
    assert gauges["flowpool_queue_length"][""] == 5

    gate.opened.set()
    assert [call.answer().status_code for call in calls] == [200] * 8
    done = eventually(lambda: (p := _pool(pool_stack))["queues"]["default"]["running"] == 0
                      and p["queues"]["heavy"]["running"] == 0 and p, 20, "every run done")
    assert _demand(done, "default") == (0, 0, 0, 2, 1, 0)
    assert _demand(done, "heavy") == (0, 0, 0, 1, 1, 0)
    assert _gauges(pool_stack)["flowpool_queue_desired_workers"] == {"default": 0, "heavy": 0}


def test_a_worker_killed_outright_drops_out_of_the_pool_within_the_ttl(pool_stack: Stack) -> None:
    doomed = _start_worker(pool_stack, "default", "flowpool@pool-doomed", 3, "doomed")
    try:
        joined = eventually(lambda: (p := _pool(pool_stack))["queues"]["default"]["workers"] == 2 and p, 60,
                            "the second default worker")
        assert joined["queues"]["default"]["slots_per_worker"] == 3  # the largest of the queue's workers
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)

        gone = eventually(lambda: (p := _pool(pool_stack))["queues"]["default"]["workers"] == 1 and p,
                          3 * float(POOL_ENV["FLOWPOOL_WORKER_TTL_SECONDS"]) + 5, "the killed worker gone")
    finally:
        pool_stack.processes.remove(doomed)
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(10)
    assert [w["name"] for w in gone["workers"]] == ["flowpool@pool-default", "flowpool@pool-heavy"]
    assert gone["queues"]["default"]["slots_per_worker"] == 2


def test_flowpool_pool_prints_each_queue_and_worker_with_the_admin_token(pool_stack: Stack, tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")},
           "FLOWPOOL_API_URL": str(pool_stack.api_url), "FLOWPOOL_DATA_DIR": str(tmp_path)}

    refused = run_flowpool("pool", env=env, timeout=60)
    table = ok(run_flowpool("pool", env={**env, "FLOWPOOL_ADMIN_TOKEN": ADMIN_TOKEN}, timeout=60))
    answer = json.loads(ok(run_flowpool("pool", "--json", env={**env, "FLOWPOOL_ADMIN_TOKEN": ADMIN_TOKEN},
                                        timeout=60)))

    assert refused.returncode == 1 and "401" in refused.stderr and "FLOWPOOL_ADMIN_TOKEN" in refused.stderr
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["queue", "queued", "reserved", "running", "slots_per_worker", "workers", "desired_workers"]
    assert ["default", "0", "0", "0", "2", "1", "0"] in rows and ["heavy", "0", "0", "0", "1", "1", "0"] in rows
    assert any(row[:3] == ["flowpool@pool-heavy", "heavy", "1"] for row in rows)
    assert answer["queues"]["heavy"]["workers"] == 1


def test_without_an_admin_token_the_pool_answers_loopback_with_none(stack: Stack) -> None:
    response = requests.get(f"{stack.api_url}/api/v1/pool", timeout=10)  # the session's API sets no admin token

    assert response.status_code == 200, response.text
    assert response.json()["queues"]["default"]["workers"] >= 1
