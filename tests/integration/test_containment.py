"""A run's limits hold for all its processes together: memory, process count, CPU time; on each containment mode.

Real runs in a real sandbox, each test bounded itself: every run process
keeps its own address-space limit (so a containment bug costs at most the
few children times that), runs end at their hard time limit, and the tests
have their own timeout.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import threading
from collections.abc import Iterator

import psutil
import pytest

from flowpool.errors import MemoryLimitExceeded, SandboxError
from flowpool.sandbox import RunOutcome, Sandbox, SandboxLimits
from tests.conftest import SESSION_PIDS
from tests.helpers import compiled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0, reason="cgroups and a uid per slot need root")]

LIMITS = SandboxLimits(memory_bytes=256 << 20, processes=16, open_files=64, file_bytes=1 << 20, tmp_bytes=8 << 20)
CHILDREN = 8
# Away from the workers' uids and the other sandbox tests' (their sweeps would kill our runs).
UID_BASE = 116000

# Eight children each touch 100 MiB, 2 MiB at a time, and hold it: 800 MiB in all, under a 256 MiB limit.
MANY_CHILDREN = f"""
import os
import time

def execute(ctx):
    children = []
    for _ in range({CHILDREN}):
        pid = os.fork()
        if pid == 0:
            try:
                held = []
                for _ in range(50):
                    held.append(b"x" * (2 << 20))
                    time.sleep(0.02)
                time.sleep(30)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return "all children finished"
"""

FORKS_UNTIL_REFUSED = """
import os
import time

def execute(ctx):
    children, refused = [], None
    for _ in range(64):
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
    return {"children": len(children), "refused": refused}
"""

# Four children spin until something stops them; each alone stays under its own CPU limit for a while.
SPINNING_CHILDREN = """
import os

def execute(ctx):
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            while True:
                pass
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return "children died"
"""


def pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next(int(line.split()[1]) << 10 for line in handle if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


class MemoryWatcher:
    """Samples, from outside, the summed PSS of every process under the sandbox's uids; keeps the most seen."""

    def __init__(self, uids: range) -> None:
        self._uids = set(uids)
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            pids = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real in self._uids]
            self.most = max(self.most, sum(pss(pid) for pid in pids))

    def __enter__(self) -> MemoryWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def has_cgroups(box: Sandbox) -> bool:
    return box.run_limits.startswith("run limits: cgroup")


def cgroup_dirs() -> set[str]:
    """The sandboxes' parent cgroups on this host (v1 pids hierarchy), by path."""
    found = set()
    for top, dirs, _ in os.walk("/sys/fs/cgroup/pids"):
        found |= {os.path.join(top, d) for d in dirs if d.startswith(f"flowpool-{os.getpid()}-")}
    return found


@pytest.fixture(scope="module", params=["auto", "off"], ids=["cgroups", "watchdog"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    box = Sandbox(LIMITS, slots=2, uid_base=UID_BASE, hard_grace_seconds=1.0, prestart=1, cgroups=request.param)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    box.start()
    # The module's zygote (and a bwrap above it) outlive each test on purpose.
    kept = {p.pid for p in me.children(recursive=True)} - before
    SESSION_PIDS.update(kept)
    try:
        if request.param == "auto" and not has_cgroups(box):
            pytest.skip(f"no usable cgroup here: {box.run_limits}")
        yield box
    finally:
        box.stop()
        SESSION_PIDS.difference_update(kept)


def run(sandbox: Sandbox, source: str, soft_seconds: float = 20, limits: SandboxLimits | None = None) -> RunOutcome:
    return sandbox.run(compiled(source), {}, soft_seconds, limits=limits)


def test_the_sandbox_says_how_runs_are_bounded_as_a_whole(sandbox: Sandbox) -> None:
    if has_cgroups(sandbox):
        assert "memory, pids, cpu" in sandbox.run_limits
        assert not any("run limits" in weakness for weakness in sandbox.weaknesses)
    else:
        assert "run limits: per-process rlimits + memory watchdog" in sandbox.run_limits
        assert any("memory watchdog" in weakness for weakness in sandbox.weaknesses)
    assert sandbox.run_limits in sandbox.describe()


def test_children_together_over_the_memory_limit_end_the_run_and_the_next_run_is_served(sandbox: Sandbox) -> None:
    assert sandbox.uid_range is not None
    with MemoryWatcher(sandbox.uid_range) as watcher:
        outcome = run(sandbox, MANY_CHILDREN)

    error = outcome.error
    assert isinstance(error, MemoryLimitExceeded), error
    assert (error.status, error.type) == (500, "memory_limit")
    assert "256 MiB memory limit (all its processes together)" in error.message
    # 800 MiB were asked for; the kernel holds a cgroup to its limit, the watchdog to about a tick's allocations.
    slack = 32 << 20 if has_cgroups(sandbox) else 128 << 20
    assert watcher.most <= LIMITS.memory_bytes + slack, watcher.most >> 20
    follow = run(sandbox, "def execute(ctx):\n    return {'still': 'here'}\n")
    assert follow.ok, follow.error
    assert follow.result == {"still": "here"}


def test_spinning_children_together_over_the_cpu_limit_end_the_run(sandbox: Sandbox) -> None:
    outcome = run(sandbox, SPINNING_CHILDREN, limits=dataclasses.replace(LIMITS, cpu_seconds=2))

    assert isinstance(outcome.error, SandboxError), outcome.error
    assert "CPU time limit (2s, all its processes together)" in outcome.error.message


# Three children hold 48 MiB each at once for a moment, then exit: 144 MiB together.
THREE_CHILDREN_HOLD_A_MOMENT = """
import os
import time

def execute(ctx):
    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                held = [b"x" * (2 << 20) for _ in range(24)]
                time.sleep(0.5)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return "held"
"""


def test_each_run_in_a_slot_is_held_to_its_own_memory_limit_as_limits_alternate() -> None:
    # One slot, no prestart: every run's process is forked for it, under the limits of that run.
    box = Sandbox(LIMITS, slots=1, uid_base=UID_BASE + 200, hard_grace_seconds=1.0, prestart=0)
    box.start()
    try:
        small = dataclasses.replace(LIMITS, memory_bytes=128 << 20)
        outcomes = [run(box, THREE_CHILDREN_HOLD_A_MOMENT, limits=limits)
                    for limits in (small, LIMITS, small, LIMITS)]
    finally:
        box.stop()

    assert [type(outcome.error).__name__ if outcome.error else outcome.result for outcome in outcomes] == [
        "MemoryLimitExceeded", "held", "MemoryLimitExceeded", "held"]


def test_the_process_limit_holds_for_the_run_as_a_whole_without_a_uid_of_its_own() -> None:
    # Without a uid per slot (RLIMIT_NPROC counts nothing for root), only the run's cgroup counts its processes.
    box = Sandbox(LIMITS, slots=1, hard_grace_seconds=1.0, prestart=0)
    box.start()
    try:
        if not has_cgroups(box):
            pytest.skip(f"no usable cgroup here: {box.run_limits}")
        outcome = run(box, FORKS_UNTIL_REFUSED, soft_seconds=10)
    finally:
        box.stop()

    assert outcome.ok, outcome.error
    assert outcome.result["refused"] == "BlockingIOError"
    assert 0 < outcome.result["children"] <= LIMITS.processes - 1


def test_the_cgroups_and_what_runs_left_in_them_are_gone_after_stop() -> None:
    before = cgroup_dirs()
    box = Sandbox(LIMITS, slots=2, uid_base=UID_BASE + 100, hard_grace_seconds=1.0, prestart=1)
    box.start()
    try:
        if not has_cgroups(box):
            pytest.skip(f"no usable cgroup here: {box.run_limits}")
        made = cgroup_dirs() - before
        assert len(made) == 1
        (parent,) = made
        assert {"slot-0", "slot-1", "slot-2"} <= set(os.listdir(parent))
        outcome = run(box, "def execute(ctx):\n    return open('/proc/self/cgroup').read()\n", soft_seconds=10)
        assert outcome.ok, outcome.error
        assert "/slot-" in outcome.result
    finally:
        box.stop()

    assert not os.path.exists(parent)
    assert cgroup_dirs() - before == set()


EMITS_AND_CALLS_NOTHING = """
def execute(ctx):
    for n in range(3):
        ctx.emit("progress", n)
    return "served"
"""


def test_a_worker_with_descriptors_past_1024_still_serves_runs() -> None:
    # A worker with hundreds of slots holds each slot's cgroup files, pidfd and channel: its descriptors pass
    # 1024, where select() refuses them. Taken here by opening that many before the sandbox starts.
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    box = Sandbox(LIMITS, slots=2, uid_base=UID_BASE + 300, hard_grace_seconds=1.0, prestart=1)
    try:
        box.start()
        chunks: list[object] = []
        outcomes = [box.run(compiled(EMITS_AND_CALLS_NOTHING), {}, 10, on_emit=lambda t, c: chunks.append(c),
                            on_idle=lambda: None) for _ in range(3)]
    finally:
        box.stop()
        for fd in filler:
            os.close(fd)

    assert [outcome.result if outcome.ok else repr(outcome.error) for outcome in outcomes] == ["served"] * 3
    assert chunks == [0, 1, 2] * 3


def test_the_sandbox_raises_its_soft_limit_of_open_files_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    box = Sandbox(LIMITS, slots=1, uid_base=UID_BASE + 400, hard_grace_seconds=1.0, prestart=0)
    try:
        box.start()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        # A run keeps its own, much lower, limit.
        outcome = run(box, "import resource\n\ndef execute(ctx):\n"
                           "    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n")
        assert outcome.ok and outcome.result == LIMITS.open_files, outcome.error
    finally:
        box.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_runs_sharing_the_workers_uid_without_bwrap_are_a_weakness_when_cgroups_bound_them() -> None:
    # The process backend leaves /sys/fs/cgroup visible; with the worker's own uid a run owns its slot's files.
    box = Sandbox(LIMITS, slots=1, hard_grace_seconds=1.0, prestart=0, backend="process")
    box.start()
    try:
        if not has_cgroups(box):
            pytest.skip(f"no usable cgroup here: {box.run_limits}")
        assert any("could lift its own limits" in weakness for weakness in box.weaknesses), box.weaknesses
    finally:
        box.stop()
