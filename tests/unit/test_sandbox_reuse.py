"""Warm run processes (FLOWPOOL_SANDBOX_REUSE) with the real zygote and real processes.

Which process served a run is seen from inside it: a module global that
counts the runs of the version's module (1 in a fresh process) and the
process's start time from /proc/self/stat (inside a PID namespace its pid is
always 2). What must never be reused is checked by the next run finding a
fresh process; what a kept process must put back, by the next run looking.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from flowpool.errors import SandboxError, ScriptError, TimeLimitExceeded
from flowpool.sandbox import Sandbox, SandboxLimits, WithFile
from tests.conftest import SESSION_PIDS
from tests.helpers import compiled, eventually, sandbox_backends

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs get uids and namespaces of their own only as root")

LIMITS = SandboxLimits(memory_bytes=256 << 20, processes=16, open_files=64, file_bytes=1 << 20, tmp_bytes=8 << 20,
                       max_result_bytes=64 << 10, max_log_bytes=64 << 10, max_chunks=20, max_chunk_bytes=4 << 10)
UID_BASE = 113000  # a block of its own: see tests/unit/test_sandbox.py
KEY = ("account-a", "flow", "1.0.0", "hash-a")

# Each run says which process it ran in and what it finds there; ``input`` says what else it does.
SCRIPT = compiled('''
import gc, os, threading, time
RUNS = 0
STASH = []
KEPT = []

def execute(ctx):
    global RUNS
    RUNS += 1
    asked = ctx.input or {}
    seen = {"runs": RUNS, "start": open("/proc/self/stat").read().split()[21], "tmp": sorted(os.listdir("/tmp")),
            "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")), "cwd": os.getcwd(),
            "stash": list(STASH),
            "in_memory": any(isinstance(o, dict) and o.get("token") == "s3cret-7f1e" for o in gc.get_objects())}
    if ctx.secrets:
        STASH.append(dict(ctx.secrets))
    if asked.get("write"):
        os.makedirs("/tmp/a/b", exist_ok=True)
        open("/tmp/a/b/file", "w").write("x")
        open("/tmp/top", "w").write("x")
        os.chdir("/tmp/a")
    if asked.get("thread"):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    if asked.get("child") and os.fork() == 0:
        time.sleep(30)
        os._exit(0)
    if asked.get("keep_file"):
        KEPT.append(open("/proc/self/stat"))
    if asked.get("accessory"):
        seen["accessory"] = ctx.load_accessory("table")
    if asked.get("raise"):
        raise ValueError("the script's own error")
    if asked.get("sleep"):
        time.sleep(asked["sleep"])
    if asked.get("spin"):
        deadline = time.process_time() + asked["spin"]
        while time.process_time() < deadline:
            pass
    return seen
''')


def make(backend: Any = "process", reuse: bool = True, **options: Any) -> Sandbox:
    options = {"slots": 4, "uid_base": UID_BASE, "hard_grace_seconds": 1.0, "prestart": 0, **options}
    box = Sandbox(options.pop("limits", LIMITS), backend=backend, reuse=reuse, **options)
    box.start()
    return box


@pytest.fixture(scope="module", params=sandbox_backends())
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox keeping warm processes, on each backend."""
    box = make(request.param)
    # Its zygote and the warm processes under it outlive each test on purpose (the conftest's leak check).
    zygote = box._zygote._process.pid  # type: ignore[union-attr]
    SESSION_PIDS.add(zygote)
    try:
        yield box
    finally:
        SESSION_PIDS.discard(zygote)
        box.stop()


@pytest.fixture
def warm(sandbox: Sandbox) -> Sandbox:
    """The module's sandbox where runs have namespaces of their own (only there is a process kept)."""
    if not sandbox.isolation.get("namespaces"):
        pytest.skip("no per-run namespaces on this backend: every run gets a fresh process")
    return sandbox


def run(box: Sandbox, key: Any = KEY, soft: float = 5.0, **asked: Any) -> Any:
    """The result of one run of SCRIPT asking for ``asked``; raises the run's error."""
    job = {"input": asked, "secrets": asked.pop("secrets", {})}
    outcome = box.run(SCRIPT, job, soft, reuse=key, on_call=asked.pop("on_call", None))
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def fresh_key(name: str) -> tuple[str, ...]:
    """A key no other test uses: its first run is always in a fresh process."""
    return ("account-a", name, "1.0.0", f"hash-{name}")


def test_consecutive_runs_of_a_version_reuse_the_process(warm: Sandbox) -> None:
    key = fresh_key("consecutive")
    seen = [run(warm, key) for _ in range(3)]
    assert [s["runs"] for s in seen] == [1, 2, 3]
    assert len({s["start"] for s in seen}) == 1


def test_without_namespaces_every_run_gets_a_fresh_process(sandbox: Sandbox) -> None:
    if sandbox.isolation.get("namespaces"):
        pytest.skip("runs have namespaces of their own on this backend")
    key = fresh_key("no-namespaces")
    assert [run(sandbox, key)["runs"] for _ in range(2)] == [1, 1]


def test_another_account_or_version_never_gets_the_process(warm: Sandbox) -> None:
    key = fresh_key("mine")
    assert run(warm, key)["runs"] == 1
    assert run(warm, key)["runs"] == 2
    for other in [("account-b", *key[1:]), (key[0], key[1], "2.0.0", "hash-other")]:
        assert run(warm, other)["runs"] == 1
    assert run(warm, key)["runs"] == 3  # its own process waited for it meanwhile


def test_other_limits_get_another_process(warm: Sandbox) -> None:
    key = fresh_key("limits")
    assert run(warm, key)["runs"] == 1
    other = warm.run(SCRIPT, {"input": {}}, 5.0, reuse=key, limits=SandboxLimits(**{**LIMITS.__dict__,
                                                                                    "open_files": 63}))
    assert other.error is None and other.result["runs"] == 1


def test_a_run_with_secrets_is_followed_by_a_fresh_process(warm: Sandbox) -> None:
    key = fresh_key("secrets")
    assert run(warm, key)["runs"] == 1
    # A run carrying secrets is given no key (tasks.execute): a fresh process, ended with the run.
    secret = run(warm, None, secrets={"token": "s3cret-7f1e"})
    assert secret["runs"] == 1
    after = run(warm, key)
    assert after["runs"] == 2 and after["stash"] == [] and not after["in_memory"]
    assert run(warm, None)["runs"] == 1  # and a run without a key never gets a warm one either


@pytest.mark.parametrize("asked", [{"thread": True}, {"child": True}, {"keep_file": True}],
                         ids=["left-a-thread", "left-a-process", "left-a-file-open"])
def test_a_run_that_leaves_something_behind_is_not_reused(warm: Sandbox, asked: dict[str, Any]) -> None:
    key = fresh_key("leaves-" + "-".join(asked))
    assert run(warm, key)["runs"] == 1
    assert run(warm, key, **asked)["runs"] == 2
    assert run(warm, key)["runs"] == 1


def test_a_run_that_timed_out_is_not_reused(warm: Sandbox) -> None:
    key = fresh_key("timeout")
    assert [run(warm, key)["runs"] for _ in range(2)] == [1, 2]
    with pytest.raises(TimeLimitExceeded):
        run(warm, key, soft=0.5, sleep=10)
    assert run(warm, key)["runs"] == 1


def test_the_scripts_own_error_keeps_the_process(warm: Sandbox) -> None:
    key = fresh_key("raises")
    assert run(warm, key)["runs"] == 1
    with pytest.raises(ScriptError):
        run(warm, key, **{"raise": True})
    assert run(warm, key)["runs"] == 3


def test_the_next_run_finds_tmp_empty_and_its_working_directory_back(warm: Sandbox) -> None:
    key = fresh_key("tmp")
    first = run(warm, key, write=True)
    after = run(warm, key)
    assert after["runs"] == 2
    assert after["tmp"] == first["tmp"] == [] and after["cwd"] == first["cwd"]


def test_accessory_descriptors_are_closed_before_the_next_run(warm: Sandbox) -> None:
    key = fresh_key("accessory")
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "table.json")
    with open(path, "w") as handle:
        json.dump({"a": 1}, handle)

    def serve(method: str, params: dict, deadline: float) -> Any:
        return WithFile({"size": os.path.getsize(path)}, os.open(path, os.O_RDONLY))

    first = run(warm, key, accessory=True, on_call=serve)
    assert first["accessory"] == {"a": 1}
    after = run(warm, key)
    assert after["runs"] == 2 and after["fds"] == first["fds"]


def test_the_cpu_limit_holds_for_each_run_of_a_warm_process() -> None:
    # With the watchdog rather than cgroups: the per-run CPU time must not count the process's earlier runs.
    box = make(cgroups="off", limits=SandboxLimits(**{**LIMITS.__dict__, "cpu_seconds": 1}))
    try:
        if not box.isolation.get("namespaces"):
            pytest.skip("no per-run namespaces here")
        key = fresh_key("cpu")
        runs = [run(box, key, spin=0.4)["runs"] for _ in range(4)]  # 1.6 s of CPU in all, under 1 s each
        assert runs == [1, 2, 3, 4]
        outcome = box.run(SCRIPT, {"input": {"spin": 30}}, 10.0, reuse=key)
        assert isinstance(outcome.error, SandboxError) and "CPU" in str(outcome.error) + str(outcome.error.details)
        assert run(box, key)["runs"] == 1
    finally:
        box.stop()


def test_reuse_off_gives_a_fresh_process_every_time() -> None:
    box = make(reuse=False)
    try:
        assert [run(box)["runs"] for _ in range(3)] == [1, 1, 1]
    finally:
        box.stop()


def test_a_process_serves_at_most_max_runs() -> None:
    box = make(reuse_max_runs=2)
    try:
        if not box.isolation.get("namespaces"):
            pytest.skip("no per-run namespaces here")
        assert [run(box)["runs"] for _ in range(5)] == [1, 2, 1, 2, 1]
    finally:
        box.stop()


def test_an_idle_warm_process_is_retired() -> None:
    box = make(reuse_idle_seconds=0.2)
    try:
        if not box.isolation.get("namespaces"):
            pytest.skip("no per-run namespaces here")
        pid = box.run(SCRIPT, {"input": {}}, 5.0, reuse=KEY).pid
        assert pid is not None and alive(pid)
        eventually(lambda: not alive(pid), timeout=10, what="the idle process retired")
        assert run(box)["runs"] == 1
    finally:
        box.stop()


def test_a_run_of_another_key_takes_the_slot_of_the_least_recently_used() -> None:
    box = make(slots=1)
    try:
        if not box.isolation.get("namespaces"):
            pytest.skip("no per-run namespaces here")
        assert run(box, fresh_key("a"))["runs"] == 1
        assert run(box, fresh_key("a"))["runs"] == 2
        assert run(box, fresh_key("b"))["runs"] == 1  # the only slot was a's, held warm: a's process is retired
        assert run(box, fresh_key("a"))["runs"] == 1
    finally:
        box.stop()
