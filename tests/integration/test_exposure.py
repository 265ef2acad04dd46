"""Less on show: tracebacks without the worker's paths, a sandbox without host paths, /metrics behind a token,
and an API that binds loopback unless told otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests

from flowpool.devstack import Stack
from flowpool.procs import free_port
from flowpool.redis_server import RedisServer
from flowpool.sandbox.backends import bwrap_binary, probe_bwrap
from tests.conftest import TEST_ENV, second_api
from tests.helpers import Client, error_of, eventually

REPO = str(Path(__file__).resolve().parents[2])
VENV = sys.prefix
# What no caller may read in a traceback: the worker's own files.
WORKER_PATHS = ("/work", REPO, VENV, "site-packages", "flowpool/", "runtime.py")


def _ref(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_a_script_error_shows_only_the_scripts_frames_under_the_workflows_name(client: Client) -> None:
    ref = _ref("raises")
    client.upload(ref, """
        import json

        def helper(text):
            return json.loads(text)["missing"]

        def execute(ctx):
            return helper("{}")
    """)
    response = client.invoke(ref, input={})
    assert response.status_code == 500, response.text
    record = client.get(f"/api/v1/runs/{error_of(response)['request_id']}")
    trace = record.json()["data"]["error"]["traceback"]
    assert f'File "workflow:{ref}", line 8, in execute' in trace
    assert f'File "workflow:{ref}", line 5, in helper' in trace
    assert trace.rstrip().endswith("KeyError: 'missing'")
    for text in (trace, response.text, record.text):
        for path in WORKER_PATHS:
            assert path not in text, (path, text)


def test_a_failed_ctx_call_shows_the_scripts_line_not_the_runtimes(client: Client) -> None:
    ref = _ref("ctxfail")
    client.upload(ref, """
        def execute(ctx):
            return ctx.chat.completions.create(intent="answer")
    """)
    response = client.invoke(ref, input={})
    assert response.status_code == 500, response.text
    trace = client.run(error_of(response)["request_id"])["error"]["traceback"]
    assert f'File "workflow:{ref}", line 3, in execute' in trace and "ModelError" in trace
    for path in WORKER_PATHS:
        assert path not in trace, (path, trace)


@pytest.mark.slow
def test_an_error_naming_a_worker_file_shows_no_worker_path_even_without_bwrap() -> None:
    # The process backend runs scripts with the worker's own Python at its host paths: an ImportError's
    # message names the file; the worker scrubs those paths from every error a caller or a record shows.
    stack = Stack(env={**TEST_ENV, "FLOWPOOL_SANDBOX_BACKEND": "process"}).start()
    try:
        assert stack.api_url is not None
        client = Client(stack.api_url, stack.create_account("paths"))
        client.upload("imports", """
            from flowpool_workflow import NoSuchName

            def execute(ctx):
                return 1
        """)
        response = client.invoke("imports", input={})
        assert response.status_code == 500, response.text
        assert "cannot import name 'NoSuchName'" in error_of(response)["message"]
        assert "<runtime>" in error_of(response)["message"]
        record = client.get(f"/api/v1/runs/{error_of(response)['request_id']}")
        for text in (response.text, record.text):
            for path in WORKER_PATHS:
                assert path not in text, (path, text)
    finally:
        stack.stop()


# Where the worker is installed on this host: no run may read any of it.
INSTALLATION_PATHS = (REPO, VENV, os.path.realpath(sys.executable), sys.base_prefix, "/work", "/root")


@pytest.mark.skipif(probe_bwrap(bwrap_binary()) is not None, reason="the bwrap backend does not work here")
def test_a_run_reads_no_host_path_in_its_process_table_mounts_or_modules_and_no_usr_local(client: Client) -> None:
    ref = _ref("looks")
    client.upload(ref, """
        import os
        import sys

        def execute(ctx):
            seen = {}
            for path in ("/proc/1/cmdline", "/proc/self/cmdline", "/proc/1/environ", "/proc/self/mountinfo",
                         "/proc/1/mountinfo", "/proc/mounts", "/proc/self/maps"):
                try:
                    with open(path, "rb") as f:
                        seen[path] = f.read().decode(errors="replace")
                except OSError as exc:
                    seen[path] = type(exc).__name__
            try:
                seen["/usr/local"] = os.listdir("/usr/local")
            except OSError:
                seen["/usr/local"] = []
            seen["sys"] = repr([sys.executable, sys.prefix, sys.base_prefix, sys.path, os.__file__])
            return seen
    """)
    response = client.invoke(ref, input={})
    assert response.status_code == 200, response.text
    seen = response.json()["output"]
    assert seen["/usr/local"] == []
    assert " /runtime " in seen["/proc/self/mountinfo"]  # the runtime is mounted, at a neutral place
    for path in ("/proc/1/cmdline", "/proc/self/cmdline", "/proc/1/environ", "/proc/self/mountinfo",
                 "/proc/1/mountinfo", "/proc/mounts", "/proc/self/maps", "sys"):
        for host_path in INSTALLATION_PATHS:
            assert host_path not in seen[path], (path, host_path, seen[path])


@pytest.fixture
def guarded_api(redis_server: RedisServer, stack: Stack) -> Iterator[tuple[str, str]]:
    """A second API on the shared stack's Redis (its worker answers), with a metrics token set."""
    token = f"scrape-{uuid.uuid4().hex}"
    with second_api(redis_server, FLOWPOOL_METRICS_TOKEN=token) as api:
        assert api.api_url is not None
        yield api.api_url, token


def test_metrics_with_a_token_set_answer_only_the_right_bearer(guarded_api: tuple[str, str]) -> None:
    url, token = guarded_api
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}, {"x-api-key": token}):
        refused = requests.get(url + "/metrics", headers=headers, timeout=10)
        assert refused.status_code == 401, headers
        assert "flowpool_workers" not in refused.text
        assert error_of(refused)["type"] == "authentication_error"
    allowed = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert allowed.status_code == 200 and "flowpool_workers" in allowed.text
    spec = requests.get(url + "/openapi.json", timeout=10).json()
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"metricsToken": []}]
    assert spec["components"]["securitySchemes"]["metricsToken"]["scheme"] == "bearer"


def test_metrics_without_a_token_set_stay_public(stack: Stack) -> None:
    assert requests.get(f"{stack.api_url}/metrics", timeout=10).status_code == 200
    spec = requests.get(f"{stack.api_url}/openapi.json", timeout=10).json()
    assert "security" not in spec["paths"]["/metrics"]["get"]


def test_the_api_command_binds_loopback_unless_told() -> None:
    command = os.path.join(os.path.dirname(sys.executable), "flowpool")
    done = subprocess.run([command, "api", "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "[default: 127.0.0.1]" in " ".join(done.stdout.split())
    assert "--host 0.0.0.0" in done.stdout  # the help says how to serve others


def test_the_api_listens_on_loopback_only_when_started_without_host(redis_server: RedisServer) -> None:
    stack = Stack(env=TEST_ENV, redis_url=redis_server.url)
    port = free_port()
    try:
        api = stack.spawn("api", "--port", str(port), quiet=True)

        def listening() -> list[str]:
            return [conn.laddr.ip for child in [psutil.Process(api.pid), *psutil.Process(api.pid).children()]
                    for conn in child.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]

        assert set(eventually(listening, 30, "the API listens")) == {"127.0.0.1"}
    finally:
        stack.stop()
