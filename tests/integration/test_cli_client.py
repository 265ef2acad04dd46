"""The client commands' output, run as a user runs them (real subprocesses) against the session's stack:
``invoke``'s flags and failures, ``logs`` with tracebacks and ``--follow``, the ``runs`` table."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from tests.helpers import ECHO_WORKFLOW, FAILING_WORKFLOW, SLEEPING_WORKFLOW, Client, eventually
from tests.provider import StandInProvider

REPO = Path(__file__).resolve().parents[2]

# What reached the script, the secret as its hash only: the test knows the secret, the script does not.
SHOWS_REQUEST = """\
import hashlib


def execute(ctx):
    digest = hashlib.sha256(ctx.secrets["TOKEN"].encode()).hexdigest()
    ctx.log.info("secret", sha256=digest)
    return {"secret_sha256": digest, "metadata": ctx.metadata, "session_id": ctx.session_id,
            "text": ctx.input["text"]}
"""

HOLDS = """\
def execute(ctx):
    ctx.emit("tick", 0)
    ctx.log.info("waiting at the gate")
    ctx.http.get("{origin}/hold/{gate}")
    ctx.emit("tick", 1)
    return {{"ticks": 2}}
"""

RUN_ROW = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  (req_\w+) +(\w+) +(\d+ms|\d+\.\d\ds) +(hit|miss) +(\S+)")
ERROR_LINE = r"Error: {status} {type}: {message} \(request_id (req_\w+); see: flowpool logs \1\)\n"


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _env(client: Client, **settings: str) -> dict[str, str]:
    """This process's environment without FLOWPOOL_* variables, pointed at the stack as ``client``'s account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key, **settings)
    return env


def _flowpool(client: Client, *args: str, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run ``flowpool ARGS`` to its end as ``client``'s account."""
    return subprocess.run([sys.executable, "-m", "flowpool.cli", *args], env=_env(client, **settings), cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def _runs(client: Client, ref: str) -> list[dict[str, object]]:
    response = client.get(f"/api/v1/workflows/{ref}/runs")
    assert response.status_code == 200, response.text
    return response.json()["data"]


# invoke

def test_invoke_hands_secret_metadata_and_session_id_to_the_run_and_never_prints_the_secret(client: Client) -> None:
    ref, secret = _ref("shows"), f"s3cr3t-{uuid.uuid4().hex}"
    client.upload(ref, SHOWS_REQUEST)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    result = _flowpool(client, "invoke", ref, "--input", '{"text": "hi"}', "--secret", f"TOKEN={secret}",
                       "--secret", "OTHER=x", "--metadata", '{"team": "search", "n": 1}', "--session-id", "sess-cli-1")
    assert json.loads(_ok(result)) == {"secret_sha256": digest, "metadata": {"team": "search", "n": 1},
                                       "session_id": "sess-cli-1", "text": "hi"}
    assert secret not in result.stdout + result.stderr

    (summary,) = _runs(client, ref)
    run = client.run(str(summary["request_id"]))
    assert (run["session_id"], run["metadata"]) == ("sess-cli-1", {"team": "search", "n": 1})
    assert run["logs"][0]["fields"] == {"sha256": digest}
    assert secret not in json.dumps(run)  # kept nowhere on the run


def test_invoke_secret_key_alone_takes_the_value_of_that_environment_variable(client: Client) -> None:
    ref, secret = _ref("shows"), f"s3cr3t-{uuid.uuid4().hex}"
    client.upload(ref, SHOWS_REQUEST)
    # The value is on no command line: only in the environment of the shell that runs flowpool.
    result = _flowpool(client, "invoke", ref, "--input", '{"text": "hi"}', "--secret", "TOKEN", TOKEN=secret)
    assert json.loads(_ok(result))["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in result.stdout + result.stderr


def test_invoke_secret_naming_an_unset_environment_variable_fails_without_showing_the_name(client: Client) -> None:
    # A value typed without its KEY= (ghp_..., sk_live_...) looks like a variable's name: it is not echoed.
    value_like = f"ghp_{uuid.uuid4().hex}"
    result = _flowpool(client, "invoke", "any", "--input", "{}", "--secret", "A=1", "--secret", value_like)
    assert result.returncode == 2
    assert "the 2nd --secret, without '=', names an environment variable to take the value from, and none of " \
           "that name is set" in result.stderr, result.stderr
    assert value_like not in result.stderr


def test_invoke_refuses_a_malformed_secret_or_metadata_without_showing_them(client: Client) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    bad_secret = _flowpool(client, "invoke", "any", "--input", "{}", "--secret", "A=1", "--secret", secret)
    assert bad_secret.returncode == 2
    assert "the 2nd --secret is neither KEY=VALUE nor the name of an environment variable" in bad_secret.stderr
    assert secret not in bad_secret.stderr
    not_an_object = _flowpool(client, "invoke", "any", "--input", "{}", "--metadata", "[1, 2]")
    assert not_an_object.returncode == 2 and "--metadata: must be a JSON object" in not_an_object.stderr


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_invoke_of_a_failing_workflow_prints_the_request_id_of_its_run_and_fails(client: Client, stream: bool) -> None:
    ref = _ref("fails")
    client.upload(ref, FAILING_WORKFLOW)
    result = _flowpool(client, "invoke", ref, "--input", "{}", *(["--stream"] if stream else []))
    assert result.returncode == 1
    if stream:  # the chunk came before the error
        assert result.stdout == '{"type": "step", "content": 1}\n'
    expected = ERROR_LINE.format(status=500, type="script_error", message="ZeroDivisionError: division by zero")
    line = re.fullmatch(expected, result.stderr)
    assert line, result.stderr
    run = client.run(line.group(1))  # a real run, the one that failed
    assert (run["workflow"], run["status"]) == (ref, "failed")


def test_invoke_of_a_workflow_past_its_time_limit_prints_the_request_id_and_fails(client: Client) -> None:
    ref = _ref("sleeps")
    client.upload(ref, SLEEPING_WORKFLOW)
    result = _flowpool(client, "invoke", ref, "--input", "{}")
    assert result.returncode == 1
    line = re.fullmatch(ERROR_LINE.format(status=408, type="timeout", message=".*time limit.*"), result.stderr)
    assert line, result.stderr
    assert client.run(line.group(1))["status"] == "timed_out"


# logs

TRACEBACK_END = ('  File "workflow:{ref}", line 2, in divide\n'
                 "    return 1 / x\n"
                 "           ~~^~~\n"
                 "ZeroDivisionError: division by zero\n")


def test_logs_of_a_failed_run_prints_its_log_lines_then_its_error_and_traceback(client: Client) -> None:
    ref = _ref("fails")
    client.upload(ref, FAILING_WORKFLOW)
    request_id = client.invoke(ref).headers["X-Request-Id"]
    out = _ok(_flowpool(client, "logs", request_id))
    lines = out.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO    dividing by=0", lines[0]), out
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR   run failed: ZeroDivisionError: division by zero", lines[1]), out
    assert lines[2] == "Traceback (most recent call last):"
    assert out.endswith(TRACEBACK_END.format(ref=ref)), out

    # --follow of a run that has ended prints its chunks too, at once.
    followed = _flowpool(client, "logs", "--follow", request_id)
    assert _ok(followed) == "--:--:-- CHUNK   step 1\n" + out
    assert followed.stderr == f"run {request_id} failed in {followed.stderr.split()[-1]}\n"


def test_logs_follow_prints_a_running_runs_chunks_and_log_lines_as_they_come_and_ends_with_the_run(
        client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("holds"), uuid.uuid4().hex
    client.upload(ref, HOLDS.format(origin=provider.origin, gate=gate))
    answers: list[requests.Response] = []
    caller = threading.Thread(target=lambda: answers.append(client.invoke(ref, cache=False)))
    caller.start()
    follower = None
    try:
        eventually(lambda: provider.held(gate) == 1, timeout=30, what="the run waits at the gate")
        (run,) = _runs(client, ref)
        follower = subprocess.Popen([sys.executable, "-m", "flowpool.cli", "logs", "--follow", str(run["request_id"])],
                                    env=_env(client), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        assert follower.stdout is not None
        first, second = follower.stdout.readline(), follower.stdout.readline()
        # Printed while the run still waits at the gate: as they came, in order, not at the end.
        assert re.fullmatch(r"\d\d:\d\d:\d\d CHUNK   tick 0\n", first), first
        assert re.fullmatch(r"\d\d:\d\d:\d\d INFO    waiting at the gate\n", second), second
        assert provider.held(gate) == 1 and follower.poll() is None
        provider.open_gate(gate)
        rest, errors = follower.communicate(timeout=60)
    finally:
        provider.open_gate(gate)
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        caller.join(60)
    assert follower.returncode == 0, errors
    assert re.fullmatch(r"\d\d:\d\d:\d\d CHUNK   tick 1\n", rest), rest  # the log line is not printed twice
    assert errors.startswith(f"following run {run['request_id']} of {ref} (running)")
    assert errors.splitlines()[-1].startswith(f"run {run['request_id']} succeeded in ")
    assert [a.status_code for a in answers] == [200]


# runs

def test_runs_prints_a_table_with_a_header_and_local_times_newest_first_up_to_limit(client: Client) -> None:
    ref = _ref("echo")
    client.upload(ref, ECHO_WORKFLOW)
    for text in ("one", "two", "two"):  # the second "two" is a cache hit
        assert client.invoke(ref, input={"text": text}).status_code == 200
    records = _runs(client, ref)
    assert len(records) == 3
    # A zone five and a half hours east of UTC, set for the command alone: its times are shown in it.
    zone = timezone(timedelta(hours=5, minutes=30))
    out = _ok(_flowpool(client, "runs", ref, TZ="<+0530>-5:30"))
    header, *rows = out.splitlines()
    assert header.split() == ["TIME", "REQUEST_ID", "STATUS", "DURATION", "CACHE", "VERSION"]
    assert len(rows) == 3
    for row, record in zip(rows, records):
        match = RUN_ROW.fullmatch(row)
        assert match, row
        assert match.group(1) == datetime.fromtimestamp(float(record["queued_at"]), zone).strftime("%Y-%m-%d %H:%M:%S")
        assert match.group(2, 3, 6) == (record["request_id"], "succeeded", record["version"])
    assert [RUN_ROW.fullmatch(row).group(5) for row in rows] == ["hit", "miss", "miss"]  # type: ignore[union-attr]

    limited = _ok(_flowpool(client, "runs", ref, "--limit", "2")).splitlines()
    assert limited[0] == header
    shown = [RUN_ROW.fullmatch(row).group(2) for row in limited[1:]]  # type: ignore[union-attr]
    assert shown == [r["request_id"] for r in records[:2]]


def test_runs_of_a_workflow_without_runs_says_how_to_invoke_it_and_of_an_unknown_one_fails(client: Client) -> None:
    ref = _ref("idle")
    client.upload(ref, ECHO_WORKFLOW)
    result = _flowpool(client, "runs", ref)
    assert _ok(result) == ""
    assert result.stderr == f"no runs of {ref} yet; invoke it with: flowpool invoke {ref} --input '{{...}}'\n"

    unknown = _flowpool(client, "runs", _ref("nowhere"))
    assert unknown.returncode == 1 and unknown.stderr.startswith("Error: 404 ")
    assert "request_id" not in unknown.stderr  # no run to name
