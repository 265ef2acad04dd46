"""Sandbox rows of the benchmark: what isolation adds per run, warm and cold, and many runs waiting at once.

    python bench/sandbox_bench.py [--runs 400]      (the per-run rows alone; as root for a uid per slot)

``bench/bench.py`` prints these rows too, with the concurrency row measured
against its stack.
"""
from __future__ import annotations

import argparse
import http.client
import json
import marshal
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT))
from flowpool.devstack import Stack  # noqa: E402
from flowpool.redis_server import RedisServer  # noqa: E402
from flowpool.sandbox import Sandbox, SandboxLimits  # noqa: E402
from flowpool.sandbox.backends import bwrap_binary, bwrap_command, probe_bwrap  # noqa: E402
from flowpool.sandbox.staging import stage_runtime  # noqa: E402
from flowpool.procs import set_parent_death_signal  # noqa: E402

NOOP = marshal.dumps(compile("def execute(ctx):\n    return {'ok': True}\n", "workflow.py", "exec"))
# Away from the workers' uids (61000 on): a bench beside a dev stack must not share them.
UID_BASE = 141000
PAUSE = 0.02
FLOOR = "bare fork of a warm interpreter (floor)"


def _p50(samples: list[float]) -> float:
    return statistics.median(samples)


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def _timed(call: Callable[[], object], n: int, warmup: int = 5, pause: float = 0.0) -> list[float]:
    """Milliseconds of ``n`` calls, ``pause`` seconds apart (not counted)."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        time.sleep(pause)
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


BARE_FORK = """
import gc, json, os, sys, time
import flowpool.sandbox.runtime  # as warm as the zygote: the runtime imported, the heap frozen
gc.collect(); gc.freeze()
samples = []
for _ in range(int(sys.argv[1])):
    time.sleep(float(sys.argv[2]))
    start = time.perf_counter()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, b"x")
        os._exit(0)
    os.read(read_end, 1)
    os.close(read_end)
    os.close(write_end)
    os.waitpid(pid, 0)
    samples.append((time.perf_counter() - start) * 1000)
print(json.dumps(samples))
"""


def bare_forks(n: int, pause: float) -> list[float]:
    """The floor: fork a warm interpreter of the zygote's size, hear one byte from the child, reap it.

    Measured in a fresh interpreter, not here: a fork costs with the parent's
    size, and this process holds four sandboxes' worth of threads and state.
    """
    done = subprocess.run([sys.executable, "-I", "-c", BARE_FORK, str(n), str(pause)],
                          capture_output=True, check=True, timeout=300)
    return json.loads(done.stdout)


def sandbox_rows(n: int) -> None:
    """Per-run cost of each backend: prestarted (warm), forked on demand, and a cold interpreter start."""
    backends = ["process"]
    problem = probe_bwrap(bwrap_binary())
    if problem is None:
        backends.append("bwrap")
    else:
        print(f"(bwrap rows skipped: {problem})", file=sys.stderr)
    rows: list[tuple[str, list[float]]] = []
    uid_base = UID_BASE if os.geteuid() == 0 else None
    boxes = {}
    for backend in backends:
        for prestart in (2, 0):
            box = Sandbox(SandboxLimits(), slots=4, uid_base=uid_base, prestart=prestart, backend=backend)
            box.start()
            boxes[(backend, prestart)] = box
    warm_up = ["-I", "-c", "import flowpool.sandbox.runtime"]
    cold = {"process": [sys.executable, *warm_up]}
    if "bwrap" in backends:
        stage = stage_runtime()  # under bwrap the interpreter runs from the staged runtime
        cold["bwrap"] = bwrap_command(str(bwrap_binary()), stage) + [stage.interpreter, *warm_up]
    try:
        samples: dict[str, list[float]] = {}

        def add(name: str, call: Callable[[], object], count: int, pause: float = 0.0) -> None:
            samples.setdefault(name, []).extend(_timed(call, count, warmup=2, pause=pause))

        def run_in(box: Sandbox) -> Callable[[], object]:
            def call() -> None:
                outcome = box.run(NOOP, {}, 10)
                if not outcome.ok:
                    raise RuntimeError(outcome.error)
            return call

        for _ in range(5):  # interleaved rounds: a noisy moment weighs on every row alike
            # Runs 20 ms apart, as a worker's runs are while it is not saturated: the prestarted process
            # a run used is replaced in the background meanwhile (the burst rows say what happens when not).
            samples.setdefault(FLOOR, []).extend(bare_forks(n // 5, PAUSE))
            for backend in backends:
                add(f"{backend}: warm (prestarted run process)", run_in(boxes[(backend, 2)]), n // 5, pause=PAUSE)
                add(f"{backend}: forked from the zygote on demand", run_in(boxes[(backend, 0)]), n // 10,
                    pause=PAUSE)
                add(f"{backend}: cold interpreter start",
                    lambda command=cold[backend]: subprocess.run(command, check=True), max(2, n // 50))
        rows = list(samples.items())
    finally:
        for box in boxes.values():
            box.stop()
    floor = _p50(samples[FLOOR])
    print()
    print(f"{'sandbox row (one no-op run)':<48} {'p50 ms':>8} {'p99 ms':>8} {'added p50 ms':>12} {'x floor':>8}")
    for name, values in rows:
        print(f"{name:<48} {_p50(values):>8.3f} {_p99(values):>8.3f} {_p50(values) - floor:>12.3f} "
              f"{_p50(values) / floor:>8.1f}")
    print("target: warm bwrap adds at most 2 ms p50 over a bare fork")


WAIT_ON_MODEL = """
def execute(ctx):
    reply = ctx.chat.completions.create(application="waits", intent="answer",
                                        messages=[{"role": "user", "content": str(ctx.input)}])
    return reply["choices"][0]["message"]["content"]
"""


def _tree_pss(root: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants, in bytes (shared pages counted once)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def concurrency_row(api: str, key: str, provider_url: str, worker: psutil.Process, runs: int = 200,
                    wait_ms: int = 1000, label: str = "") -> None:
    """``runs`` invokes at once, each waiting ``wait_ms`` on a model call, through one worker."""
    session = requests.Session()
    session.headers["x-api-key"] = key
    session.put(api + "/api/v1/applications/waits",
                json={"intents": {"answer": {"model": f"slow-{wait_ms}", "base_url": provider_url}}}).raise_for_status()
    session.post(api + "/api/v1/workflows/upload",
                 json={"workflow_ref_name": "waits", "script": WAIT_ON_MODEL}).raise_for_status()
    idle = _tree_pss(worker)
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        # A few samples while runs wait, not a steady stream: reading the PSS of hundreds of processes
        # costs a tenth of a second of CPU each time, which the runs would feel.
        for at in (0.8, 1.4, 2.0):
            if done.wait(max(0.0, started + at - time.perf_counter())):
                return
            peak[0] = max(peak[0], _tree_pss(worker))

    results: list[int] = []
    barrier = threading.Barrier(runs + 1)
    host, port = api.split("//")[1].split(":")

    def invoke(i: int) -> None:
        # http.client rather than requests: the clients share this process's GIL with each other.
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"model": "workflow:waits", "input": i, "cache": False})
        barrier.wait()
        connection.request("POST", "/workflow/chat/completions", body,
                           {"x-api-key": key, "Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        results.append(response.status)
        connection.close()

    threads = [threading.Thread(target=invoke, args=(i,)) for i in range(runs)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    ok = sum(1 for status in results if status == 200)
    print()
    print(f"{runs} runs at once{label}, each waiting {wait_ms} ms on a model call, one worker: {ok}/{runs} answered 200 "
          f"in {elapsed:.2f} s; worker memory (PSS of the worker, its zygote and runs): {idle / 2**20:.0f} MiB idle, "
          f"{peak[0] / 2**20:.0f} MiB at most while they waited")


class ProviderProcess:
    """The stand-in vendor in a process of its own, so hundreds of waiting calls do not share the bench's GIL."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
             "from tests.provider import StandInProvider; p = StandInProvider().start(); "
             "print(p.base_url, flush=True); time.sleep(1e9)", str(ROOT)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=set_parent_death_signal)
        assert self._process.stdout is not None
        self.base_url = self._process.stdout.readline().decode().strip()

    def stop(self) -> None:
        self._process.kill()
        self._process.wait()


def waiting_runs_row(redis_url: str, key: str, runs: int) -> None:
    """The concurrency row, against a stack of one worker holding ``runs`` at once, on ``redis_url``."""
    provider = ProviderProcess()
    stack = Stack(env={"FLOWPOOL_LOG_LEVEL": "WARNING", "FLOWPOOL_EGRESS_ALLOW": "127.0.0.1/32",
                       "FLOWPOOL_WORKER_CONCURRENCY": str(runs)}, redis_url=redis_url)
    try:
        worker = stack.start_worker(quiet=True)
        api = stack.start_api(quiet=True)
        stack.wait_ready()
        # The first burst meets a fresh stack: every Redis connection the API and the worker will hold
        # open is made during it. The second is the steady state of a stack that has served traffic.
        concurrency_row(api, key, provider.base_url, psutil.Process(worker.pid), runs=runs,
                        label=" (a fresh stack)")
        concurrency_row(api, key, provider.base_url, psutil.Process(worker.pid), runs=runs,
                        label=" (again, connections warm)")
        print("target: all done within 4 s")
    finally:
        stack.stop()
        provider.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="runs per warm row")
    parser.add_argument("--waiting-runs", type=int, default=200,
                        help="runs at once, each waiting 1 s on a model call, through one worker")
    args = parser.parse_args()
    redis_server = RedisServer().start()
    try:
        key = Stack(redis_url=redis_server.url).create_account("bench")
        waiting_runs_row(redis_server.url, key, args.waiting_runs)
    finally:
        redis_server.stop()
    sandbox_rows(args.runs)


if __name__ == "__main__":
    main()
