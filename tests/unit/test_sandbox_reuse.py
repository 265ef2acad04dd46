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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from flowpool.errors import SandboxError, ScriptError, TimeLimitExceeded
from flowpool.sandbox import Sandbox, SandboxLimits, WithFile
from flowpool.sandbox.run_process import RunProcess
from flowpool.sandbox.warm import answered, freeze
from tests.conftest import SESSION_PIDS
from tests.helpers import compiled, eventually, sandbox_backends

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs get uids and namespaces of their own only as root")

LIMITS = SandboxLimits(memory_bytes=256 << 20, processes=16, open_files=64, file_bytes=1 << 20, tmp_bytes=8 << 20,
                       max_result_bytes=64 << 10, max_log_bytes=64 << 10, max_chunks=20, max_chunk_bytes=4 << 10)
UID_BASE = 113000  # a block of its own: see tests/unit/test_sandbox.py
KEY = ("account-a", "flow", "1.0.0", "hash-a")

# Each run says which process it ran in and what it finds there; ``input`` says what else it does.
SCRIPT = compiled('''
import gc, os, resource, signal, threading, time
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
            "in_memory": any(isinstance(o, dict) and o.get("token") == "s3cret-7f1e" for o in gc.get_objects()),
            "pending": sorted(int(sig) for sig in signal.sigpending()),
            # CPU time this run may still use before SIGXCPU: its soft limit, less what the process used already.
            "cpu_left": resource.getrlimit(resource.RLIMIT_CPU)[0] - sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}
    if asked.get("forge"):  # tell the worker whatever it likes: the process's own tidying always says yes
        for found in gc.get_objects():
            if type(found).__name__ == "Baseline":
                type(found).restore = lambda self: True
    if asked.get("burn"):  # a thread and a child, both spinning, to outlive the run
        threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()
        if os.fork() == 0:
            while True:
                pass
    if asked.get("stack"):
        soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
        resource.setrlimit(resource.RLIMIT_STACK, (1 << 20 if soft in (-1, 1 << 20) else soft // 2, hard))
    if asked.get("pend"):  # blocked and pending when the run ends
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        os.kill(os.getpid(), signal.SIGUSR2)
    if asked.get("slow_tidy"):  # a /tmp that takes long to empty (many files, say)
        import shutil
        os.makedirs("/tmp/many/files", exist_ok=True)
        shutil.rmtree = lambda *args, **kwargs: time.sleep(asked["slow_tidy"])
    if asked.get("lift_cpu"):
        resource.setrlimit(resource.RLIMIT_CPU, (resource.getrlimit(resource.RLIMIT_CPU)[1],) * 2)
    if asked.get("lower_cpu"):  # a hard CPU limit that leaves the next run less than its budget
        resource.setrlimit(resource.RLIMIT_CPU, (int(sum(resource.getrusage(resource.RUSAGE_SELF)[:2])) + 3,) * 2)
    if asked.get("thread_child"):  # a child forked by a thread, not the main one, spinning while the run lasts
        def fork_and_stay():
            if os.fork() == 0:
                while True:
                    pass
            time.sleep(30)
        threading.Thread(target=fork_and_stay, daemon=True).start()
        deadline = time.monotonic() + asked["thread_child"]
        while time.monotonic() < deadline:
            time.sleep(0.05)
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


# Serves its own runs after its first answer (a script may), after spinning ``spin`` CPU seconds uncharged; or,
# asked for "partial", sends the first bytes of a frame after its answer and nothing more.
HIJACK = compiled('''
import gc, json, socket, struct, time
def execute(ctx):
    asked = ctx.input or {}
    if "hijack" not in asked:
        return {"hijacked": False}
    sock = [o for o in gc.get_objects() if isinstance(o, socket.socket) and o.fileno() >= 0][0]
    def send(message):
        body = json.dumps(message, separators=(",", ":")).encode()
        sock.sendall(struct.pack(">I", len(body)) + body)

    send({"op": "result", "value": {"hijacked": False}})
    if asked["hijack"] == "partial":
        sock.sendall(b"\\0\\0")
        time.sleep(30)
    deadline = time.process_time() + asked["hijack"]
    while time.process_time() < deadline:
        pass
    send({"op": "ready"})
    while True:
        sock.recv(struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))[0], socket.MSG_WAITALL)
        send({"op": "result", "value": {"hijacked": True}})
        send({"op": "ready"})
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
    # What the first run found (nothing, or the checkout, kept visible where it lies under /tmp), not what it wrote.
    assert after["tmp"] == first["tmp"] and not {"a", "top"} & set(after["tmp"]) and after["cwd"] == first["cwd"]


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


# Review findings: the worker decides whether to keep a process, from the kernel, never from what it says.

def test_a_forged_clean_bill_with_a_thread_and_a_child_left_is_retired(warm: Sandbox) -> None:
    key = fresh_key("forged")
    assert run(warm, key)["runs"] == 1
    assert run(warm, key, forge=True)["runs"] == 2
    burnt = warm.run(SCRIPT, {"input": {"burn": True}}, 5.0, reuse=key)
    assert burnt.ok and burnt.result["runs"] == 3 and burnt.pid is not None
    eventually(lambda: not alive(burnt.pid), timeout=10, what="the process that left a thread and a child retired")
    assert run(warm, key)["runs"] == 1


def test_a_parked_process_is_stopped_and_one_continued_meanwhile_is_retired(warm: Sandbox) -> None:
    key = fresh_key("stopped")
    assert run(warm, key)["runs"] == 1
    parked = warm._warm.take((key, LIMITS))  # type: ignore[union-attr]  # the pool keys by limits too
    assert parked is not None and parked.run_pid is not None
    assert psutil.Process(parked.run_pid).status() == psutil.STATUS_STOPPED
    warm._warm.park(parked)  # type: ignore[union-attr]
    os.kill(parked.run_pid, signal.SIGCONT)  # a fault from outside: something woke it while it waited
    assert run(warm, key)["runs"] == 1


def test_every_run_of_a_warm_process_gets_its_whole_cpu_budget() -> None:
    # A hard CPU limit of 8 s for the process's whole life (6 s + 1 s grace + 1), a budget of 6 s per run (4 s
    # soft + 1 s grace + 1): after a run that used 2.5 s, the process has less than a run's budget left.
    box = make(max_seconds=6.0)
    try:
        if not box.isolation.get("namespaces"):
            pytest.skip("no per-run namespaces here")
        key = fresh_key("cpu-budget")
        left = [run(box, key, soft=4.0, spin=spin)["cpu_left"] for spin in (2.5, 0)]
        assert min(left) >= 5.9, left
    finally:
        box.stop()


def test_tidying_up_after_the_answer_does_not_count_against_the_run(warm: Sandbox) -> None:
    key = fresh_key("slow-tidy")
    started = time.monotonic()
    assert run(warm, key, soft=1.0, slow_tidy=4.0)["runs"] == 1  # answered before its /tmp was emptied
    assert time.monotonic() - started < 4.0
    assert run(warm, key)["runs"] == 1  # it did not say ready in time: retired


def test_changed_resource_limits_are_not_kept(warm: Sandbox) -> None:
    key = fresh_key("stack")
    assert run(warm, key, stack=True)["runs"] == 1
    assert run(warm, key)["runs"] == 1


def test_a_pending_signal_is_discarded_before_the_next_run(warm: Sandbox) -> None:
    key = fresh_key("pending")
    assert run(warm, key, pend=True)["runs"] == 1
    after = run(warm, key)
    assert after["runs"] == 2 and after["pending"] == []


def test_a_run_waiting_for_a_slot_evicts_one_warm_process_only() -> None:
    box = make(slots=3)
    try:
        if not box.isolation.get("namespaces"):
            pytest.skip("no per-run namespaces here")
        for name in "abc":
            assert run(box, fresh_key(name))["runs"] == 1
        clear = box._containment.clear

        def slow_clear(slot: int) -> None:  # a fault: a slot whose clean-up takes long (many processes to kill)
            time.sleep(0.5)
            clear(slot)

        box._containment.clear = slow_clear  # type: ignore[method-assign]
        assert run(box, fresh_key("d"))["runs"] == 1  # a's process, the least recently used, made way
        assert run(box, fresh_key("b"))["runs"] == 2 and run(box, fresh_key("c"))["runs"] == 2
    finally:
        box.stop()


def test_the_workflow_cpu_limit_holds_where_cgroups_do_not_count_cpu() -> None:
    box = make(limits=SandboxLimits(**{**LIMITS.__dict__, "cpu_seconds": 1}))
    try:
        cgroups = box._containment.cgroups
        if not box.isolation.get("namespaces") or cgroups is None:
            pytest.skip("no per-run namespaces or no cgroups here")
        cgroups.cpu_seconds = lambda slot: None  # type: ignore[method-assign]  # as cgroup v1 without cpuacct
        outcome = box.run(SCRIPT, {"input": {"lift_cpu": True, "spin": 4}}, 10.0, reuse=fresh_key("no-cpuacct"))
        assert isinstance(outcome.error, SandboxError) and "CPU" in str(outcome.error), outcome.error
    finally:
        box.stop()


def test_a_process_that_computes_after_its_answer_is_not_kept(warm: Sandbox) -> None:
    key = fresh_key("hijack")
    first = warm.run(HIJACK, {"input": {"hijack": 0.6}}, 5.0, reuse=key)
    assert first.error is None and first.result == {"hijacked": False}
    eventually(lambda: not warm._warm._settling, timeout=10, what="the process parked or retired")  # type: ignore
    after = warm.run(HIJACK, {"input": {}}, 5.0, reuse=key)
    assert after.error is None and after.result == {"hijacked": False}  # a fresh process, not the script's loop


def test_a_partial_ready_holds_up_no_other_process(warm: Sandbox) -> None:
    stalled = warm.run(HIJACK, {"input": {"hijack": "partial"}}, 5.0, reuse=fresh_key("partial"))
    assert stalled.error is None
    key = fresh_key("beside-partial")
    assert [run(warm, key)["runs"] for _ in range(2)] == [1, 2]  # settled while the other one still waits


def test_the_cpu_limit_counts_a_child_forked_by_a_thread_where_cgroups_do_not_count_cpu() -> None:
    box = make(limits=SandboxLimits(**{**LIMITS.__dict__, "cpu_seconds": 1}))
    try:
        cgroups = box._containment.cgroups
        if not box.isolation.get("namespaces") or cgroups is None:
            pytest.skip("no per-run namespaces or no cgroups here")
        cgroups.cpu_seconds = lambda slot: None  # type: ignore[method-assign]  # as cgroup v1 without cpuacct
        outcome = box.run(SCRIPT, {"input": {"lift_cpu": True, "thread_child": 4}}, 10.0, reuse=fresh_key("thr"))
        assert isinstance(outcome.error, SandboxError) and "CPU" in str(outcome.error), outcome.error
    finally:
        box.stop()


def test_a_run_whose_budget_is_the_longest_is_not_parked() -> None:
    box = make(max_seconds=6.0)  # a hard CPU limit of 8 s; a run of 6 s soft has a budget of 8 s too
    try:
        if not box.isolation.get("namespaces"):
            pytest.skip("no per-run namespaces here")
        assert run(box, soft=6.0)["runs"] == 1
        assert box._warm is not None and not box._warm._settling and len(box._warm) == 0
    finally:
        box.stop()


def test_a_lowered_hard_cpu_limit_retires_the_process(warm: Sandbox) -> None:
    key = fresh_key("lower-cpu")
    assert run(warm, key)["runs"] == 1
    assert run(warm, key, forge=True, lower_cpu=True)["runs"] == 2  # its tidying forged to say all is well
    assert run(warm, key)["runs"] == 1


def test_a_process_not_in_a_pid_namespace_of_its_own_is_never_stopped() -> None:
    # A stranger in the place of a run (its pid reused, say) cannot be made for real: a parent and its child.
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '30'])"])
    children: list[psutil.Process] = []
    try:
        children = eventually(lambda: psutil.Process(parent.pid).children(), timeout=10, what="the child")
        ours, theirs = socket.socketpair()
        process = RunProcess(0, None, "/tmp", pid=parent.pid, sock=ours, pidfd=os.pidfd_open(parent.pid))
        assert not answered(process, 1) and not freeze(process, None)
        assert children[0].status() != psutil.STATUS_STOPPED
        for done in (process.close, ours.close, theirs.close):
            done()
    finally:
        for started in [*children, psutil.Process(parent.pid)]:
            started.kill()
        parent.wait(10)
