"""flowpool's clients side by side: what each one adds to the same call, in latency and in its own CPU.

    python bench/clients.py [--requests 300] [--rounds 3] [--concurrency 16] [--cache-off]

Starts its own stack (Redis, one worker, the API under gunicorn), uploads a
no-op workflow and primes the result cache, so every measured call is a cache
hit: the server's side is then as small and steady as it gets, and what
differs between rows is the client. Each row makes the same ``--requests``
calls (one body: ``model``, ``messages`` and ``input``), split over
``--rounds`` rounds that interleave the rows, so a noisy moment of a shared
machine weighs on every row alike. The rows: a raw ``requests.Session`` POST
(the baseline, and its ``stream=True`` twin), ``flowpool.Flowpool``,
``openai.OpenAI`` pointed at ``<api>/workflow``, ``AsyncFlowpool`` and
``openai.AsyncOpenAI`` one call at a time and ``--concurrency`` at once,
streaming (``stream=True``, every chunk consumed) through each Python client,
and the Node SDK (``sdk/node``) one call at a time and streaming, run as a
``node`` subprocess (skipped with a note when there is no ``node``).

It prints one table: latency p50/p99, calls/s, the client's own CPU
milliseconds per call (``time.process_time`` around the calls for the Python
rows, ``process.cpuUsage`` around the calls for Node, so its start-up is left
out), the API's CPU milliseconds per call (bench/cpu.py: flowpool's clients
send an Idempotency-Key with each invoke, which the server records), and each
row's p50 and client CPU as a ratio to the raw requests row. ``--cache-off``
measures runs (``cache: false``) instead of cache hits. Nothing here is a
test: latencies and calls/s vary with the machine; the CPU per call and the
ratios are what to read.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import openai
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import NOOP, percentile  # noqa: E402
from cpu import CpuMeter  # noqa: E402
from flowpool import AsyncFlowpool, Flowpool  # noqa: E402
from flowpool.devstack import Stack  # noqa: E402

MODEL = "workflow:noop"
MESSAGES = [{"role": "user", "content": "ping"}]
INPUT = {"x": 1}
WARMUP = 5  # unmeasured calls before each row's share of a round: connections open, code paths warm

# The Node rows: one process per row and round, timing only the calls (after its own warm-up), so the start-up
# of node and of the SDK stays out of both the latencies and the CPU.
NODE_SCRIPT = r"""
const { Flowpool } = require(process.env.FLOWPOOL_NODE_SDK);
const config = JSON.parse(process.argv[2]);
const client = new Flowpool({ apiKey: config.apiKey, baseURL: config.baseURL });

async function call() {
  if (!config.stream) return client.workflow.completions.create(config.body);
  let chunks = 0;
  for await (const chunk of await client.workflow.completions.create({ ...config.body, stream: true })) chunks += 1;
  if (!chunks) throw new Error('an empty stream');
}

(async () => {
  for (let i = 0; i < config.warmup; i += 1) await call();
  const latencies = [];
  const cpu = process.cpuUsage();
  const started = process.hrtime.bigint();
  for (let i = 0; i < config.n; i += 1) {
    const start = process.hrtime.bigint();
    await call();
    latencies.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  const wall = Number(process.hrtime.bigint() - started) / 1e9;
  const used = process.cpuUsage(cpu);
  console.log(JSON.stringify({ latencies, cpu: (used.user + used.system) / 1e6, wall }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


@dataclass
class Share:
    """One row's calls in one round: each call's milliseconds, the client's CPU-seconds and the wall seconds over
    them, and how many calls reached the API, warm-up included."""

    latencies: list[float]
    cpu: float
    wall: float
    sent: int


Measure = Callable[[int], Share]


def timed_calls(call: Callable[[], object], n: int) -> Share:
    """``n`` sequential calls after the warm-up, timed one by one, with this process's CPU over them."""
    for _ in range(WARMUP):
        call()
    latencies = []
    cpu, started = time.process_time(), time.perf_counter()
    for _ in range(n):
        start = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - start) * 1000)
    return Share(latencies, time.process_time() - cpu, time.perf_counter() - started, n + WARMUP)


async def timed_async_calls(call: Callable[[], Awaitable[object]], n: int, concurrency: int) -> Share:
    """``n`` calls after the warm-up, ``concurrency`` in flight at a time, with this process's CPU over them."""
    warmup = max(WARMUP, concurrency)  # one call on each connection the row will use
    await asyncio.gather(*(call() for _ in range(warmup)))
    latencies: list[float] = []
    left = n

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            start = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - start) * 1000)

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Share(latencies, time.process_time() - cpu, time.perf_counter() - started, n + warmup)


def python_rows(api: str, key: str, body: dict[str, Any], concurrency: int, loop: asyncio.AbstractEventLoop,
                closers: list[Callable[[], object]]) -> dict[str, Measure]:
    """The Python clients' rows, each a function of the number of calls to make; ``closers`` gets what closes
    the async clients."""
    session = requests.Session()
    session.headers["x-api-key"] = key
    url = api + "/workflow/chat/completions"
    expect_cache = "HIT" if body.get("cache", True) else "MISS"

    def raw() -> None:
        response = session.post(url, json=body, timeout=30)
        response.raise_for_status()
        if response.headers["X-Cache"] != expect_cache:
            raise RuntimeError(f"X-Cache {response.headers['X-Cache']}, not {expect_cache}")
        response.json()

    def raw_stream() -> None:
        with session.post(url, json={**body, "stream": True}, stream=True, timeout=30) as response:
            response.raise_for_status()
            if not any(line == b"data: [DONE]" for line in response.iter_lines()):
                raise RuntimeError("the stream did not end with [DONE]")

    extra = {name: value for name, value in body.items() if name not in ("model", "messages")}
    fp = Flowpool(api_key=key, base_url=api)
    oa = openai.OpenAI(api_key=key, base_url=api + "/workflow", max_retries=0)
    # The async clients are made inside the loop that runs them: their connection pools belong to it.
    afp: AsyncFlowpool = loop.run_until_complete(_in_loop(lambda: AsyncFlowpool(api_key=key, base_url=api)))
    aoa: openai.AsyncOpenAI = loop.run_until_complete(
        _in_loop(lambda: openai.AsyncOpenAI(api_key=key, base_url=api + "/workflow", max_retries=0)))

    def fp_call() -> None:
        fp.workflow.completions.create(MODEL, messages=MESSAGES, **extra)

    def oa_call() -> None:
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra)  # type: ignore[arg-type]

    def fp_stream() -> None:
        _drain(fp.workflow.completions.create(MODEL, messages=MESSAGES, stream=True, **extra))

    def oa_stream() -> None:
        _drain(oa.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                          extra_body=extra))

    async def afp_call() -> None:
        await afp.workflow.completions.create(MODEL, messages=MESSAGES, **extra)

    async def aoa_call() -> None:
        await aoa.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra)  # type: ignore[arg-type]

    async def afp_stream() -> None:
        chunks = [chunk async for chunk in await afp.workflow.completions.create(
            MODEL, messages=MESSAGES, stream=True, **extra)]
        if not chunks:
            raise RuntimeError("an empty stream")

    async def close() -> None:
        await afp.close()
        await aoa.close()

    closers.append(lambda: loop.run_until_complete(close()))

    def sync(call: Callable[[], object]) -> Measure:
        return lambda n: timed_calls(call, n)

    def run_async(call: Callable[[], Awaitable[object]], at_once: int) -> Measure:
        return lambda n: loop.run_until_complete(timed_async_calls(call, n, at_once))

    return {
        "requests.Session POST (raw)": sync(raw),
        "Flowpool": sync(fp_call),
        "openai.OpenAI": sync(oa_call),
        "AsyncFlowpool, sequential": run_async(afp_call, 1),
        "openai.AsyncOpenAI, sequential": run_async(aoa_call, 1),
        f"AsyncFlowpool, {concurrency} at once": run_async(afp_call, concurrency),
        f"openai.AsyncOpenAI, {concurrency} at once": run_async(aoa_call, concurrency),
        "requests.Session POST, stream (raw)": sync(raw_stream),
        "Flowpool, stream": sync(fp_stream),
        "AsyncFlowpool, stream": run_async(afp_stream, 1),
        "openai.OpenAI, stream": sync(oa_stream),
    }


async def _in_loop(make: Callable[[], Any]) -> Any:
    """``make()`` called inside the running loop."""
    return make()


def _drain(stream: Any) -> None:
    """Consume every event of a stream; an empty one is a failure of the row."""
    if not sum(1 for _ in stream):
        raise RuntimeError("an empty stream")


def node_rows(api: str, key: str, body: dict[str, Any], script: Path) -> dict[str, Measure]:
    """The Node SDK's rows, or none (with a note) when there is no node."""
    node = shutil.which("node")
    if node is None:
        print("note: no node on PATH, the Node SDK rows are skipped", file=sys.stderr)
        return {}
    env = {"FLOWPOOL_NODE_SDK": str(ROOT / "sdk" / "node"), "PATH": str(Path(node).parent)}

    def row(stream: bool) -> Measure:
        def measure(n: int) -> Share:
            config = {"apiKey": key, "baseURL": api, "body": body, "stream": stream, "n": n, "warmup": WARMUP}
            result = subprocess.run([node, str(script), json.dumps(config)], env=env, capture_output=True,
                                    text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"the node rows failed: {result.stderr.strip()}")
            answer = json.loads(result.stdout)
            return Share(answer["latencies"], answer["cpu"], answer["wall"], n + WARMUP)
        return measure

    return {"Node SDK, sequential": row(False), "Node SDK, stream": row(True)}


def print_table(shares: dict[str, list[Share]], api_cpu: dict[str, float], baseline: str) -> None:
    """One line per row, with its p50 latency and client CPU as ratios to the baseline row's."""
    def cpu_ms(row: str) -> float:
        return 1000 * sum(s.cpu for s in shares[row]) / sum(len(s.latencies) for s in shares[row])

    base_p50 = statistics.median(ms for s in shares[baseline] for ms in s.latencies)
    base_cpu = cpu_ms(baseline)
    print()
    print(f"{'row':<40} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8} {'CPU ms':>7} {'API CPU':>8} "
          f"{'x raw p50':>9} {'x raw CPU':>9}")
    for row, row_shares in shares.items():
        latencies = [ms for s in row_shares for ms in s.latencies]
        p50 = statistics.median(latencies)
        rate = len(latencies) / sum(s.wall for s in row_shares)
        print(f"{row:<40} {p50:>8.3f} {percentile(latencies, 99):>8.3f} {rate:>8.0f} {cpu_ms(row):>7.3f} "
              f"{api_cpu[row]:>8.3f} {p50 / base_p50:>9.2f} {cpu_ms(row) / base_cpu:>9.2f}")
    print("CPU ms: the client's own CPU per call (its process); API CPU: the API's per call (all its processes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="calls per row, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the rows")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once in the concurrent rows")
    parser.add_argument("--cache-off", action="store_true", help="measure runs (cache: false), not cache hits")
    args = parser.parse_args()

    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "input": INPUT}
    if args.cache_off:
        body["cache"] = False
    stack = Stack(env={"FLOWPOOL_LOG_LEVEL": "WARNING"})
    loop = asyncio.new_event_loop()
    closers: list[Callable[[], object]] = []
    try:
        stack.start_worker(quiet=True)
        api = stack.start_api(quiet=True)
        api_process = stack.processes[-1]
        stack.wait_ready()
        key = stack.create_account("bench")
        requests.post(api + "/api/v1/workflows/upload", headers={"x-api-key": key},
                      json={"workflow_ref_name": "noop", "script": NOOP}).raise_for_status()
        # Fill the cache: from here on every call with this body is a hit (the raw rows check X-Cache).
        requests.post(api + "/workflow/chat/completions", headers={"x-api-key": key},
                      json={"model": MODEL, "messages": MESSAGES, "input": INPUT}).raise_for_status()
        with tempfile.TemporaryDirectory() as scratch:
            script = Path(scratch) / "node_clients.cjs"
            script.write_text(NODE_SCRIPT)
            rows = {**python_rows(api, key, body, args.concurrency, loop, closers), **node_rows(api, key, body, script)}
            print(f"measuring {len(rows)} rows, {args.requests} calls each in {args.rounds} interleaved rounds"
                  f"{' (cache off: each call a run)' if args.cache_off else ' (cache hits)'}...", file=sys.stderr)
            meter = CpuMeter({"API": [api_process.pid]})
            shares: dict[str, list[Share]] = {row: [] for row in rows}
            api_seconds = dict.fromkeys(rows, 0.0)
            # Rounds interleave the rows, so drift and a noisy neighbour weigh on every row alike.
            for round_number in range(args.rounds):
                n = args.requests // args.rounds + (round_number < args.requests % args.rounds)
                for row, measure in rows.items():
                    meter.start()
                    shares[row].append(measure(n))
                    api_seconds[row] += meter.stop()["API"]
        # The warm-up calls reach the API too: its CPU is divided by every call it answered.
        api_cpu = {row: 1000 * api_seconds[row] / sum(s.sent for s in shares[row]) for row in rows}
        print_table(shares, api_cpu, "requests.Session POST (raw)")
    finally:
        for close in closers:
            close()
        loop.close()
        stack.stop()


if __name__ == "__main__":
    main()
