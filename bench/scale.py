"""Horizontal scale on one machine: 1, 2, 4... flowpool workers on one Redis, beside bare Celery.

    python bench/scale.py [--workers 1,2,4] [--seconds 8] [--clients 64] [--io-clients 384]

Starts one Redis, the API (gunicorn, --api-workers processes) and N `flowpool
worker` processes, each with its own TMPDIR, FLOWPOOL_CACHE_DIR and block of
sandbox uids, as separate hosts would have. For each N it measures:

- no-op runs/s: --clients client threads, each invoking a no-op workflow in a
  loop (cache off, a distinct input per call);
- I/O-bound runs/s: 48 client threads per worker (at most --io-clients),
  each invoking a workflow that sleeps 0.5 s; ideal = clients / 0.5 s;
- CPU per no-op run of the API, the workers (whole process trees, reaped run
  processes included), Redis and the clients (bench/cpu.py);
- bare Celery with N worker processes of the same pool and concurrency on the
  same Redis, driven by as many client threads, a round trip per call.

Clients run in --client-processes processes of their own, so the client's GIL
is not the bottleneck; their CPU counts against the machine all the same, and
is reported. Nothing here is a test: read the ratios and the CPU per run.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import requests  # noqa: E402

from cpu import CpuMeter  # noqa: E402
from flowpool.devstack import Stack  # noqa: E402
from flowpool.procs import set_parent_death_signal  # noqa: E402
from flowpool.redis_server import RedisServer  # noqa: E402

NOOP = "def execute(ctx):\n    return {'ok': True}\n"
SLEEP_SECONDS = 0.5
SLEEPS = f"import time\n\ndef execute(ctx):\n    time.sleep({SLEEP_SECONDS})\n    return {{'ok': True}}\n"
IO_CLIENTS_PER_WORKER = 48
UID_MARGIN = 16  # beyond a worker's sandbox slots (twice its concurrency) and its prestarted processes


# --- clients (run in processes of their own) -------------------------------------------------------------

def _invoke_caller(url: str, key: str, model: str, thread: int) -> Any:
    """A call of ``model`` over one keep-alive connection, with a distinct input each time (no cache hit)."""
    host, port = url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"x-api-key": key, "Content-Type": "application/json"}
    counter = itertools.count()

    def call() -> None:
        body = json.dumps({"model": model, "input": {"t": thread, "n": next(counter)}, "cache": False})
        connection.request("POST", "/workflow/chat/completions", body, headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {data[:200]!r}")

    return call


def _bare_caller() -> Any:
    import bare_celery  # reads BENCH_REDIS_URL, set before the client processes started

    def call() -> None:
        bare_celery.noop.delay().get(timeout=120)

    return call


def drive(spec: dict[str, Any]) -> tuple[int, int, float, str]:
    """In a client process: ``spec["threads"]`` threads call in a loop; the calls completed between
    start_at and stop_at (wall clock), the calls that failed, and this process's CPU-seconds in that window."""
    counts = [0] * spec["threads"]
    failures: list[str] = []

    def loop(i: int) -> None:
        try:
            call = _bare_caller() if spec["kind"] == "bare" else \
                _invoke_caller(spec["url"], spec["key"], spec["model"], spec["first_thread"] + i)
            call()  # warm: the connection is open before the window starts
        except Exception as exc:  # noqa: BLE001 (reported, not raised: one bad client must not hide the rest)
            failures.append(repr(exc))
            return
        time.sleep(max(0.0, spec["start_at"] - time.time()))
        while time.time() < spec["stop_at"]:
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                failures.append(repr(exc))
                return
            if spec["start_at"] <= time.time() <= spec["stop_at"]:
                counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(spec["threads"])]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, spec["start_at"] - time.time()))
    cpu_start = time.process_time()
    time.sleep(max(0.0, spec["stop_at"] - time.time()))
    cpu = time.process_time() - cpu_start
    for thread in threads:
        thread.join(150)
    return sum(counts), len(failures), cpu, failures[0] if failures else ""


# --- the measuring process -----------------------------------------------------------------------------

@dataclass
class Phase:
    """What one measured window gave."""
    runs: int
    seconds: float
    failures: int
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


class Clients:
    """Client threads spread over processes of their own."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool = multiprocessing.get_context("spawn").Pool(processes)

    def run(self, kind: str, threads: int, seconds: float, meter: CpuMeter, url: str = "", key: str = "",
            model: str = "", settle: float = 4.0) -> Phase:
        """``threads`` clients calling for ``seconds``, after ``settle`` seconds of warming up; CPU per run
        of each group of ``meter`` and of the clients."""
        start_at = time.time() + settle
        stop_at = start_at + seconds
        shares = [threads // self.processes + (1 if i < threads % self.processes else 0)
                  for i in range(self.processes)]
        specs = [{"kind": kind, "url": url, "key": key, "model": model, "threads": n,
                  "first_thread": sum(shares[:i]), "start_at": start_at, "stop_at": stop_at}
                 for i, n in enumerate(shares) if n]
        pending = self.pool.map_async(drive, specs)
        time.sleep(max(0.0, start_at - time.time()))
        meter.start()
        time.sleep(max(0.0, stop_at - time.time()))
        spent = meter.stop()
        results = pending.get(timeout=seconds + settle + 300)
        runs = sum(r[0] for r in results)
        failures = sum(r[1] for r in results)
        if failures:
            print(f"  {kind}: {failures} failed calls, e.g. {next(r[3] for r in results if r[3])}", file=sys.stderr)
        spent["client"] = sum(r[2] for r in results)
        return Phase(runs, seconds, failures, CpuMeter.per_run_ms(spent, runs))

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def start_bare_workers(n: int, concurrency: int, redis_url: str) -> list[subprocess.Popen[bytes]]:
    """``n`` bare Celery worker processes (the thread pool, as flowpool's), answering pings once listening."""
    import bare_celery

    env = {**os.environ, "BENCH_REDIS_URL": redis_url,
           "PYTHONPATH": str(ROOT / "bench") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bare_celery", "worker", "--pool", "threads", "-c", str(concurrency),
         "--loglevel", "WARNING", "-Q", "bare", "-n", f"bare{i}@%h", "--without-gossip", "--without-mingle"],
        env=env, cwd=ROOT / "bench", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=set_parent_death_signal) for i in range(n)]
    deadline = time.monotonic() + 60
    while len(bare_celery.app.control.ping(timeout=1.0) or []) < n:
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            raise RuntimeError("the bare Celery workers did not start")
    return workers


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts, measured in turn")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measured window")
    parser.add_argument("--clients", type=int, default=64, help="client threads for the no-op and bare rows")
    parser.add_argument("--io-clients", type=int, default=384,
                        help=f"most client threads of the I/O-bound row ({IO_CLIENTS_PER_WORKER} per worker)")
    parser.add_argument("--api-workers", type=int, default=2, help="API processes (FLOWPOOL_API_WORKERS)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="runs per worker (default FLOWPOOL_WORKER_CONCURRENCY's default)")
    parser.add_argument("--client-processes", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                        help="processes the client threads are spread over")
    parser.add_argument("--uid-base", type=int, default=61000, help="the first worker's FLOWPOOL_SANDBOX_UID_BASE")
    parser.add_argument("--log", default=None, help="a file for the API's and the workers' output (default: dropped)")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.workers.split(",")})

    from flowpool.settings import Settings

    concurrency = args.concurrency or Settings.model_fields["worker_concurrency"].default
    uid_block = 2 * concurrency + UID_MARGIN
    redis_server = RedisServer().start()
    # Before the client processes start: they inherit it, and bare_celery reads it as it is imported.
    os.environ["BENCH_REDIS_URL"] = redis_server.url
    clients = Clients(args.client_processes)
    scratch = tempfile.TemporaryDirectory(prefix="flowpool-scale-")
    log = open(args.log, "ab") if args.log else None  # noqa: SIM115 (closed with the stack, below)
    quiet = log is None
    stack = Stack(env={"FLOWPOOL_LOG_LEVEL": "WARNING", "FLOWPOOL_API_WORKERS": str(args.api_workers),
                       "FLOWPOOL_WORKER_CONCURRENCY": str(concurrency)}, redis_url=redis_server.url, output=log)
    rows: list[dict[str, Any]] = []
    try:
        api_url = stack.start_api(quiet=quiet)
        api = stack.processes[-1]
        workers: list[subprocess.Popen[bytes]] = []
        key = ""
        print(f"{os.cpu_count()} CPUs; API processes {args.api_workers}; worker concurrency {concurrency}; "
              f"{args.clients} clients in {args.client_processes} processes; {args.seconds:g} s windows",
              file=sys.stderr, flush=True)
        for n in counts:
            while len(workers) < n:
                # Each worker as on a host of its own: its temporary files, its replicas, its uids.
                home = Path(scratch.name) / f"worker{len(workers)}"
                (home / "tmp").mkdir(parents=True)
                workers.append(stack.start_worker("--name", f"flowpool@scale{len(workers)}", quiet=quiet, env={
                    "TMPDIR": str(home / "tmp"), "FLOWPOOL_CACHE_DIR": str(home / "cache"),
                    "FLOWPOOL_SANDBOX_UID_BASE": str(args.uid_base + len(workers) * uid_block)}))
            stack.wait_ready(timeout=180, workers=n)
            if not key:
                key = stack.create_account("scale")
                for ref, script in (("noop", NOOP), ("sleeps", SLEEPS)):
                    requests.post(api_url + "/api/v1/workflows/upload", headers={"x-api-key": key}, timeout=30,
                                  json={"workflow_ref_name": ref, "script": script}).raise_for_status()
            meter = CpuMeter({"api": [api.pid], "workers": [w.pid for w in workers],
                              "redis": [redis_server.process.pid]})  # type: ignore[union-attr]
            print(f"{n} worker(s): no-op...", file=sys.stderr, flush=True)
            noop = clients.run("invoke", args.clients, args.seconds, meter, api_url, key, "workflow:noop")
            io_clients = min(IO_CLIENTS_PER_WORKER * n, args.io_clients)
            print(f"{n} worker(s): I/O-bound, {io_clients} clients...", file=sys.stderr, flush=True)
            io = clients.run("invoke", io_clients, args.seconds, meter, api_url, key, "workflow:sleeps",
                             settle=4.0 + 2 * SLEEP_SECONDS)
            print(f"{n} worker(s): bare Celery...", file=sys.stderr, flush=True)
            bare_workers = start_bare_workers(n, concurrency, redis_server.url)
            try:
                bare = clients.run("bare", args.clients, args.seconds,
                                   CpuMeter({"workers": [w.pid for w in bare_workers],
                                             "redis": [redis_server.process.pid]}))  # type: ignore[union-attr]
            finally:
                stop_processes(bare_workers)
            rows.append({"n": n, "noop": noop, "io": io, "io_clients": io_clients, "bare": bare})
            print(row_line(rows[-1]), file=sys.stderr, flush=True)
    finally:
        clients.close()
        stack.stop(timeout=30)
        redis_server.stop()
        scratch.cleanup()
        if log is not None:
            log.close()
    print(f"\n{os.cpu_count()} CPUs; API processes {args.api_workers}; worker concurrency {concurrency}; "
          f"{args.clients} clients ({args.client_processes} client processes); {args.seconds:g} s windows; "
          f"I/O-bound: {IO_CLIENTS_PER_WORKER} clients per worker (at most {args.io_clients}), "
          f"{SLEEP_SECONDS} s sleep\n")
    print("| workers | no-op runs/s | bare Celery tasks/s | ratio | I/O-bound runs/s (ideal) | worker CPU ms/run "
          "| API CPU ms/run | Redis CPU ms/run | client CPU ms/run | bare worker CPU ms/task |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(row_line(row))


def row_line(row: dict[str, Any]) -> str:
    """One row of the table."""
    noop, io, bare = row["noop"], row["io"], row["bare"]
    ideal = row["io_clients"] / SLEEP_SECONDS
    failed = f" ({noop.failures + io.failures + bare.failures} failed calls)" \
        if noop.failures + io.failures + bare.failures else ""
    return (f"| {row['n']} | {noop.rate:,.0f} | {bare.rate:,.0f} | {noop.rate / bare.rate:.2f} "
            f"| {io.rate:,.0f} ({ideal:,.0f}) | {noop.cpu_ms['workers']:.2f} | {noop.cpu_ms['api']:.2f} "
            f"| {noop.cpu_ms['redis']:.2f} | {noop.cpu_ms['client']:.2f} | {bare.cpu_ms['workers']:.2f} |{failed}")


if __name__ == "__main__":
    main()
