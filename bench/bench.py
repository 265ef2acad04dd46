"""flowpool's benchmark: its hot paths measured side by side with a bare Celery round trip.

    python bench/bench.py [--requests 400] [--clients 4] [--seconds 5]

Starts its own Redis, a bare Celery worker and a flowpool stack (one worker,
the API under gunicorn) on that Redis, then prints one table: latency p50/p99
and throughput of each row, and ratios to the bare Celery row, then the CPU
milliseconds per no-op run of the API, the worker and Redis (bench/cpu.py),
which unlike runs/s compare across machines. Nothing here is a test: numbers
vary with the machine; the ratios and the CPU per run are what to read.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from admission import limit_everything  # noqa: E402
from cpu import CpuMeter  # noqa: E402
from flowpool.devstack import Stack  # noqa: E402
from flowpool.procs import set_parent_death_signal  # noqa: E402
from flowpool.redis_server import RedisServer  # noqa: E402
from sandbox_bench import sandbox_rows, waiting_runs_row  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.provider import StandInProvider  # noqa: E402

NOOP = "def execute(ctx):\n    return {'ok': True}\n"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def latency(call: Callable[[], object], n: int, warmup: int = 30) -> list[float]:
    """Milliseconds of ``n`` sequential calls, after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def throughput(make_call: Callable[[], Callable[[], object]], clients: int, seconds: float) -> float:
    """Calls per second completed by ``clients`` threads calling in a loop for ``seconds``."""
    counts = [0] * clients
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(clients)

    def loop(i: int) -> None:
        call = make_call()
        call()
        barrier.wait()
        while time.perf_counter() < stop:
            call()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


MODEL_CALLS = """
import time

def execute(ctx):
    times = []
    for _ in range(ctx.input["n"]):
        start = time.perf_counter()
        ctx.chat.completions.create(application="bench", intent="answer",
                                    messages=[{"role": "user", "content": "ping"}])
        times.append((time.perf_counter() - start) * 1000)
    return times
"""


def model_call_rows(api: str, session: requests.Session, provider: StandInProvider, n: int) -> None:
    """One model call through ctx (timed inside the script) against the same call made directly."""
    session.put(api + "/api/v1/applications/bench",
                json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}}).raise_for_status()
    session.post(api + "/api/v1/workflows/upload",
                 json={"workflow_ref_name": "model-calls", "script": MODEL_CALLS}).raise_for_status()
    session.post(api + "/api/v1/workflows/upload", json={
        "workflow_ref_name": "one-call", "script": MODEL_CALLS.replace('ctx.input["n"]', "1")}).raise_for_status()
    direct = requests.Session()
    body = {"model": "echo", "messages": [{"role": "user", "content": "ping"}]}

    def direct_call() -> None:
        direct.post(provider.base_url + "/chat/completions", json=body, timeout=10).raise_for_status()

    first_calls: list[float] = []

    def invoke_one() -> None:
        response = session.post(api + "/workflow/chat/completions", json={"model": "workflow:one-call", "input": {},
                                                                          "cache": False})
        response.raise_for_status()
        first_calls.extend(response.json()["output"])

    direct_ms: list[float] = []
    via_ctx: list[float] = []
    invoke_ms: list[float] = []
    for _ in range(5):  # interleaved rounds, as above
        direct_ms += latency(direct_call, n // 5, warmup=5)
        response = session.post(api + "/workflow/chat/completions", json={
            "model": "workflow:model-calls", "input": {"n": n // 5}, "cache": False}, timeout=300)
        response.raise_for_status()
        via_ctx += response.json()["output"]
        invoke_ms += latency(invoke_one, max(1, n // 20), warmup=2)
    p50 = statistics.median
    print()
    print(f"{'model call row':<52} {'p50 ms':>8} {'p99 ms':>8} {'added p50 ms':>12}")
    print(f"{'direct requests.post to the stand-in vendor':<52} {p50(direct_ms):>8.3f} "
          f"{percentile(direct_ms, 99):>8.3f} {'-':>12}")
    print(f"{'ctx.chat.completions.create (timed in the script)':<52} {p50(via_ctx):>8.3f} "
          f"{percentile(via_ctx, 99):>8.3f} {p50(via_ctx) - p50(direct_ms):>12.3f}")
    print(f"{'the first ctx call of a fresh run (timed in the script)':<52} {p50(first_calls):>8.3f} "
          f"{percentile(first_calls, 99):>8.3f} {p50(first_calls) - p50(direct_ms):>12.3f}")
    print(f"{'invoke of a workflow making one model call (HTTP)':<52} {p50(invoke_ms):>8.3f} "
          f"{percentile(invoke_ms, 99):>8.3f} {p50(invoke_ms) - p50(direct_ms):>12.3f}")
    print("target: a model call through ctx adds at most 3 ms p50 over the direct call")


EMITS = """
import time

def execute(ctx):
    for i in range(ctx.input["n"]):
        ctx.emit("t", time.time())
        if ctx.input["gap"]:
            time.sleep(ctx.input["gap"])
    return "done"
"""


def stream_rows(api: str, key: str, n_latency: int, n_burst: int) -> None:
    """Latency from ctx.emit to the chunk's arrival at an HTTP client, and chunk throughput of one stream."""
    session = requests.Session()
    session.headers["x-api-key"] = key
    session.post(api + "/api/v1/workflows/upload", json={"workflow_ref_name": "emits", "script": EMITS}).raise_for_status()

    def stream(n: int, gap: float) -> tuple[list[float], float, int]:
        lags, count, first = [], 0, None
        with session.post(api + "/workflow/chat/completions", stream=True, timeout=300, json={
                "model": "workflow:emits", "input": {"n": n, "gap": gap}, "stream": True, "cache": False}) as response:
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                now = time.time()
                event = json.loads(line[6:])
                if event.get("object") == "workflow.chunk":
                    first = first or now
                    lags.append((now - event["content"]) * 1000)
                    count += 1
        return lags, (time.time() - (first or time.time())), count

    lags: list[float] = []
    for _ in range(5):
        lags += stream(n_latency // 5, 0.005)[0]
    _, seconds, count = stream(n_burst, 0)
    print()
    print(f"{'stream row':<52} {'p50':>10} {'p99':>10}")
    print(f"{'ctx.emit -> chunk at the HTTP client (ms)':<52} {statistics.median(lags):>10.3f} "
          f"{percentile(lags, 99):>10.3f}")
    print(f"{'chunks per second, one stream of ' + str(count):<52} {count / seconds:>10.0f}")
    print("targets: emit to client p50 < 5 ms; 10,000 small chunks per second end to end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="sequential calls per latency row")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for throughput rows")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput row")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the latency rows")
    parser.add_argument("--waiting-runs", type=int, default=200,
                        help="runs at once, each waiting 1 s on a model call, through one worker")
    args = parser.parse_args()

    redis_server = RedisServer().start()
    env = {**os.environ, "BENCH_REDIS_URL": redis_server.url,
           "PYTHONPATH": str(ROOT / "bench") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bare_worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bare_celery", "worker", "--pool", "threads", "-c", "8",
         "--loglevel", "WARNING", "-Q", "bare", "--without-gossip", "--without-mingle"],
        env=env, cwd=ROOT / "bench", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=set_parent_death_signal)
    provider = StandInProvider().start()
    stack = Stack(env={"FLOWPOOL_LOG_LEVEL": "WARNING", "FLOWPOOL_EGRESS_ALLOW": "127.0.0.1/32"},
                  redis_url=redis_server.url)
    try:
        os.environ["BENCH_REDIS_URL"] = redis_server.url
        import bare_celery

        worker_process = stack.start_worker(quiet=True)
        api = stack.start_api(quiet=True)
        api_process = stack.processes[-1]
        stack.wait_ready()
        key = stack.create_account("bench")
        session = requests.Session()
        session.headers["x-api-key"] = key
        session.post(api + "/api/v1/workflows/upload",
                     json={"workflow_ref_name": "noop", "script": NOOP}).raise_for_status()
        bare_celery.noop.delay().get(timeout=30)

        def bare() -> None:
            bare_celery.noop.delay().get(timeout=30)

        host, port = api.split("//")[1].split(":")

        # An account with all four limits set, far above what the bench uses: its invokes pay for every check
        # (the rate's GCRA, concurrency, both daily budgets) where the bench account's take the defaults (none).
        limited_key = stack.create_account("limited")
        requests.post(api + "/api/v1/workflows/upload", headers={"x-api-key": limited_key},
                      json={"workflow_ref_name": "noop", "script": NOOP}).raise_for_status()
        assert limit_everything(redis_server.url, "limited")

        def invoker(cache: bool, account_key: str = key) -> Callable[[], object]:
            # A plain keep-alive connection: the client's own overhead stays
            # small next to the server's, as it is for the bare Celery row.
            connection = http.client.HTTPConnection(host, int(port))
            body = json.dumps({"model": "workflow:noop", "input": {"x": 1}, "cache": cache})
            headers = {"x-api-key": account_key, "Content-Type": "application/json"}
            timings: list[float] = []

            def call() -> None:
                connection.request("POST", "/workflow/chat/completions", body, headers)
                response = connection.getresponse()
                data = response.read()
                if response.status != 200:
                    raise RuntimeError(data)
                timings.append(float(response.getheader("Server-Timing").split("dur=")[1].split(",")[0]))

            # The server's own time of each call, from its Server-Timing header.
            call.server_ms = timings  # type: ignore[attr-defined]
            return call

        print(f"measuring ({args.requests} sequential calls per row in {args.rounds} interleaved rounds, "
              f"{args.clients} clients x {args.seconds:g}s for throughput)...", file=sys.stderr)
        invoker(True)()  # fill the cache
        calls = {"bare": bare, "miss": invoker(cache=False), "hit": invoker(cache=True),
                 "limited": invoker(cache=False, account_key=limited_key)}
        samples: dict[str, list[float]] = {name: [] for name in calls}
        # Rounds interleave the rows, so a noisy moment of a shared machine
        # weighs on every row alike instead of on one.
        for _ in range(args.rounds):
            for name, call in calls.items():
                samples[name] += latency(call, args.requests // args.rounds, warmup=10)
        rates = {"bare": throughput(lambda: bare, args.clients, args.seconds)}
        # CPU per no-op run of each part, over the no-op throughput row (bench/cpu.py).
        meter = CpuMeter({"API": [api_process.pid], "worker": [worker_process.pid],
                          "Redis": [redis_server.process.pid]})  # type: ignore[union-attr]
        meter.start()
        started = time.perf_counter()
        rates["miss"] = throughput(lambda: invoker(False), args.clients, args.seconds)
        noop_cpu = CpuMeter.per_run_ms(meter.stop(), rates["miss"] * (time.perf_counter() - started))
        rates["hit"] = throughput(lambda: invoker(True), args.clients, args.seconds)
        server = {name: getattr(calls[name], "server_ms", None) for name in calls}
        titles = {"bare": "bare Celery delay().get()", "miss": "flowpool no-op invoke (HTTP, cache off)",
                  "hit": "flowpool cache hit (HTTP)", "limited": "no-op invoke, all four limits set"}

        base_p50, base_rate = statistics.median(samples["bare"]), rates["bare"]
        print()
        print(f"{'row':<42} {'p50 ms':>8} {'p99 ms':>8} {'server p50':>10} {'x bare p50':>10} "
              f"{'req/s':>8} {'x bare req/s':>12}")
        for name, title in titles.items():
            p50 = statistics.median(samples[name])
            server_p50 = f"{statistics.median(server[name]):.3f}" if server[name] else "-"
            rate = f"{rates[name]:>8.0f} {rates[name] / base_rate:>12.2f}" if name in rates else f"{'-':>8} {'-':>12}"
            print(f"{title:<42} {p50:>8.3f} {percentile(samples[name], 99):>8.3f} {server_p50:>10} "
                  f"{p50 / base_p50:>10.2f} {rate}")
        print(f"\ncache hit vs miss, p50: {statistics.median(samples['miss']) / statistics.median(samples['hit']):.1f}x "
              f"faster at the client, {statistics.median(server['miss']) / statistics.median(server['hit']):.1f}x "
              "at the server")
        print(f"all four limits checked vs the defaults (none), server p50: "
              f"{statistics.median(server['limited']) - statistics.median(server['miss']):+.3f} ms")
        print("CPU ms per no-op run: " + ", ".join(f"{part} {ms:.2f}" for part, ms in noop_cpu.items()))
        print("targets: no-op invoke p50 <= 2.00x bare; cache hit server p50 < 1 ms and >= 10x faster than a miss; "
              "invoke throughput >= 0.50x bare")
        model_call_rows(api, session, provider, args.requests)
        stream_rows(api, key, args.requests, 9_000)
        stack.stop()  # its worker must not take the next row's runs
        waiting_runs_row(redis_server.url, key, args.waiting_runs)
        sandbox_rows(args.requests)
    finally:
        provider.stop()
        stack.stop()
        bare_worker.terminate()
        bare_worker.wait(10)
        redis_server.stop()


if __name__ == "__main__":
    main()
