"""Tests of flowpool.sandbox.Sandbox with real processes: results, ctx, limits, isolation and clean-up.

One sandbox serves the module (its zygote outlives each test), started as
root so each run slot has a uid of its own, without processes started ahead
of need so that after a run nothing at all may be left under its uids. The
few tests that need another shape (a prestarted slot, a zygote that dies)
start their own sandbox and stop it.
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import queue
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from flowpool.errors import ResultTooLarge, SandboxError, ScriptError, TimeLimitExceeded
from flowpool.sandbox import RunOutcome, Sandbox, SandboxLimits, Zygote
from flowpool.sandbox.run_process import RunProcess
from tests.helpers import compiled, fail_on_leftovers, running, sandbox_backends

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs get uids of their own only as root")

T = TypeVar("T")

LIMITS = SandboxLimits(
    memory_bytes=256 << 20,
    processes=16,
    open_files=64,
    file_bytes=1 << 20,
    tmp_bytes=8 << 20,
    max_result_bytes=64 << 10,
    max_log_bytes=64 << 10,
    max_chunks=20,
    max_chunk_bytes=4 << 10,
)
SLOTS = 8
HARD_GRACE = 1.0
# Not the workers' default (61000): other flowpool workers on this host (the
# integration tier's, a dev stack) claim blocks from there, and a run killed by
# a stray sweep of the same uid would fail a test here for no fault of ours.
UID_BASE = 111000
# Set in the worker's environment while the sandbox starts: no run may see it.
WORKER_SECRET_NAME = "FLOWPOOL_TEST_WORKER_SECRET"
WORKER_SECRET = "worker-only-7d1f0c"
ZYGOTE_MODULE = "flowpool.sandbox.zygote"


# Helpers


def eventually(probe: Callable[[], T], timeout: float = 5.0) -> T:
    """Poll ``probe`` until it returns something falsy or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if not answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def live_processes(uids: Iterable[int]) -> list[psutil.Process]:
    """Processes running (not zombies) under one of ``uids``."""
    wanted = set(uids)
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        ids = proc.info["uids"]
        if ids is not None and ids.real in wanted and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _pid_running(pid: int) -> bool:
    try:
        return running(psutil.Process(pid))
    except psutil.Error:
        return False


def zygotes() -> set[int]:
    """Pids of the sandbox zygotes this test session runs (the processes they fork share their command line)."""
    found = set()
    for proc in psutil.Process().children():
        try:
            if ZYGOTE_MODULE in proc.cmdline():
                found.add(proc.pid)
        except psutil.Error:
            pass
    return found


def zygotes_of(sandbox: Sandbox) -> list[int]:
    """The pid of ``sandbox``'s zygote process (the interpreter, not a bwrap in front of it)."""
    return [sandbox.isolation["pid"]]


def run(sandbox: Sandbox, source: str, job: dict[str, Any] | None = None, soft_seconds: float = 10.0,
        on_emit: Callable[[str, Any], None] | None = None) -> RunOutcome:
    return sandbox.run(compiled(source), job or {}, soft_seconds, on_emit=on_emit)


def assert_serves_next_run(sandbox: Sandbox) -> None:
    outcome = run(sandbox, "def execute(ctx):\n    return {'still': 'here'}\n")
    assert outcome.ok, outcome.error
    assert outcome.result == {"still": "here"}


# Fixtures


@pytest.fixture(scope="module", params=sandbox_backends())
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """The module's sandbox on each backend, started from a worker environment holding a secret no run may see."""
    box = Sandbox(LIMITS, slots=SLOTS, uid_base=UID_BASE, hard_grace_seconds=HARD_GRACE, prestart=0,
                  backend=request.param)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORKER_SECRET_NAME, WORKER_SECRET)
        box.start()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(autouse=True)
def _no_leaked_processes(sandbox: Sandbox) -> Iterator[None]:
    """Fail a test that leaves processes behind (this module's version of the conftest check).

    The module's zygote outlives the tests and forks a spare process (as root)
    after each run, so new root processes under a zygote are expected. Nothing
    may run under the sandbox's uids once its cleanup thread has caught up, and
    nothing else the test started may outlive it.
    """
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    assert sandbox.uid_range is not None
    stragglers = eventually(lambda: live_processes(sandbox.uid_range))
    if stragglers:
        described = [(p.pid, p.info["uids"].real) for p in stragglers]
        for proc in stragglers:
            proc.kill()
        pytest.fail(f"processes left under the sandbox's uids: {described}")
    kept: set[int] = set()
    for pid in before:  # every zygote that ran before the test (its spares), this module's or not, direct child or not
        try:
            zygote = psutil.Process(pid)
            if ZYGOTE_MODULE in zygote.cmdline():
                kept |= {pid} | {p.pid for p in zygote.children(recursive=True)}
        except psutil.Error:
            pass
    fail_on_leftovers([p for p in me.children(recursive=True)
                       if p.pid not in before and p.pid not in kept and running(p) and not _forked_by_a_zygote(p)],
                      lambda p: p.pid)


def _forked_by_a_zygote(proc: psutil.Process) -> bool:
    """Whether ``proc`` is a zygote's fork (a spare, a run's init): the zygote's to reap, whichever sandbox it
    serves; a run left under the sandbox's uids is caught above, and a zygote a test started and left is not this."""
    try:
        return ZYGOTE_MODULE in psutil.Process(proc.ppid()).cmdline()
    except psutil.Error:
        return True  # its parent is gone: it was reparented to be reaped, or is gone itself


# Results and ctx


def test_run_returns_the_result_and_sees_every_ctx_field(sandbox: Sandbox) -> None:
    job = {
        "input": {"query": "capital of France", "n": [1, 2.5, None, True]},
        "messages": [{"role": "user", "content": "hi"}],
        "secrets": {"api_token": "tok-123456"},
        "metadata": {"customer": "acme"},
        "params": {"max_tokens": 64, "temperature": 0.2, "stream": False},
        "env": {"REGION": "eu-west", "RETRIES": "3"},
        "session_id": "sess-1",
        "request_id": "req-1",
    }
    outcome = run(sandbox, """
        import os

        def execute(ctx):
            return {
                "input": ctx.input, "messages": ctx.messages, "secrets": ctx.secrets,
                "metadata": ctx.metadata, "params": ctx.params, "env": ctx.env,
                "environ": {k: os.environ.get(k) for k in ("REGION", "RETRIES")},
                "session_id": ctx.session_id, "request_id": ctx.request_id,
            }
    """, job)

    assert outcome.ok, outcome.error
    expected = {k: job[k] for k in ("input", "messages", "secrets", "metadata", "params", "env",
                                     "session_id", "request_id")}
    assert outcome.result == {**expected, "environ": job["env"]}
    assert json.loads(outcome.result_json) == outcome.result  # type: ignore[arg-type]


def test_ctx_has_empty_defaults_for_a_job_without_fields(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        def execute(ctx):
            return [ctx.input, ctx.messages, ctx.secrets, ctx.metadata, ctx.params, ctx.env,
                    ctx.session_id, ctx.request_id]
    """)

    assert outcome.ok, outcome.error
    assert outcome.result == [None, [], {}, {}, {}, {}, "", ""]


def test_emit_log_and_print_reach_the_outcome_in_order(sandbox: Sandbox) -> None:
    emitted: list[tuple[str, Any]] = []
    outcome = run(sandbox, """
        import sys

        def execute(ctx):
            ctx.emit("progress", "drafted")
            ctx.log.info("fetched", n=3)
            print("hello from print")
            ctx.emit("partial", {"tokens": [1, 2]})
            ctx.log.error("odd", obj=object())
            print("to stderr", file=sys.stderr)
            print("no newline at the end", end="")
            return "done"
    """, on_emit=lambda kind, content: emitted.append((kind, content)))

    assert outcome.ok, outcome.error
    assert outcome.result == "done"
    assert emitted == [("progress", "drafted"), ("partial", {"tokens": [1, 2]})]
    assert outcome.chunks == 2
    lines = [(line["level"], line["msg"], line.get("fields")) for line in outcome.logs]
    assert lines[:3] == [
        ("info", "fetched", {"n": 3}),
        ("info", "hello from print", {"stream": "stdout"}),
        ("error", "odd", {"obj": lines[2][2]["obj"]}),  # type: ignore[index]
    ]
    assert lines[2][2]["obj"].startswith("<object object at")  # type: ignore[index]
    assert lines[3:] == [
        ("warning", "to stderr", {"stream": "stderr"}),
        ("info", "no newline at the end", {"stream": "stdout"}),  # flushed when the run ends
    ]
    assert not outcome.logs_truncated


def test_script_exception_becomes_script_error_with_its_own_traceback(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        def helper():
            raise ValueError("boom")

        def execute(ctx):
            return helper()
    """)

    error = outcome.error
    assert isinstance(error, ScriptError)
    assert error.status == 500
    assert error.message == "ValueError: boom"
    assert error.details["exception"] == "ValueError"
    trace = error.details["traceback"]
    assert 'File "workflow.py", line 3, in helper' in trace
    assert 'File "workflow.py", line 6, in execute' in trace
    assert trace.rstrip().endswith("ValueError: boom")
    assert "runtime.py" not in trace  # the sandbox's own frames are cut
    assert outcome.result is None


def test_result_that_is_not_json_serializable_is_a_script_error(sandbox: Sandbox) -> None:
    outcome = run(sandbox, "def execute(ctx):\n    return {'ids': {1, 2}}\n")

    assert isinstance(outcome.error, ScriptError)
    assert "not JSON-serializable" in outcome.error.message
    assert "set" in outcome.error.message
    assert outcome.result is None


# Time limits


def test_soft_limit_raises_in_the_script_and_its_finally_runs(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import time

        def execute(ctx):
            try:
                time.sleep(30)
            finally:
                ctx.log.info("cleaned up in finally")
            return "never"
    """, soft_seconds=0.3)

    error = outcome.error
    assert isinstance(error, TimeLimitExceeded)
    assert error.status == 408
    assert error.details["limit"] == "soft"
    assert "cleaned up in finally" in [line["msg"] for line in outcome.logs]
    assert outcome.result is None


def test_script_that_swallows_the_soft_limit_is_killed_at_the_hard_limit(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import time
        from flowpool_workflow import SoftTimeLimitExceeded

        def execute(ctx):
            try:
                time.sleep(30)
            except SoftTimeLimitExceeded:
                ctx.log.warning("ignoring the soft limit")
            while True:
                time.sleep(0.05)
    """, soft_seconds=0.3)

    error = outcome.error
    assert isinstance(error, TimeLimitExceeded)
    assert error.details["limit"] == "hard"
    assert "killed" in error.message
    assert "ignoring the soft limit" in [line["msg"] for line in outcome.logs]
    assert outcome.pid is not None
    assert not eventually(lambda: _pid_running(outcome.pid))  # type: ignore[arg-type]


# Resource limits


def test_run_is_unprivileged_and_under_its_limits(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import os
        import resource

        def execute(ctx):
            with open("/proc/self/status") as status:
                fields = dict(line.rstrip("\\n").split(":\\t", 1) for line in status if ":\\t" in line)
            return {
                "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
                "no_new_privs": [fields["NoNewPrivs"]], "seccomp": fields.get("Seccomp"),
                "caps": {name: int(fields[name], 16) for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")},
                "session_leader": os.getsid(0) == os.getpid(),
                "limits": {name: resource.getrlimit(getattr(resource, name))[0]
                           for name in ("RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE",
                                        "RLIMIT_CPU", "RLIMIT_CORE")},
            }
    """, soft_seconds=4)

    assert outcome.ok, outcome.error
    result = outcome.result
    assert sandbox.uid_range is not None
    assert result["uid"] in sandbox.uid_range
    assert result["euid"] == result["uid"] == result["gid"]
    assert result["groups"] == []
    assert result["no_new_privs"] == ["1"]
    assert result["caps"] == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}
    if sandbox.isolation.get("seccomp"):
        assert result["seccomp"] == "2"  # a filter
    if not sandbox.isolation.get("namespaces"):  # else its session leader is its init, outside its view
        assert result["session_leader"]
    assert result["limits"] == {
        "RLIMIT_AS": LIMITS.memory_bytes, "RLIMIT_NPROC": LIMITS.processes,
        "RLIMIT_NOFILE": LIMITS.open_files, "RLIMIT_FSIZE": LIMITS.file_bytes,
        "RLIMIT_CPU": int(4 + HARD_GRACE) + 1,  # the job's own budget, a backstop for the hard limit
        "RLIMIT_CORE": 0,
    }


def test_run_is_in_a_session_of_its_own(sandbox: Sandbox) -> None:
    seen: dict[str, int] = {}

    def look(method: str, params: dict, deadline: float) -> Any:
        assert sandbox.uid_range is not None
        (proc,) = live_processes(sandbox.uid_range)  # the run, seen from the host, while it waits here
        seen.update(run=os.getsid(proc.pid), zygote=os.getsid(sandbox.isolation["pid"]))
        return {}

    outcome = sandbox.run(compiled("def execute(ctx):\n    ctx.chat.completions.create(messages=[])\n    return 1\n"),
                          {}, 10, on_call=look)

    assert outcome.ok, outcome.error
    assert seen["run"] not in (seen["zygote"], os.getsid(0))


def test_memory_bomb_fails_the_run_and_the_sandbox_serves_the_next_one(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        def execute(ctx):
            blocks = []
            for _ in range(32):  # at most 2 GiB, in 64 MiB steps
                blocks.append(bytearray(64 << 20))
            return len(blocks)
    """)

    error = outcome.error
    assert isinstance(error, (ScriptError, SandboxError)), error
    if isinstance(error, ScriptError):
        assert error.details["exception"] == "MemoryError"
    assert_serves_next_run(sandbox)


def test_fork_bomb_is_capped_by_the_process_limit_and_its_children_are_killed(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import os
        import time

        def execute(ctx):
            children, refused = [], None
            for _ in range(300):
                try:
                    pid = os.fork()
                except OSError as exc:
                    refused = type(exc).__name__
                    break
                if pid == 0:
                    try:
                        time.sleep(30)
                    finally:
                        os._exit(0)
                children.append(pid)
            return {"uid": os.getuid(), "children": children, "refused": refused}
    """)

    assert outcome.ok, outcome.error
    result = outcome.result
    assert result["refused"] == "BlockingIOError"
    # The run process counts against its own limit.
    assert 0 < len(result["children"]) <= LIMITS.processes - 1
    # Pids the run saw may be those of its own PID namespace: look for its uid instead.
    assert eventually(lambda: live_processes([result["uid"]])) == []
    assert_serves_next_run(sandbox)


DAEMON_SCRIPT = """
    import os
    import time

    def execute(ctx):
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # leave the run's session, then fork again and let the middle process exit
            try:
                os.setsid()
                if os.fork() == 0:
                    os.write(write_end, str(os.getpid()).encode())
                    time.sleep(60)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        os.close(write_end)
        daemon = int(os.read(read_end, 32))
        with open(f"/proc/{daemon}/stat") as stat:
            session = int(stat.read().rsplit(")", 1)[1].split()[3])
        return {"uid": os.getuid(), "daemon": daemon, "session": session, "own_session": os.getsid(0)}
"""


def test_background_daemon_is_killed_after_the_run(sandbox: Sandbox) -> None:
    outcome = run(sandbox, DAEMON_SCRIPT)

    assert outcome.ok, outcome.error
    result = outcome.result
    assert result["session"] != result["own_session"]  # out of reach of the run's process group
    assert eventually(lambda: live_processes([result["uid"]])) == []


def test_daemon_left_in_a_prestarted_slot_dies_when_the_slot_next_process_starts() -> None:
    # With a process wanted ahead of need, the slot's next process (same uid)
    # sweeps the uid as it starts instead of a separate reap.
    box = Sandbox(LIMITS, slots=1, uid_base=UID_BASE, hard_grace_seconds=HARD_GRACE, prestart=1)
    box.start()
    try:
        outcome = run(box, DAEMON_SCRIPT)
        assert outcome.ok, outcome.error
        result = outcome.result
        # Only the slot's next process, waiting for a job, may run under the uid: not the daemon too.
        assert not eventually(lambda: len(live_processes([result["uid"]])) > 1)
        assert_serves_next_run(box)
        uids = box.uid_range
    finally:
        box.stop()
    assert uids is not None
    assert eventually(lambda: live_processes(uids)) == []


def test_file_over_the_size_limit_cannot_be_written(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import errno

        def execute(ctx):
            try:
                with open("big.bin", "wb") as f:
                    f.write(b"x" * (2 << 20))
            except OSError as exc:
                return errno.errorcode[exc.errno]
            return "written"
    """)

    assert outcome.ok, outcome.error
    assert outcome.result == "EFBIG"


def test_open_files_are_capped(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import errno

        def execute(ctx):
            files = []
            try:
                for _ in range(1000):
                    files.append(open("/dev/null"))
            except OSError as exc:
                return {"opened": len(files), "error": errno.errorcode[exc.errno]}
            return {"opened": len(files)}
    """)

    assert outcome.ok, outcome.error
    assert outcome.result["error"] == "EMFILE"
    assert outcome.result["opened"] < LIMITS.open_files


# Isolation


def test_run_environment_holds_only_the_workflow_env(sandbox: Sandbox) -> None:
    assert WORKER_SECRET_NAME not in os.environ  # set only while the sandbox started
    outcome = run(sandbox, """
        import json
        import os

        def execute(ctx):
            found = {}
            for pid in (os.getppid(), ctx.metadata["worker"]):  # its parent, and the worker by its host pid
                for what in ("environ", "mem", "cmdline"):
                    try:
                        with open(f"/proc/{pid}/{what}", "rb") as f:
                            found[f"{pid} {what}"] = f.read(1 << 16).decode(errors="replace")
                    except OSError as exc:
                        found[f"{pid} {what}"] = type(exc).__name__
            return {"environ": dict(os.environ), "cwd": os.getcwd(), "parent": json.dumps(found)}
    """, {"env": {"GREETING": "hello"}, "secrets": {"api_token": "tok-secret-42"},
          "metadata": {"worker": os.getpid()}})

    assert outcome.ok, outcome.error
    environ, cwd = outcome.result["environ"], outcome.result["cwd"]
    assert environ == {"GREETING": "hello", "HOME": cwd, "TMPDIR": cwd, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    assert not [name for name in environ if name.startswith("FLOWPOOL")]
    assert "tok-secret-42" not in json.dumps(environ)
    # Nor can the run read it from the process that forked it, or from the worker.
    assert WORKER_SECRET not in outcome.result["parent"]
    assert WORKER_SECRET_NAME not in outcome.result["parent"]


def test_run_cannot_reach_another_runs_files_and_they_are_removed(sandbox: Sandbox) -> None:
    announced: queue.Queue[dict[str, Any]] = queue.Queue()
    release = threading.Event()
    first: dict[str, RunOutcome] = {}

    def hold(method: str, params: dict, deadline: float) -> Any:
        release.wait(20)  # the first run waits in a ctx call until the second is done
        return {"choices": []}

    def first_run() -> None:
        first["outcome"] = sandbox.run(compiled("""
            import os
            import tempfile

            def execute(ctx):
                with open("note.txt", "w") as f:
                    f.write("private")
                with open(os.path.join(tempfile.gettempdir(), "tmp-note.txt"), "w") as f:
                    f.write("private")
                info = os.stat(".")
                ctx.emit("workdir", {"path": os.getcwd(), "tmp": tempfile.gettempdir(),
                                     "mode": info.st_mode & 0o777, "owner": info.st_uid, "uid": os.getuid()})
                ctx.chat.completions.create(messages=[])
                return sorted(os.listdir(".")) + sorted(os.listdir(tempfile.gettempdir()))
        """), {}, 30, on_emit=lambda kind, content: announced.put(content), on_call=hold)

    thread = threading.Thread(target=first_run)
    thread.start()
    workdir: dict[str, Any] = {}
    try:
        workdir = announced.get(timeout=10)
        second = run(sandbox, """
            import os

            def execute(ctx):
                out = {"uid": os.getuid()}
                for name in ("path", "tmp"):
                    where = ctx.input[name]
                    for verb, attempt in {
                        "read": lambda: open(os.path.join(where, "note.txt" if name == "path" else "tmp-note.txt")).read(),
                        "list": lambda: os.listdir(where),
                        "write": lambda: open(os.path.join(where, "planted.txt"), "w").close(),
                    }.items():
                        try:
                            out[f"{name} {verb}"] = attempt()
                        except OSError as exc:
                            out[f"{name} {verb}"] = type(exc).__name__
                return out
        """, {"input": workdir})
    finally:
        release.set()
        thread.join(30)

    assert second.ok, second.error
    found = second.result
    assert found["uid"] != workdir["uid"]
    # Another uid (process backend) or another mount namespace (per-run namespaces): never the note.
    assert found["path read"] in ("PermissionError", "FileNotFoundError")
    assert found["tmp read"] in ("PermissionError", "FileNotFoundError")
    assert "note.txt" not in json.dumps(found)
    assert workdir["mode"] == 0o700
    assert workdir["owner"] == workdir["uid"]
    assert first["outcome"].ok, first["outcome"].error
    # What the second run wrote, if anything, landed elsewhere.
    assert "planted.txt" not in first["outcome"].result
    if sandbox.isolation.get("namespaces"):
        assert workdir["path"] == workdir["tmp"] == "/tmp"  # a tmpfs of its own
    else:
        assert not eventually(lambda: os.path.exists(workdir["path"]))


# Escapes: each attempt is contained, the sandbox serves the next run


def test_what_scripts_commonly_use_still_works_inside(sandbox: Sandbox) -> None:
    if sandbox.isolation.get("unreadable"):
        assert any("can import only what the zygote imported" in w for w in sandbox.weaknesses)
        pytest.skip("the runs' uids cannot read this interpreter (a warned-about setup): only pre-imports work")
    outcome = run(sandbox, """
        import asyncio
        import concurrent.futures
        import json
        import sqlite3
        import subprocess
        import tempfile

        async def twice(x):
            await asyncio.sleep(0)
            return 2 * x

        def execute(ctx):
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                squares = list(pool.map(lambda n: n * n, range(5)))
            with tempfile.NamedTemporaryFile("w+") as f:
                f.write("kept"); f.flush(); f.seek(0)
                kept = f.read()
            db = sqlite3.connect(":memory:")
            db.execute("create table t (x)"); db.execute("insert into t values (42)")
            echoed = subprocess.run(["echo", "child"], capture_output=True, text=True, check=True).stdout.strip()
            return {"async": asyncio.run(twice(21)), "threads": squares, "tmp": kept,
                    "sqlite": db.execute("select x from t").fetchone()[0], "subprocess": echoed,
                    "json": json.loads('[1]')}
    """)

    assert outcome.ok, outcome.error
    assert outcome.result == {"async": 42, "threads": [0, 1, 4, 9, 16], "tmp": "kept", "sqlite": 42,
                              "subprocess": "child", "json": [1]}


def test_files_outside_the_sandbox_cannot_be_read(sandbox: Sandbox) -> None:
    import flowpool.settings
    outcome = run(sandbox, """
        def execute(ctx):
            found = {}
            for path in ctx.input:
                try:
                    with open(path, "rb") as f:
                        found[path] = f.read(64).decode(errors="replace")
                except OSError as exc:
                    found[path] = type(exc).__name__
            return found
    """, {"input": ["/etc/shadow", flowpool.settings.__file__, os.path.abspath(__file__)]})

    assert outcome.ok, outcome.error
    found = outcome.result
    assert found["/etc/shadow"] in ("PermissionError", "FileNotFoundError")
    if sandbox.isolation.get("namespaces"):  # flowpool's own code is covered once the zygote imported it
        assert found[flowpool.settings.__file__] in ("PermissionError", "FileNotFoundError")
    else:  # the weaker mode says so
        assert any("WARNING" in weakness for weakness in sandbox.weaknesses)
    if sandbox.backend == "bwrap":  # only the runtime is there: not the checkout, not this test
        assert found[os.path.abspath(__file__)] in ("PermissionError", "FileNotFoundError")


def test_the_network_and_sockets_are_out_of_reach(sandbox: Sandbox) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    try:
        outcome = run(sandbox, """
            import socket

            def execute(ctx):
                found = {}
                for name, attempt in {
                    "tcp": lambda: socket.create_connection(("127.0.0.1", ctx.input), timeout=2),
                    "unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
                    "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                    "raw": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW),
                }.items():
                    try:
                        attempt()
                        found[name] = "connected"
                    except OSError as exc:
                        found[name] = type(exc).__name__
                return found
        """, {"input": listener.getsockname()[1]})
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing came through
    finally:
        listener.close()

    assert outcome.ok, outcome.error
    assert set(outcome.result.values()) <= {"PermissionError", "ConnectionRefusedError", "OSError"}, outcome.result
    if sandbox.isolation.get("seccomp"):
        assert set(outcome.result.values()) == {"PermissionError"}


def test_kernel_interfaces_for_escaping_are_denied(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import ctypes
        import os

        libc = ctypes.CDLL(None, use_errno=True)

        def attempt(call, *args):
            return "allowed" if call(*args) == 0 else os.strerror(ctypes.get_errno())

        def execute(ctx):
            return {
                "unshare user": attempt(libc.unshare, 0x10000000),
                "unshare mount": attempt(libc.unshare, 0x00020000),
                "ptrace": attempt(libc.ptrace, 16, 1, 0, 0),  # PTRACE_ATTACH to PID 1
                "mount": attempt(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None),
                "chroot": attempt(libc.chroot, b"/tmp"),
                "keyctl": attempt(libc.syscall, 250 if os.uname().machine == "x86_64" else 219, 0, 0, 0),
            }
    """)

    assert outcome.ok, outcome.error
    assert "allowed" not in outcome.result.values(), outcome.result
    if sandbox.isolation.get("seccomp"):
        assert set(outcome.result.values()) == {os.strerror(errno.EPERM)}
    assert_serves_next_run(sandbox)


def test_signals_to_the_zygote_and_the_worker_are_refused(sandbox: Sandbox) -> None:
    (zygote,) = [p for p in zygotes_of(sandbox)]
    outcome = run(sandbox, """
        import os
        import signal

        def execute(ctx):
            found = {}
            for name, pid in {"parent": os.getppid(), "zygote": ctx.input["zygote"], "worker": ctx.input["worker"],
                              "everyone": -1}.items():
                try:
                    os.kill(pid, signal.SIGKILL)
                    found[name] = "sent"
                except OSError as exc:
                    found[name] = type(exc).__name__
            return found
    """, {"input": {"zygote": zygote, "worker": os.getpid()}})

    assert outcome.ok, outcome.error
    # The run's parent is the stand-in for its namespace (pid 0 from in there) or the zygote: either way not ours.
    assert outcome.result["zygote"] in ("PermissionError", "ProcessLookupError")
    assert outcome.result["worker"] in ("PermissionError", "ProcessLookupError")
    assert outcome.result["parent"] in ("PermissionError", "ProcessLookupError")
    assert _pid_running(zygote)
    assert_serves_next_run(sandbox)


def test_filling_tmp_stops_at_the_run_disk_limit_and_the_next_run_starts_empty(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        import errno
        import os
        import tempfile

        def execute(ctx):
            where = tempfile.gettempdir()
            written = 0
            try:
                for n in range(1000):  # bounded: 1000 x 512 KiB, far over any limit here
                    with open(os.path.join(where, f"fill-{n}"), "wb") as f:
                        f.write(b"x" * (512 << 10))
                    written += 512 << 10
            except OSError as exc:
                return {"error": errno.errorcode[exc.errno], "written": written}
            return {"error": None, "written": written}
    """)
    after = run(sandbox, """
        import os
        import tempfile

        def execute(ctx):
            return os.listdir(tempfile.gettempdir())
    """)

    assert outcome.ok, outcome.error
    if sandbox.isolation.get("namespaces"):
        assert outcome.result["error"] == "ENOSPC"
        assert outcome.result["written"] <= LIMITS.tmp_bytes
    else:  # only each file's size is limited
        assert outcome.result["error"] in ("EFBIG", "ENOSPC", None)
    assert after.ok, after.error
    # (A runtime that lives under /tmp, a checkout there, is bound back into each run's /tmp.)
    assert [name for name in after.result if name.startswith("fill-")] == []


def test_files_left_in_shared_writable_places_are_gone_after_the_run(sandbox: Sandbox) -> None:
    tag = f"left-{os.getpid()}-{time.monotonic_ns()}"
    places = ["/tmp", "/var/tmp", "/dev/shm"]
    outcome = run(sandbox, """
        import os

        def execute(ctx):
            written = []
            for place in ctx.input["places"]:
                try:
                    with open(os.path.join(place, ctx.input["tag"]), "w") as f:
                        f.write("for the next run")
                    written.append(place)
                except OSError:
                    pass
            return written
    """, {"input": {"places": places, "tag": tag}})
    assert outcome.ok, outcome.error
    assert outcome.result  # somewhere was writable: /tmp at least
    # The next runs, whatever their slot, cannot read them; with namespaces of their own they never see them.
    for _ in range(3):
        after = run(sandbox, """
            import os

            def execute(ctx):
                found = {}
                for place in ctx.input["places"]:
                    path = os.path.join(place, ctx.input["tag"])
                    try:
                        with open(path) as f:
                            found[place] = f.read()
                    except OSError as exc:
                        found[place] = type(exc).__name__
                return found
        """, {"input": {"places": places, "tag": tag}})
        assert after.ok, after.error
        assert "for the next run" not in after.result.values()
        if sandbox.isolation.get("namespaces"):
            assert set(after.result.values()) == {"FileNotFoundError"}
    # Without namespaces the slot's sweep removes them from the host (as the run's own uid).
    assert eventually(lambda: [p for p in places if os.path.exists(os.path.join(p, tag))]) == []


def test_one_runs_secrets_are_out_of_another_runs_reach(sandbox: Sandbox) -> None:
    release = threading.Event()
    holding = threading.Event()

    def hold(method: str, params: dict, deadline: float) -> Any:
        holding.set()
        release.wait(20)
        return {"choices": []}

    holder: dict[str, RunOutcome] = {}
    thread = threading.Thread(target=lambda: holder.update(outcome=sandbox.run(compiled("""
        import os

        def execute(ctx):
            os.environ["HELD"] = ctx.secrets["token"]
            kept = [ctx.secrets["token"]] * 3
            ctx.chat.completions.create(messages=[])
            return len(kept)
    """), {"secrets": {"token": "tok-held-9c2e"}}, 30, on_call=hold)))
    thread.start()
    try:
        assert holding.wait(10)
        outcome = run(sandbox, """
            import os

            def execute(ctx):
                seen, refused = [], 0
                for entry in os.listdir("/proc"):
                    if not entry.isdigit():
                        continue
                    for what in ("environ", "cmdline", "mem"):
                        try:
                            with open(f"/proc/{entry}/{what}", "rb") as f:
                                seen.append(f.read(1 << 20).decode(errors="replace"))
                        except OSError:
                            refused += 1
                return {"found": any("tok-held" in text for text in seen), "pids": len(os.listdir("/proc"))}
        """)
    finally:
        release.set()
        thread.join(30)

    assert outcome.ok, outcome.error
    assert outcome.result["found"] is False
    assert holder["outcome"].ok, holder["outcome"].error


def test_a_run_over_its_cpu_time_is_killed_and_the_caller_is_told(sandbox: Sandbox) -> None:
    own = dataclasses.replace(LIMITS, cpu_seconds=1)
    outcome = sandbox.run(compiled("""
        def execute(ctx):
            while True:
                pass
    """), {}, 30, limits=own)

    error = outcome.error
    assert isinstance(error, SandboxError), error
    assert error.details["signal"] in (signal.SIGXCPU, signal.SIGKILL)
    assert "CPU time limit" in error.message or "SIGKILL" in error.message
    assert_serves_next_run(sandbox)


def test_a_runs_own_limits_replace_the_sandboxs(sandbox: Sandbox) -> None:
    own = dataclasses.replace(LIMITS, memory_bytes=200 << 20, open_files=32, tmp_bytes=2 << 20, cpu_seconds=2,
                              max_result_bytes=1 << 10)
    outcome = sandbox.run(compiled("""
        import os
        import resource
        import tempfile

        def execute(ctx):
            stat = os.statvfs(tempfile.gettempdir())
            return {"as": resource.getrlimit(resource.RLIMIT_AS)[0],
                    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    "cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
                    "tmp": stat.f_blocks * stat.f_frsize}
    """), {}, 10, limits=own)
    too_big = sandbox.run(compiled("def execute(ctx):\n    return 'x' * 4096\n"), {}, 10, limits=own)

    assert outcome.ok, outcome.error
    assert outcome.result["as"] == 200 << 20
    assert outcome.result["nofile"] == 32
    assert outcome.result["cpu"] == 2
    if sandbox.isolation.get("namespaces"):
        assert outcome.result["tmp"] == 2 << 20
    assert isinstance(too_big.error, ResultTooLarge)
    assert_serves_next_run(sandbox)  # under the sandbox's own limits again


# Crashes


def test_exit_without_a_result_becomes_sandbox_error_with_the_exit_code(sandbox: Sandbox) -> None:
    outcome = run(sandbox, "import os\n\ndef execute(ctx):\n    os._exit(3)\n")

    error = outcome.error
    assert isinstance(error, SandboxError)
    assert "exited with code 3" in error.message
    assert error.details["exit_code"] == 3


def test_killed_run_becomes_sandbox_error_naming_the_signal(sandbox: Sandbox) -> None:
    outcome = run(sandbox, "import os\n\ndef execute(ctx):\n    os.kill(os.getpid(), 9)\n")

    error = outcome.error
    assert isinstance(error, SandboxError)
    assert "SIGKILL" in error.message
    assert error.details["signal"] == signal.SIGKILL


# Sizes


@pytest.mark.parametrize("size", [LIMITS.max_result_bytes + 100, 4 << 20],
                         ids=["just-over-the-limit", "over-the-frame-limit"])
def test_result_over_max_result_bytes_is_result_too_large(sandbox: Sandbox, size: int) -> None:
    outcome = run(sandbox, "def execute(ctx):\n    return 'x' * ctx.input\n", {"input": size})

    assert isinstance(outcome.error, ResultTooLarge)
    assert outcome.error.status == 413
    assert outcome.result is None and outcome.result_json is None
    assert_serves_next_run(sandbox)


def test_print_without_newline_is_cut_at_max_log_bytes(sandbox: Sandbox) -> None:
    outcome = run(sandbox, """
        def execute(ctx):
            for _ in range(1000):  # 10 MB on one line
                print("x" * 10_000, end="")
            return "done"
    """)

    assert outcome.ok, outcome.error
    assert outcome.result == "done"
    assert outcome.logs_truncated
    *kept, notice = outcome.logs
    assert kept and sum(len(line["msg"]) for line in kept) <= LIMITS.max_log_bytes
    assert notice["level"] == "warning" and "log cut" in notice["msg"]


def test_too_many_chunks_is_result_too_large(sandbox: Sandbox) -> None:
    emitted: list[Any] = []
    outcome = run(sandbox, """
        def execute(ctx):
            for i in range(ctx.input):
                ctx.emit("step", i)
            return "done"
    """, {"input": LIMITS.max_chunks + 5}, on_emit=lambda kind, content: emitted.append(content))

    assert isinstance(outcome.error, ResultTooLarge)
    assert str(LIMITS.max_chunks) in outcome.error.message
    assert emitted == list(range(LIMITS.max_chunks))
    assert_serves_next_run(sandbox)


def test_chunk_over_max_chunk_bytes_is_result_too_large(sandbox: Sandbox) -> None:
    emitted: list[Any] = []
    outcome = run(sandbox, "def execute(ctx):\n    ctx.emit('big', 'x' * ctx.input)\n    return 1\n",
                  {"input": LIMITS.max_chunk_bytes + 1}, on_emit=lambda kind, content: emitted.append(content))

    assert isinstance(outcome.error, ResultTooLarge)
    assert emitted == []


# The channel


def frame(body: bytes, announced: int | None = None) -> bytes:
    return struct.pack(">I", len(body) if announced is None else announced) + body


NESTED = b'{"op":"emit","type":"x","content":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
MALFORMED = {
    "length-over-the-limit": (frame(b"", announced=0xFFFF_FFF0), False, (ResultTooLarge, SandboxError)),
    "not-json": (frame(b"hello"), False, SandboxError),
    "not-utf8": (frame(b"\xff\xfe\xfd\xfc"), False, SandboxError),
    "json-without-op": (frame(b'{"value": 1}'), False, SandboxError),
    "not-an-object": (frame(b"[1, 2]"), False, SandboxError),
    "unknown-op": (frame(b'{"op": "shell", "cmd": "id"}'), False, SandboxError),
    "nested-too-deep": (frame(NESTED), False, SandboxError),
    "truncated-then-exit": (frame(b'{"op"', announced=100), True, SandboxError),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frame_ends_the_run_and_the_next_run_works(sandbox: Sandbox, name: str) -> None:
    data, then_exit, expected = MALFORMED[name]
    assert len(data) < LIMITS.max_result_bytes + (64 << 10)  # malformed, not merely too long
    outcome = run(sandbox, """
        import base64
        import os
        import time

        def channel_fd():
            for fd in range(3, 64):
                try:
                    if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                        return fd
                except OSError:
                    pass

        def execute(ctx):
            os.write(channel_fd(), base64.b64decode(ctx.input["frame"]))
            if ctx.input["exit"]:
                os._exit(0)
            time.sleep(30)
    """, {"input": {"frame": base64.b64encode(data).decode(), "exit": then_exit}}, soft_seconds=5)

    assert isinstance(outcome.error, expected), outcome.error
    assert_serves_next_run(sandbox)


# Concurrency and the zygote


def test_concurrent_runs_all_succeed_each_under_its_own_uid(sandbox: Sandbox) -> None:
    # Each run waits in a ctx call until every run is in one: all were running at once.
    meeting = threading.Barrier(SLOTS)

    def meet(method: str, params: dict, deadline: float) -> Any:
        return {"met": meeting.wait(10) is not None}

    source = compiled("""
        import os

        def execute(ctx):
            met = ctx.chat.completions.create(messages=[])["met"]
            return {"n": ctx.input, "uid": os.getuid(), "met": met}
    """)
    with ThreadPoolExecutor(SLOTS) as pool:
        outcomes = list(pool.map(lambda n: sandbox.run(source, {"input": n}, 20, on_call=meet), range(SLOTS)))

    assert [o.error for o in outcomes] == [None] * SLOTS
    assert [o.result["n"] for o in outcomes] == list(range(SLOTS))
    assert [o.result["met"] for o in outcomes] == [True] * SLOTS
    assert len({o.result["uid"] for o in outcomes}) == SLOTS


def _start_own_sandbox(prestart: int) -> tuple[Sandbox, int]:
    """A sandbox of this test and the pid of its zygote."""
    before = zygotes()
    box = Sandbox(LIMITS, slots=2, uid_base=UID_BASE, hard_grace_seconds=HARD_GRACE, prestart=prestart)
    box.start()
    (zygote,) = zygotes() - before
    return box, zygote


def _kill_zygote(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    assert not eventually(lambda: _pid_running(pid))


def test_run_process_dies_with_its_zygote() -> None:
    box, zygote = _start_own_sandbox(prestart=0)
    try:
        started = threading.Event()
        result: dict[str, RunOutcome] = {}
        thread = threading.Thread(target=lambda: result.update(outcome=run(box, """
            import time

            def execute(ctx):
                ctx.emit("started", None)
                time.sleep(30)
        """, soft_seconds=5, on_emit=lambda kind, content: started.set())))
        thread.start()
        assert started.wait(10)
        _kill_zygote(zygote)
        thread.join(30)

        # Not carried on to the soft limit by an orphaned process.
        assert isinstance(result["outcome"].error, SandboxError), result["outcome"].error
        assert_serves_next_run(box)
        uids = box.uid_range
    finally:
        box.stop()
    assert uids is not None
    assert eventually(lambda: live_processes(uids)) == []


def test_sandbox_serves_runs_after_its_zygote_died() -> None:
    box, zygote = _start_own_sandbox(prestart=2)
    try:
        assert_serves_next_run(box)
        uids = box.uid_range
        assert uids is not None
        # What the zygote forked (its spare and the processes started ahead of need) dies with it; the
        # sandbox may start new ones from a new zygote meanwhile, which are not asked about here.
        forked = {p.pid for p in psutil.Process(zygote).children(recursive=True)}
        _kill_zygote(zygote)
        assert eventually(lambda: [p for p in live_processes(uids) if p.pid in forked]) == []

        for _ in range(3):
            assert_serves_next_run(box)
    finally:
        box.stop()
    assert eventually(lambda: live_processes(uids)) == []


def test_a_process_counts_as_its_zygotes_only_while_that_zygote_runs(tmp_path: Path) -> None:
    # What a zygote forked dies with it, but not at once (its pidfd says it is alive till then): the
    # sandbox asks whether a process's zygote still runs before it hands the process a job.
    zygote = Zygote()
    zygote.start()
    first, second = RunProcess(0, None, str(tmp_path / "first")), RunProcess(1, None, str(tmp_path / "second"))
    try:
        first.pid, first.sock, first.zygote = zygote.spawn(first.workdir, {}, None, None)
        first.pidfd = os.pidfd_open(first.pid)
        assert zygote.running(first.zygote)
        os.kill(zygote.isolation["pid"], signal.SIGKILL)
        assert not eventually(lambda: zygote.running(first.zygote))

        second.pid, second.sock, second.zygote = zygote.spawn(second.workdir, {}, None, None)
        second.pidfd = os.pidfd_open(second.pid)
        assert second.zygote != first.zygote
        assert zygote.running(second.zygote) and not zygote.running(first.zygote)
    finally:
        zygote.stop()
        for process in (first, second):
            process.kill()  # as the sandbox kills a process it passes over
            process.close()
            if process.sock is not None:
                process.sock.close()


def test_a_closed_gate_kills_the_run_before_anything_it_sent_is_read(sandbox: Sandbox) -> None:
    emitted: list[Any] = []
    asked: list[bool] = []

    def gate() -> bool:
        asked.append(True)
        return False

    outcome = sandbox.run(compiled("""
        def execute(ctx):
            ctx.emit("early", 1)
            return {"ran": True}
    """), {}, 5.0, on_emit=lambda t, c: emitted.append((t, c)), gate=gate)

    assert asked == [True]
    assert outcome.skipped and outcome.result is None and outcome.error is None
    assert emitted == []
    assert not eventually(lambda: _pid_running(outcome.pid))  # type: ignore[arg-type]
    assert_serves_next_run(sandbox)


def test_an_open_gate_lets_the_run_finish(sandbox: Sandbox) -> None:
    outcome = sandbox.run(compiled("def execute(ctx):\n    return 7\n"), {}, 5.0, gate=lambda: True)
    assert outcome.ok and outcome.result == 7 and not outcome.skipped
