"""The local inner loop, run as a user runs it (real subprocesses): ``flowpool init`` writes a starter and its
test, ``flowpool run FILE`` runs a file once, on the session's stack or on a temporary stack it starts itself."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import redis

from flowpool import keys
from flowpool.procs import free_port
from tests.helpers import FAILING_WORKFLOW, Client, account_id, eventually, run_flowpool

STARTER_INPUT = '{"text": "hello flowpool"}'

# Says it started, then runs until it is stopped (a time limit of its own that no test waits for).
SLOW = """\
import time

TIMEOUT_SECONDS = 300


def execute(ctx):
    ctx.emit("started", 1)
    time.sleep(290)
    return {}
"""

SHOWS_SECRET = """\
def execute(ctx):
    ctx.emit("step", "one")
    ctx.emit("step", "two")
    return {"token": ctx.secrets["TOKEN"], "text": ctx.input["text"]}
"""


def _bare_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without FLOWPOOL_* variables and with its own HOME: no dev, no API to find."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWPOOL_")}
    env.update(HOME=str(home), FLOWPOOL_LOG_LEVEL="WARNING", **extra)
    return env


def _stack_env(client: Client, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user pointed at the session's stack as ``client``'s account."""
    return _bare_env(home, FLOWPOOL_API_URL=client.base_url, FLOWPOOL_API_KEY=client.key, **extra)


def _marked(mark: str) -> list[psutil.Process]:
    """The live processes whose environment carries ``mark`` (what a command started inherits it)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("FP_RUN_TEST_MARK") == mark and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # gone, or another user's
            continue
    return found


def _left_in(tmp: Path) -> list[str]:
    """What a stack left in its TMPDIR: nothing but the uid lock files every worker of a machine shares (kept by
    design, sandbox/sandbox.py); a stack killed rather than stopped leaves its runtime and sandbox directories."""
    return sorted(p.name for p in tmp.iterdir() if p.name != "flowpool-uid-blocks")


def _output(stdout: str) -> object:
    """The output a run printed last (pretty JSON after any chunk lines)."""
    start = stdout.index("{\n") if "{\n" in stdout else stdout.rindex("{")
    return json.loads(stdout[start:])


def test_init_then_run_in_a_fresh_directory_starts_a_stack_and_leaves_no_process_behind(tmp_path: Path) -> None:
    mark, tmp = uuid.uuid4().hex, tmp_path / "tmp"
    tmp.mkdir()
    env = _bare_env(tmp_path, FP_RUN_TEST_MARK=mark, TMPDIR=str(tmp))

    made = run_flowpool("init", "greeter", cwd=tmp_path, env=env, timeout=30)
    assert made.returncode == 0, made.stderr
    assert "flowpool run greeter/workflow.py" in made.stdout and "pytest greeter/" in made.stdout
    ran = run_flowpool("run", "greeter/workflow.py", "--input", STARTER_INPUT, cwd=tmp_path, env=env, timeout=120)

    assert ran.returncode == 0, f"stdout: {ran.stdout}\nstderr: {ran.stderr}"
    assert "starting a temporary stack" in ran.stderr
    assert _output(ran.stdout) == {"shout": "HELLO FLOWPOOL", "words": 2}
    assert _marked(mark) == []
    assert _left_in(tmp) == []
    assert sorted(p.name for p in (tmp_path / "greeter").iterdir()) == ["test_workflow.py", "workflow.py"]


def _start_run(tmp_path: Path, env: dict[str, str], *options: str) -> subprocess.Popen[str]:
    """``flowpool run`` of :data:`SLOW` with OPTIONS, started as a terminal starts a command: the leader of its own
    process group, the group a Ctrl-C sends SIGINT to."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    return subprocess.Popen([sys.executable, "-I", "-m", "flowpool.cli", "run", str(script), "--input", "{}",
                             *options], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def _ended(command: subprocess.Popen[str]) -> tuple[int, str]:
    """The exit status and stderr of ``command``, once it ends (killed, with its group, if it does not)."""
    try:
        status = command.wait(60)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait(10)
    assert command.stdout is not None and command.stderr is not None
    command.stdout.close()
    stderr = command.stderr.read()
    command.stderr.close()
    return status, stderr


def _stopping(mark: str, running: set[int]) -> bool:
    """Whether the temporary stack is stopping: one of the processes ``running`` when it ran (its API, stopped
    with its worker but sooner) is gone."""
    return not running <= {process.pid for process in _marked(mark)}


@pytest.mark.parametrize("interrupt", ["sigterm", "ctrl-c", "ctrl-c-twice"])
def test_an_interrupted_run_stops_its_temporary_stack_and_leaves_nothing_behind(tmp_path: Path,
                                                                                interrupt: str) -> None:
    mark, tmp = uuid.uuid4().hex, tmp_path / "tmp"
    tmp.mkdir()
    command = _start_run(tmp_path, _bare_env(tmp_path, FP_RUN_TEST_MARK=mark, TMPDIR=str(tmp)), "--stream")
    try:
        assert command.stdout is not None
        first = command.stdout.readline()  # the run's first chunk: the stack is up and the run going
        assert first, command.stderr.read()  # type: ignore[union-attr]  # it ended: why
        assert json.loads(first) == {"type": "started", "content": 1}
        running = {process.pid for process in _marked(mark)}
        if interrupt == "sigterm":
            command.terminate()
        else:
            # A terminal's Ctrl-C: SIGINT to the whole foreground group, the stack's processes included unless they
            # were started out of it. A worker that got it stopped too late and was killed, leaving its directory.
            os.killpg(command.pid, signal.SIGINT)
        if interrupt == "ctrl-c-twice":
            # The second, impatient Ctrl-C, while the stack stops: it must not break the stop off half done.
            eventually(lambda: _stopping(mark, running), timeout=60, what="the temporary stack stopping")
            os.killpg(command.pid, signal.SIGINT)
    finally:
        status, stderr = _ended(command)
    assert status == 1 and stderr.endswith("Aborted!\n"), stderr
    _, still = psutil.wait_procs(_marked(mark), timeout=10)
    assert still == []
    assert _left_in(tmp) == []  # stopped, not killed: no runtime, sandbox or Redis directory left


_INTERRUPTED_TWICE = """\
import os, signal
from flowpool.procs import interrupt_once

for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, interrupt_once)
try:
    os.kill(os.getpid(), signal.SIGINT)
    signal.pause()  # the handler runs before: a signal sent to this (single-threaded) process is delivered at once
except KeyboardInterrupt:
    # Where `flowpool run` (and `flowpool dev`) unwind to the stop of their stack: later signals are ignored.
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    print("stopped once")
"""


def test_the_first_interrupt_raises_keyboard_interrupt_and_later_ones_are_ignored_from_then_on() -> None:
    # The handler `flowpool run` and `flowpool dev` install: a second Ctrl-C cannot break off the stop that the first
    # began, even before the stop itself ignores signals.
    ran = subprocess.run([sys.executable, "-c", _INTERRUPTED_TWICE], capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, "stopped once\n"), ran.stderr


def test_interrupting_a_run_on_a_running_stack_cancels_the_run(client: Client, stack_db: redis.Redis,
                                                               tmp_path: Path) -> None:
    account = account_id(stack_db, client)
    # Without --stream: the command streams all the same, so that its interruption drops the connection.
    command = _start_run(tmp_path, _stack_env(client, tmp_path))
    try:
        runs_key = eventually(lambda: next(stack_db.scan_iter(keys.workflow_runs(account, "fp-preview-*")), None),
                              timeout=60, what="the preview stored")
        request_id = eventually(lambda: stack_db.zrange(runs_key, 0, -1), timeout=60, what="its run")[0].decode()
        eventually(lambda: client.run(request_id)["status"] == "running", timeout=60, what="the run going")
        os.killpg(command.pid, signal.SIGINT)  # Ctrl-C
    finally:
        status, stderr = _ended(command)
    assert status == 1 and stderr.endswith("Aborted!\n"), stderr
    ended = eventually(lambda: client.run(request_id)["status"] not in ("queued", "running"), timeout=60,
                       what="the run ending")
    assert ended and client.run(request_id)["status"] == "cancelled"


def test_run_on_a_running_stack_starts_none_and_hands_the_secret_to_the_script(client: Client, tmp_path: Path) -> None:
    script = tmp_path / "shows.py"
    script.write_text(SHOWS_SECRET)

    ran = run_flowpool("run", str(script), "--input", '{"text": "hi"}', "--secret", "TOKEN", cwd=tmp_path,
                       env=_stack_env(client, tmp_path, TOKEN="from-the-shell"), timeout=60)

    assert ran.returncode == 0, ran.stderr
    assert "temporary stack" not in ran.stderr
    assert _output(ran.stdout) == {"token": "from-the-shell", "text": "hi"}
    listed = client.get("/api/v1/workflows").json()
    assert listed["pagination"]["total"] == 0  # run, not uploaded


def test_run_stream_prints_each_chunk_as_a_json_line_then_the_output(client: Client, tmp_path: Path) -> None:
    script = tmp_path / "shows.py"
    script.write_text(SHOWS_SECRET)

    ran = run_flowpool("run", str(script), "--input", '{"text": "hi"}', "--secret", "TOKEN=t", "--stream",
                       cwd=tmp_path, env=_stack_env(client, tmp_path), timeout=60)

    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert [json.loads(line) for line in lines[:2]] == [{"type": "step", "content": "one"},
                                                        {"type": "step", "content": "two"}]
    assert json.loads("\n".join(lines[2:])) == {"token": "t", "text": "hi"}


def test_run_json_prints_the_whole_completion(client: Client, tmp_path: Path) -> None:
    script = tmp_path / "shows.py"
    script.write_text(SHOWS_SECRET)

    ran = run_flowpool("run", str(script), "--input", '{"text": "hi"}', "--secret", "TOKEN=t", "--json",
                       cwd=tmp_path, env=_stack_env(client, tmp_path), timeout=60)

    assert ran.returncode == 0, ran.stderr
    completion = json.loads(ran.stdout)
    assert completion["object"] == "chat.completion" and completion["output"] == {"token": "t", "text": "hi"}
    assert completion["model"].startswith("workflow:fp-preview-")
    # The object a plain (unstreamed) preview answers, though `run` streams: no stream-only keys (a choice's delta).
    plain = client.request("POST", "/api/v1/workflows/preview",
                           json={"script": SHOWS_SECRET, "input": {"text": "hi"}, "secrets": {"TOKEN": "t"}}).json()
    assert plain["object"] == "chat.completion"
    assert sorted(completion) == sorted(plain)
    assert completion["choices"] == plain["choices"]


def test_a_failing_run_exits_1_with_its_error_and_the_scripts_traceback(client: Client, tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text(FAILING_WORKFLOW)

    ran = run_flowpool("run", str(script), "--input", "{}", cwd=tmp_path, env=_stack_env(client, tmp_path),
                       timeout=60)

    assert ran.returncode == 1
    assert "Traceback (most recent call last)" in ran.stdout and "ZeroDivisionError" in ran.stdout
    assert "in divide" in ran.stdout
    # The traceback names the file run, at the lines of FAILING_WORKFLOW (divide's body is line 2, its call 8).
    assert f'File "{script}", line 2, in divide' in ran.stdout and f'File "{script}", line 8, in execute' in ran.stdout
    assert "fp-preview-" not in ran.stdout
    assert ran.stderr.startswith("Error: 500 script_error: ZeroDivisionError")
    assert "see: flowpool logs req_" in ran.stderr


def test_a_script_with_a_syntax_error_is_refused_locally_with_its_line(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("def execute(ctx):\n    x = 1\n    return {'x': x\n")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request sent would fail otherwise

    ran = run_flowpool("run", str(script), "--input", "{}", cwd=tmp_path,
                       env=_bare_env(tmp_path, FLOWPOOL_API_URL=closed, FLOWPOOL_API_KEY="fp_unused"), timeout=30)

    assert ran.returncode == 1
    assert ran.stdout.startswith(f"{script}:3: ")
    assert "cannot reach" not in ran.stdout + ran.stderr


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "workflow.py").write_text("# my own work\n")

    made = run_flowpool("init", "mine", cwd=tmp_path, env=_bare_env(tmp_path), timeout=30)

    assert made.returncode == 1
    assert "mine/workflow.py already exists" in made.stderr and "nothing was written" in made.stderr
    assert (tmp_path / "mine" / "workflow.py").read_text() == "# my own work\n"
    assert not (tmp_path / "mine" / "test_workflow.py").exists()


def test_init_refuses_a_name_that_is_no_workflow_ref_name(tmp_path: Path) -> None:
    made = run_flowpool("init", "bad name!", cwd=tmp_path, env=_bare_env(tmp_path), timeout=30)

    assert made.returncode == 2 and "not a workflow ref name" in made.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_test_init_writes_passes_under_pytest(client: Client, tmp_path: Path) -> None:
    assert run_flowpool("init", "starter", cwd=tmp_path, env=_bare_env(tmp_path), timeout=30).returncode == 0

    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "starter/"],
                            cwd=tmp_path, env=_stack_env(client, tmp_path), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)

    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed" in tested.stdout
    runs = client.get("/api/v1/workflows").json()
    assert runs["pagination"]["total"] == 0


def test_run_bundles_each_accessory_file_and_refuses_one_that_is_not_key_equals_file(client: Client,
                                                                                      tmp_path: Path) -> None:
    script = tmp_path / "reads.py"
    script.write_text("def execute(ctx):\n    return ctx.load_accessory('codes')\n")
    (tmp_path / "codes.json").write_text('{"a": 1}')

    ran = run_flowpool("run", str(script), "--input", "{}", "--accessory", f"codes={tmp_path / 'codes.json'}",
                       "--json", cwd=tmp_path, env=_stack_env(client, tmp_path), timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["output"] == {"a": 1}

    refused = run_flowpool("run", str(script), "--input", "{}", "--accessory", "codes.json",
                           cwd=tmp_path, env=_stack_env(client, tmp_path), timeout=60)
    assert refused.returncode == 2 and "is not KEY=FILE" in refused.stderr
