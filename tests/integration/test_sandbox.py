"""The sandbox through the whole stack: a worker holding many waiting runs, workflow limits, what the worker reports.

The escape attempts themselves, on each backend, are in tests/unit/test_sandbox.py.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import requests

from flowpool.devstack import Stack
from flowpool.redis_server import RedisServer
from tests.conftest import SESSION_PIDS, TEST_ENV
from tests.helpers import Client
from tests.provider import StandInProvider

pytestmark = pytest.mark.slow

WAITS_AT_GATE = """
def execute(ctx):
    reply = ctx.chat.completions.create(application="gated", intent=ctx.input["gate"], messages=[])
    return reply["choices"][0]["message"]["content"]
"""

TIMES_OUT_AT_GATE = """
TIMEOUT_SECONDS = 1

def execute(ctx):
    try:
        return ctx.chat.completions.create(application="gated", intent="never", messages=[])
    finally:
        ctx.log.info("interrupted")
"""

SPINS_THROUGH_ITS_SOFT_LIMIT = """
TIMEOUT_SECONDS = 1

def execute(ctx):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
    return "never"
"""


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and its descendants, in bytes (shared pages counted once)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:  # gone meanwhile, or a zombie
            pass
    return total


@pytest.fixture(scope="module")
def busy_stack() -> Iterator[Stack]:
    """A stack whose one worker has the default concurrency (64), not the test tier's 16.

    On a Redis of its own: the session stack's worker, which earlier tests may
    keep busy, must not take a share of this stack's runs from a common queue.
    """
    env = {k: v for k, v in TEST_ENV.items() if k != "FLOWPOOL_WORKER_CONCURRENCY"}
    stack = Stack(env=env)
    stack.start()
    assert stack.redis is not None
    # They outlive each test of the module on purpose.
    SESSION_PIDS.update(p.pid for p in [stack.redis.process, *stack.processes] if p is not None)
    try:
        yield stack
    finally:
        stack.stop()


def test_one_worker_holds_64_runs_waiting_on_model_calls_within_2_gib_and_time_limits_still_hold(
        busy_stack: Stack, provider: StandInProvider) -> None:
    assert busy_stack.api_url is not None
    client = Client(busy_stack.api_url, busy_stack.create_account("many-runs"))
    client.request("PUT", "/api/v1/applications/gated", json={"intents": {
        "many": {"model": "hold-many-runs", "base_url": provider.base_url},
        "never": {"model": "hold-never-opens", "base_url": provider.base_url},
    }}).raise_for_status()
    for ref, script in (("waits", WAITS_AT_GATE), ("times-out", TIMES_OUT_AT_GATE),
                        ("spins", SPINS_THROUGH_ITS_SOFT_LIMIT)):
        client.upload(ref, script)
    worker = busy_stack.processes[0].pid
    results: dict[str, list[requests.Response]] = {"waits": [], "times-out": [], "spins": []}

    def invoke(ref: str) -> None:
        own = Client(client.base_url, client.key)  # a connection of its own: requests' pool keeps 10
        results[ref].append(own.invoke(ref, input={"gate": "many"}, cache=False))

    # 60 runs wait on a model call; 3 more pass their soft limit while they wait, 1 spins through it.
    threads = [threading.Thread(target=invoke, args=(ref,)) for ref in ["waits"] * 60 + ["times-out"] * 3 + ["spins"]]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while provider.held("many-runs") < 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert provider.held("many-runs") == 60, (
            f"the worker did not hold 60 runs waiting at once: {provider.held('many-runs')} waiting, "
            f"{ {ref: [r.status_code for r in done] for ref, done in results.items()} } answered")
        peak = tree_pss(worker)
        # While the 60 wait, the other four end at their limits.
        while len(results["times-out"]) + len(results["spins"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert provider.held("many-runs") == 60
        peak = max(peak, tree_pss(worker))
    finally:
        provider.open_gate("many-runs")
        for thread in threads:
            thread.join(60)

    assert [r.status_code for r in results["times-out"]] == [408] * 3, results["times-out"][0].text
    assert [r.status_code for r in results["spins"]] == [408]
    assert "hard" in results["spins"][0].json()["error"]["message"]
    assert sorted(r.status_code for r in results["waits"]) == [200] * 60
    assert peak < 2 << 30, f"the worker's processes took {peak / 2**20:.0f} MiB"
    # The worker serves on.
    assert client.invoke("waits", input={"gate": "many"}, cache=False).status_code == 200


LIMITED = """
import os
import resource
import tempfile

LIMITS = {"tmp_mb": 3, "memory_mb": 100000, "open_files": 40, "result_bytes": 300}

def execute(ctx):
    stat = os.statvfs(tempfile.gettempdir())
    found = {"memory": resource.getrlimit(resource.RLIMIT_AS)[0] >> 20,
             "open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
             "tmp_mb": stat.f_blocks * stat.f_frsize >> 20}
    if ctx.input.get("big"):
        return "x" * 400
    return found
"""


def test_a_workflows_limits_apply_to_its_runs_capped_by_the_operator(client: Client) -> None:
    client.upload("limited", LIMITED)

    found = client.invoke("limited", input={}, cache=False)
    too_big = client.invoke("limited", input={"big": True}, cache=False)

    assert found.status_code == 200, found.text
    output = found.json()["output"]
    assert output["memory"] == 2048  # asked for 100000 MiB: capped by FLOWPOOL_SANDBOX_MEMORY_MB_CAP
    assert output["open_files"] == 40
    assert output["tmp_mb"] == 3
    assert too_big.status_code == 413, too_big.text
    assert "300 bytes" in too_big.json()["error"]["message"]


def test_limits_naming_an_unknown_limit_are_refused_at_upload(client: Client) -> None:
    response = client.post("/api/v1/workflows/upload", json={
        "workflow_ref_name": "bad-limits",
        "script": "LIMITS = {'gpus': 2}\n\ndef execute(ctx):\n    return 1\n"})

    assert response.status_code == 400
    assert "LIMITS" in response.text and "line 1" in response.text


def test_doctor_names_each_running_workers_backend(stack: Stack) -> None:
    assert stack.redis_url is not None
    done = subprocess.run([sys.executable, "-I", "-m", "flowpool.cli", "doctor"], capture_output=True, text=True,
                          env={"FLOWPOOL_REDIS_URL": stack.redis_url, "PATH": "/usr/bin:/bin"}, timeout=120)
    workers = [line for line in done.stdout.splitlines() if "worker sandbox" in line]

    assert workers, done.stdout
    assert all(" backend; " in line for line in workers)
    assert all(line.startswith("BAD") == ("WARNING" in line) for line in workers)


def test_doctor_names_the_backend_and_what_isolation_is_missing(redis_server: RedisServer) -> None:
    done = subprocess.run([sys.executable, "-I", "-m", "flowpool.cli", "doctor"], capture_output=True, text=True,
                          env={"FLOWPOOL_REDIS_URL": redis_server.url, "PATH": "/usr/bin:/bin"}, timeout=120)
    lines = {line[4:20].strip(): line for line in done.stdout.splitlines()}

    assert "sandbox backend" in lines, done.stdout
    backend = lines["sandbox backend"].split()[3]
    assert backend in ("bwrap", "process")
    sandbox = lines["sandbox"]
    assert f"{backend} backend" in sandbox
    # A line says BAD exactly when the sandbox lacks something, and says what.
    assert sandbox.startswith("BAD") == ("WARNING" in sandbox)
    forced = subprocess.run([sys.executable, "-I", "-m", "flowpool.cli", "doctor"], capture_output=True, text=True,
                            env={"FLOWPOOL_REDIS_URL": redis_server.url, "PATH": "/usr/bin:/bin",
                                 "FLOWPOOL_SANDBOX_BACKEND": "process"}, timeout=120)
    assert "process backend" in forced.stdout
    assert "WARNING: the process backend gives weaker isolation" in forced.stdout
    assert forced.returncode == 1


def test_a_worker_says_at_start_which_backend_isolates_its_runs() -> None:
    own_redis = RedisServer().start()  # a queue of its own: this worker must take no other test's runs
    worker = subprocess.Popen(
        [sys.executable, "-I", "-m", "flowpool.cli", "worker", "--concurrency", "1"],
        env={"FLOWPOOL_REDIS_URL": own_redis.url, "FLOWPOOL_LOG_LEVEL": "INFO", "PATH": "/usr/bin:/bin",
             "FLOWPOOL_SANDBOX_BACKEND": "process"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    try:
        assert worker.stderr is not None
        for line in worker.stderr:
            said.append(line)
            if "WARNING" in line and "weaker isolation" in line:
                break
    finally:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        own_redis.stop()
    ready = [line for line in said if "ready" in line and "sandbox:" in line]
    assert ready and "process backend" in ready[0], "".join(said[-20:])
    assert any("WARNING: the process backend gives weaker isolation" in line for line in said)

