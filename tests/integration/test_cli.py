"""The ``flowpool`` command line, run as a user runs it: real subprocesses.

``flowpool dev`` starts everything (its own Redis, a worker, the API) and is
stopped with SIGINT as Ctrl-C does; the other commands talk to it, or to the
session's stack, through the ``FLOWPOOL_*`` variables.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
import redis
import requests

from flowpool import keys
from flowpool.devstack import Stack
from flowpool.procs import free_port
from flowpool.redis_server import RedisServer
from tests.helpers import CannedHTTPServer, Client, DevProcess, doctor_checks, ok, run_flowpool

REPO = Path(__file__).resolve().parents[2]
ECHO_EXAMPLE = REPO / "examples" / "echo.py"


# A data directory no dev runs on: the commands run here must not find a `flowpool dev` someone runs in the checkout.
NO_DEV_DIR = str(Path(tempfile.gettempdir()) / "flowpool-tests-no-dev-here")


def _env(**settings: str) -> dict[str, str]:
    """The test process's environment without any FLOWPOOL_* variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update({"FLOWPOOL_DATA_DIR": NO_DEV_DIR, **settings})
    return env


class Dev(DevProcess):
    """``flowpool dev`` run from the repository with a data directory of its own; it parses the whole banner."""

    def __init__(self, port: int, settings: dict[str, str], preexec_fn: Callable[[], Any] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        # A data directory of its own: dev keeps its Redis data and key across restarts (by default in the cwd).
        self.data_dir = tempfile.TemporaryDirectory(prefix="flowpool-dev-")
        super().__init__(port, cwd=REPO, env=_env(**{"FLOWPOOL_DATA_DIR": self.data_dir.name, **settings}),
                         args=args, preexec_fn=preexec_fn)
        self.curl_url = self.curl_key = ""
        self.curl_body: dict[str, object] = {}

    def _banner_printed(self, line: str) -> bool:
        return line.lstrip().startswith("-d '")

    def wait_for_banner(self, timeout: float = 120) -> Client:
        """Wait until dev printed its key and the whole curl line, and parse them."""
        super().wait_for_banner(timeout)
        text = self.output
        self.api_url = re.search(r"^\s+API:\s+(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
        self.curl_url = re.search(r"^\s+curl -s (\S+) \\$", text, re.M).group(1)  # type: ignore[union-attr]
        self.curl_key = re.search(r'-H "Authorization: Bearer (\S+)"', text).group(1)  # type: ignore[union-attr]
        self.curl_body = json.loads(re.search(r"^\s+-d '(.*)'$", text, re.M).group(1))  # type: ignore[union-attr]
        return Client(self.api_url, self.key)

    def cli_env(self) -> dict[str, str]:
        return _env(FLOWPOOL_API_URL=self.api_url, FLOWPOOL_API_KEY=self.key)

    def curl(self) -> requests.Response:
        """What the printed curl command sends."""
        return requests.post(self.curl_url, json=self.curl_body, timeout=60,
                             headers={"Authorization": f"Bearer {self.curl_key}"})


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie about to be reaped
        return ""


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.status()} {_cmdline(process)}"
    except psutil.Error:
        return f"{process.pid} (gone)"


def _start_dev(preexec_fn: Callable[[], Any] | None = None, **settings: str) -> Dev:
    dev = Dev(free_port(), settings, preexec_fn)
    try:
        dev.wait_for_banner()
    except BaseException:
        dev.kill()
        raise
    return dev


@pytest.fixture
def dev() -> Iterator[Dev]:
    dev = _start_dev()
    try:
        yield dev
    finally:
        dev.kill()


# flowpool dev and the commands a user runs against it.

@pytest.mark.slow
def test_dev_prints_a_key_and_a_curl_line_that_works_after_the_push_it_shows(dev: Dev) -> None:
    assert dev.api_url == f"http://127.0.0.1:{dev.port}"
    assert dev.curl_url == f"{dev.api_url}/workflow/chat/completions"
    assert dev.curl_key == dev.key
    assert f"export FLOWPOOL_API_URL={dev.api_url} FLOWPOOL_API_KEY={dev.key} FLOWPOOL_REDIS_URL=redis://" \
        in dev.output
    # The venv's own flowpool, by its full path: the line runs with no venv activated (test_cli_dev.py runs it).
    # In a checkout it pushes the echo example by its full path, so the line runs from any directory too.
    flowpool, example = Path(sys.executable).parent / "flowpool", REPO / "examples" / "echo.py"
    assert f"\n  {flowpool} push {example} --name echo\n" in dev.output
    pushed = ok(run_flowpool("push", "examples/echo.py", "--name", "echo", env=dev.cli_env()))
    assert re.fullmatch(r"echo@\d+\.\d+\.\d+ \(new version\)\n", pushed), pushed
    response = dev.curl()
    assert response.status_code == 200, response.text
    assert response.json()["output"] == {"echo": "hello flowpool", "words": 2}
    assert response.headers["X-Cache"] == "MISS"


@pytest.mark.slow
def test_push_invoke_runs_and_logs_against_dev(dev: Dev) -> None:
    env = dev.cli_env()
    pushed = ok(run_flowpool("push", str(ECHO_EXAMPLE), "--name", "echo", env=env))
    version = re.fullmatch(r"echo@(\d+\.\d+\.\d+) \(new version\)\n", pushed)
    assert version, pushed
    assert ok(run_flowpool("push", str(ECHO_EXAMPLE), "--name", "echo", env=env)) == \
        f"echo@{version.group(1)} (unchanged, active)\n"

    invoked = ok(run_flowpool("invoke", "echo", "--input", '{"text": "from the command line"}', env=env))
    assert json.loads(invoked) == {"echo": "from the command line", "words": 4}
    by_http = dev.curl()
    assert by_http.status_code == 200, by_http.text
    again = dev.curl()
    assert again.headers["X-Cache"] == "HIT"
    request_id = by_http.json()["request_id"]

    header, *lines = ok(run_flowpool("runs", "echo", env=env)).splitlines()
    assert header.split() == ["TIME", "REQUEST_ID", "STATUS", "DURATION", "CACHE", "VERSION"]
    assert len(lines) == 3, lines
    # Each row: date and time (local), request_id, status, duration, cache, version.
    runs = {line.split()[2]: line.split()[3:] for line in lines}
    assert [runs[request_id][i] for i in (0, 2, 3)] == ["succeeded", "miss", version.group(1)]
    assert [runs[again.json()["request_id"]][i] for i in (0, 2, 3)] == ["succeeded", "hit", version.group(1)]
    assert lines[0].split()[2] == again.json()["request_id"]  # newest first
    assert all(fields[0] == "succeeded" for fields in runs.values())

    logs = ok(run_flowpool("logs", request_id, env=env))
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO +echoing length=14\n", logs), logs
    missing = run_flowpool("logs", "req_doesnotexist", env=env)
    assert missing.returncode != 0
    assert "404" in missing.stderr


def _ignore_sigint() -> None:
    """What a shell without job control does to `flowpool dev &`, and a parent ignoring SIGINT passes on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["dev-process", "process-group", "dev-started-with-sigint-ignored"])
def test_sigint_stops_dev_and_every_process_it_started(target: str) -> None:
    dev = _start_dev(preexec_fn=_ignore_sigint if target == "dev-started-with-sigint-ignored" else None)
    try:
        ok(run_flowpool("push", str(ECHO_EXAMPLE), "--name", "echo", env=dev.cli_env()))
        assert dev.curl().status_code == 200  # so the sandbox has run processes too
        started = dev.descendants()
        names = " ".join(_cmdline(p) for p in started)
        for part in ("redis-server", "flowpool.cli worker", "flowpool.cli api", "flowpool.sandbox.zygote"):
            assert part in names, names
        if target != "process-group":  # `kill -INT <dev>`
            dev.process.send_signal(signal.SIGINT)
        else:  # what a terminal's Ctrl-C does
            os.killpg(dev.process.pid, signal.SIGINT)
        assert dev.process.wait(60) == 0, dev.output
        gone, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, [_describe(p) for p in alive]
        assert "flowpool dev: stopping" in dev.output
        assert not (Path(dev.data_dir.name) / "dev.json").exists()  # the other commands no longer find it
    finally:
        dev.kill()


@pytest.mark.slow
def test_dev_exits_1_when_a_process_it_started_dies_and_stops_the_others() -> None:
    dev = _start_dev()
    try:
        started = dev.descendants()
        [worker] = [p for p in started if "flowpool.cli worker" in _cmdline(p)]
        worker.kill()
        assert dev.process.wait(60) == 1, dev.output
        assert re.search(r"^flowpool dev: .*worker exited \(-9\); stopping$", dev.output, re.M), dev.output
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, [_describe(p) for p in alive]
        assert not (Path(dev.data_dir.name) / "dev.json").exists()
    finally:
        dev.kill()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_dev_on_an_ipv6_loopback_address_serves_and_prints_bracketed_urls() -> None:
    port = free_port("::1")
    dev = Dev(port, {}, args=("--host", "::1"))
    try:
        dev.wait_for_banner()
        assert dev.api_url == f"http://[::1]:{port}"
        assert dev.curl_url == f"http://[::1]:{port}/workflow/chat/completions"
        ready = requests.get(dev.api_url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        dev.stop()
    finally:
        dev.kill()


# A Redis password is never printed.

PASSWORD = "hunter2pw"


def _with_password(port: int) -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{port}/0"


def test_accounts_create_and_doctor_never_print_the_redis_password() -> None:
    url, masked = _with_password(free_port()), "redis://:***@127.0.0.1:"
    made = run_flowpool("accounts", "create", "someone", env=_env(FLOWPOOL_REDIS_URL=url))
    assert made.returncode == 1
    assert f"Redis: {masked}" in made.stderr, made.stderr
    doctored = run_flowpool("doctor", env=_env(FLOWPOOL_REDIS_URL=url,
                                               FLOWPOOL_API_URL=f"http://127.0.0.1:{free_port()}"))
    checks = doctor_checks(doctored)
    assert checks["redis"][1].startswith(masked) and checks["broker"][1].startswith(masked), checks
    assert doctored.returncode == 1
    for result in (made, doctored):
        assert PASSWORD not in result.stdout + result.stderr


def test_dev_on_a_redis_url_that_does_not_answer_never_prints_its_password(tmp_path: Path) -> None:
    url = _with_password(free_port())
    result = run_flowpool("dev", "--port", str(free_port()),
                          env=_env(FLOWPOOL_REDIS_URL=url, FLOWPOOL_DATA_DIR=str(tmp_path)))
    assert result.returncode == 1
    assert "the Redis at FLOWPOOL_REDIS_URL (redis://:***@127.0.0.1:" in result.stderr, result.stderr
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.slow
def test_dev_on_a_redis_with_a_password_masks_it_and_leaves_it_out_of_the_export_line() -> None:
    with RedisServer() as server:
        redis.Redis(port=server.port).config_set("requirepass", PASSWORD)
        dev = _start_dev(FLOWPOOL_REDIS_URL=_with_password(server.port))
        try:
            assert re.search(rf"^  Redis:    redis://:\*\*\*@127\.0\.0\.1:{server.port}/0$", dev.output, re.M), dev.output
            assert f"\n  export FLOWPOOL_API_URL={dev.api_url} FLOWPOOL_API_KEY={dev.key}\n" \
                   "  # FLOWPOOL_REDIS_URL is left out: it holds a password" in dev.output, dev.output
            assert dev.curl().status_code == 404  # the stack works: no echo workflow pushed yet
            dev.stop()
            assert PASSWORD not in dev.output
        finally:
            dev.kill()


@pytest.mark.slow
def test_dev_hands_its_flowpool_settings_to_the_processes_it_starts() -> None:
    dev = _start_dev(FLOWPOOL_MAX_BODY_BYTES=str(16 << 10))
    try:
        response = requests.post(dev.curl_url, headers={"Authorization": f"Bearer {dev.key}"}, timeout=30,
                                 json={**dev.curl_body, "input": {"text": "x" * (32 << 10)}})
        assert response.status_code == 413, response.text
    finally:
        dev.kill()


# Commands against the session's stack.

def test_accounts_create_prints_a_key_that_authenticates(stack: Stack) -> None:
    env = _env(FLOWPOOL_REDIS_URL=stack.redis_url)
    name = f"cli-{os.urandom(4).hex()}"
    first = run_flowpool("accounts", "create", name, env=env)
    key = ok(first).strip()
    assert f"created account {name}" in first.stderr
    second = run_flowpool("accounts", "create", name, env=env)
    other_key = ok(second).strip()
    assert f"new key for account {name}" in second.stderr
    assert key != other_key

    assert stack.api_url is not None
    upload = requests.post(stack.api_url + "/api/v1/workflows/upload", headers={"x-api-key": key}, timeout=30,
                           json={"workflow_ref_name": "mine", "script": "def execute(ctx):\n    return 1\n"})
    assert upload.status_code == 201, upload.text
    listed = requests.get(stack.api_url + "/api/v1/workflows", headers={"x-api-key": other_key}, timeout=30)
    assert listed.status_code == 200, listed.text
    assert [w["workflow_ref_name"] for w in listed.json()["data"]] == ["mine"]
    unknown = requests.get(stack.api_url + "/api/v1/workflows", headers={"x-api-key": key + "x"}, timeout=30)
    assert unknown.status_code == 401


def _doctor(redis_url: str, **settings: str) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit code and ``{check: (ok|BAD, value)}`` of ``flowpool doctor``."""
    # Unless told, an API address that answers nothing: doctor must not reach whatever listens on the default.
    closed = f"http://127.0.0.1:{free_port()}"
    result = run_flowpool("doctor", env=_env(**{"FLOWPOOL_REDIS_URL": redis_url, "FLOWPOOL_API_URL": closed,
                                                **settings}))
    return result.returncode, doctor_checks(result)


def test_doctor_reports_redis_the_workers_and_the_api_of_the_stack(stack: Stack, client: Client) -> None:
    code, checks = _doctor(stack.redis_url, FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key)
    assert checks["redis"] == ("ok", f"{stack.redis_url} (from FLOWPOOL_REDIS_URL)")
    assert checks["redis reachable"] == ("ok", "yes")
    assert checks["redis version"][0] == "ok", checks["redis version"]  # 6.2 or later: admission uses ZADD GT
    status, workers = checks["workers"]
    assert status == "ok" and workers.startswith("flowpool@"), checks["workers"]
    assert checks["sandbox"][0] == "ok"
    # How runs are bounded as a whole, and what the operator has opened up.
    assert checks["run limits"][1].startswith("run limits: ")
    assert checks["worker limits"][1].startswith(workers.split(",")[0] + ": run limits: ")
    assert checks["secret key"][1].startswith("generated and kept in Redis")
    assert checks["provider keys"] == ("ok", "none: accounts pass keys as request secrets")
    assert checks["metrics"] == ("ok", "public (FLOWPOOL_METRICS_TOKEN unset)")
    assert checks["api"][0] == "ok" and checks["api"][1].startswith(f"{client.base_url} (from FLOWPOOL_API_URL): ready")
    assert checks["api key"] == ("ok", "accepted (from FLOWPOOL_API_KEY)")
    # The session's Redis keeps nothing (a warning on stderr), and does not evict.
    assert checks["redis data"] == ("ok", "nothing; maxmemory-policy noeviction")
    assert code == 0, checks


def test_doctor_reports_unreachable_redis_and_fails() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, checks = _doctor(url)
    assert checks["redis"] == ("ok", f"{url} (from FLOWPOOL_REDIS_URL)")
    assert checks["redis reachable"][0] == "BAD"
    assert "workers" not in checks
    assert code == 1


def test_doctor_reports_a_worker_that_published_no_weaknesses_without_a_traceback(
        redis_server: RedisServer, redis_db: redis.Redis) -> None:
    # What a worker of another version may publish: its backend and isolation, no "weaknesses" field.
    redis_db.zadd(keys.WORKERS, {"flowpool@elsewhere": time.time() + 60})
    redis_db.hset(keys.WORKER_SANDBOXES, "flowpool@elsewhere", json.dumps({"backend": "bwrap", "isolation": "full"}))
    code, checks = _doctor(f"redis://127.0.0.1:{redis_server.port}/15")
    assert checks["workers"] == ("ok", "flowpool@elsewhere")
    assert checks["worker sandbox"] == ("ok", "flowpool@elsewhere: bwrap; full")


def test_doctor_reports_no_worker_answering_and_fails(redis_server: RedisServer, redis_db: redis.Redis) -> None:
    code, checks = _doctor(f"redis://127.0.0.1:{redis_server.port}/15")
    assert checks["redis reachable"] == ("ok", "yes")
    assert checks["workers"][0] == "BAD" and checks["workers"][1].startswith("none answering: start one with"), \
        checks["workers"]
    assert code == 1


def test_doctor_checks_the_blob_store_and_the_cache_directory(redis_server: RedisServer, s3_server: dict[str, Any],
                                                             tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/15"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a cache others may write in: workers refuse it
    s3 = {"FLOWPOOL_BLOB_ENDPOINT_URL": s3_server["endpoint_url"], **s3_server["env"]}

    _, good = _doctor(url, FLOWPOOL_BLOB_URL=f"s3://{s3_server['bucket']}/p", FLOWPOOL_CACHE_DIR=str(tmp_path / "c"),
                      **s3)
    code, bad = _doctor(url, FLOWPOOL_BLOB_URL="s3://no-such-bucket/p", FLOWPOOL_CACHE_DIR=str(shared), **s3)
    _, default = _doctor(url)

    assert good["blob store"][0] == "ok" and good["blob store"][1].startswith(f"s3://{s3_server['bucket']}/p")
    assert good["cache dir"] == ("ok", f"{tmp_path / 'c'} (made on first use)")
    assert bad["blob store"][0] == "BAD" and "no-such-bucket" in bad["blob store"][1], bad["blob store"]
    assert bad["cache dir"][0] == "BAD" and "FLOWPOOL_CACHE_DIR" in bad["cache dir"][1], bad["cache dir"]
    assert code == 1
    assert default["blob store"] == ("ok", "redis (db 15 of the registry) (FLOWPOOL_BLOB_URL unset)")


# An API whose answer breaks off, or is not flowpool's: one Error line, never a traceback.

def test_a_command_whose_api_answer_breaks_off_mid_body_ends_in_one_error_line() -> None:
    cut_off = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
               b"Connection: close\r\n\r\n{\"data\": [")
    with CannedHTTPServer(cut_off) as server:
        result = run_flowpool("runs", "anything", env=_env(FLOWPOOL_API_URL=server.url, FLOWPOOL_API_KEY="fp_test"))
    assert result.returncode == 1
    assert re.fullmatch(r"Error: the API gave no whole answer: \w+: .+\n", result.stderr), result.stderr


def test_invoke_stream_prints_each_chunk_then_the_output(client: Client) -> None:
    client.upload("steps", "def execute(ctx):\n    for i in range(3):\n        ctx.emit('step', i)\n    return {'n': 3}\n")
    env = _env(FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key)
    result = run_flowpool("invoke", "steps", "--input", "{}", "--stream", env=env)
    lines = ok(result).strip().splitlines()
    assert [json.loads(line) for line in lines[:3]] == [{"type": "step", "content": i} for i in range(3)]
    assert json.loads("\n".join(lines[3:])) == {"n": 3}


# flowpool validate: the rules of an upload, checked offline.

BROKEN_SCRIPT = ('OUTPUT_SCHEMA = {"a": {"type": "float"}}\n\n'
                 "async def execute(ctx: WorkflowContext):\n    return\n")


def _offline_env() -> dict[str, str]:
    """An environment whose API address answers nothing: validate must not need it."""
    return _env(FLOWPOOL_API_URL=f"http://127.0.0.1:{free_port()}")


def test_validate_prints_ok_for_a_good_script_and_exits_0() -> None:
    assert ok(run_flowpool("validate", "examples/echo.py", env=_offline_env())) == "examples/echo.py: ok\n"


def test_validate_prints_each_problem_as_file_line_message_like_the_api_and_exits_1(
        client: Client, tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text(BROKEN_SCRIPT)
    result = run_flowpool("validate", str(script), env=_offline_env())
    assert result.returncode == 1, result.stderr
    response = client.post("/api/v1/workflows/validate", json={"code": BROKEN_SCRIPT})
    assert response.status_code == 200, response.text
    errors = response.json()["data"]["errors"]
    assert {1, 3, 4} <= {error["line"] for error in errors}, errors
    assert result.stdout.splitlines() == [f"{script}:{error['line']}: {error['message']}" for error in errors]


def test_validate_names_the_line_of_a_syntax_error(tmp_path: Path) -> None:
    script = tmp_path / "unclosed.py"
    script.write_text("import json\n\ndef execute(ctx):\n    return {'a': 1\n")
    result = run_flowpool("validate", str(script), env=_offline_env())
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(rf"{re.escape(str(script))}:4: .+\n", result.stdout), result.stdout


def test_validate_refuses_a_file_that_is_not_utf8_in_one_line(tmp_path: Path) -> None:
    script = tmp_path / "latin1.py"
    script.write_bytes("def execute(ctx):\n    return 'café'\n".encode("latin-1"))
    result = run_flowpool("validate", str(script), env=_offline_env())
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.fullmatch(rf"Error: {re.escape(str(script))} is not UTF-8 text: .+\n", result.stderr), result.stderr


# Server commands where a server dependency is missing. test_install.py runs them on a
# real client-only install; here one import is made to fail in this environment.

_WITHOUT_MODULE = """\
import sys
sys.modules[sys.argv[1]] = None  # importing it now fails as if it were not installed
from flowpool.cli import main
main(sys.argv[2:], prog_name="flowpool")
"""


def _cli_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``flowpool ARGS`` in a process where ``module`` cannot be imported."""
    return subprocess.run([sys.executable, "-c", _WITHOUT_MODULE, module, *args], env=_env(), cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.parametrize("module, command, argv", [
    ("redis", "dev", "dev"), ("gunicorn", "api", "api"), ("celery", "worker", "worker"),
    ("redis", "doctor", "doctor"), ("redis", "accounts create", "accounts create someone"),
    ("redis", "accounts limits", "accounts limits someone"),
    ("redis", "accounts webhook-secret", "accounts webhook-secret someone"),
])
def test_a_server_command_missing_a_server_dependency_prints_what_to_install_and_fails(
        module: str, command: str, argv: str) -> None:
    result = _cli_without(module, *argv.split())
    assert result.returncode == 1
    assert result.stderr == f"Error: flowpool {command} needs the server extra: pip install 'flowpool[server]'\n"


def test_a_server_command_missing_one_of_its_own_modules_shows_the_traceback() -> None:
    result = _cli_without("flowpool.keys", "doctor")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ModuleNotFoundError" in result.stderr, result.stderr
    assert "server extra" not in result.stderr
