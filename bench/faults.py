"""flowpool's fault table: what callers get when a part breaks under load, and whether any work ran twice.

    .venv/bin/python bench/faults.py [--quick] [--only NAME]

``--only`` runs one fault (its name as in the table: baseline, progress,
client-retries, redis-pause, redis-restart, worker-kill, worker-shutdown,
api-kill); ``--quick`` sends fewer requests. The faults are timed, not
counted, so both take a minute or two. Each fault starts its own Redis, workers and API on loopback
(never a Redis or broker of the machine's), breaks one part while requests
are in flight, and prints one row:

- **sent**: requests sent (logical requests: a client's own retry of one
  request is not a second one).
- **correct**: answered correctly. The real result (the output names the
  request's id), or an error that carries the run's ``request_id`` (in the
  body or ``X-Request-Id``) and says truly what happened: ``worker_lost`` only
  for a run that had started, ``x-should-retry: true`` only for a run that
  had not, and otherwise only the error types the fault can cause (503
  ``service_unavailable``; ``script_error`` where the script raises).
- **refused**: answered 503 before anything ran, with ``x-should-retry: true``
  and no run (the counting server never saw it): honest, and safe to send
  again. A request arriving while Redis is down gets this.
- **wrong**: answered, but none of the above (a ``sandbox_error`` caused by
  a shutdown, "safe to retry" for a run that ran, a wrong output).
- **lost**: no answer (the connection died, the client timed out, a stream
  ended without its final object or an ``error`` event), or an error answer
  with no ``request_id``.
- **twice**: requests whose work ran more than once. Every run first posts
  its request's unique id with ``ctx.http`` to a counting server on
  loopback (the workers get ``FLOWPOOL_EGRESS_ALLOW=127.0.0.1/32``); an id
  counted twice ran twice, whoever retried it.
- **worst s**: the longest time from sending a request to its answer, over
  the answered ones.

The progress row counts differently: each stream emits a chunk, then waits
2 s on a gated ``ctx.http`` call; **correct** counts the streams whose chunk
arrived while the gate was still closed, **wrong** those whose chunk came
only after it opened, **worst s** is the time to the chunk, and **lost**
the streams with no final answer.

Notes under the table break each row's answers down by status and type, and
say what the fault left behind (records still queued or running, broker
messages still unacked, keys lost). The stacks run with the default
settings except a 10 s queue wait (60 s by default) and an 8 s soft limit on
the workflow, so a run that waits for a worker in vain, or a record whose
run is gone, ends within the bench's time. Nothing here is a test: the
table shows what the code does when it runs.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import psutil
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowpool.devstack import Stack  # noqa: E402
from flowpool.redis_server import RedisServer  # noqa: E402

INVOKE = "/workflow/chat/completions"
# Away from the uids of a dev stack or a test session (61000 on) and of bench/sandbox_bench.py (141000 on):
# a worker kills a finished run's leftovers by uid.
UID_BASE = 171000

# One script serves every fault: the side effect first, so a run counts as soon as it starts.
WORK = """
import time

def execute(ctx):
    job = ctx.input
    ctx.http.post(job["witness"] + "/seen", json={"id": job["id"]})
    if job.get("emit"):
        ctx.emit("progress", "calling")
    if job.get("gate"):
        ctx.http.get(job["witness"] + "/gate?id=" + job["id"] + "&hold=" + str(job["gate"]), timeout=30)
    if job.get("sleep"):
        time.sleep(job["sleep"])
    if job.get("fail"):
        raise RuntimeError("failing on purpose: " + job["id"])
    return {"id": job["id"]}
"""

# The workflow's soft limit: its hard limit (plus the 5 s grace) comes soon enough to see a run's record end
# within the bench, however its worker or Redis fared.
TIMEOUT = 8
# How long the faults that can leave a record running wait for it to end: past the hard limit, plus a margin.
SETTLE = 25.0

BENCH_ENV = {
    "FLOWPOOL_LOG_LEVEL": "WARNING",
    "FLOWPOOL_EGRESS_ALLOW": "127.0.0.1/32",
    "FLOWPOOL_QUEUE_WAIT_SECONDS": "10",
    "FLOWPOOL_API_WORKERS": "1",
}


class Witness:
    """A loopback HTTP server that counts the ids runs post to it, and holds gated calls for a while."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.opened: dict[str, float] = {}  # id -> wall time its gate answered
        self._lock = threading.Lock()
        witness = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with witness._lock:
                    witness.seen[body["id"]] += 1
                self._answer()

            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                time.sleep(float(query["hold"][0]))
                witness.opened[query["id"][0]] = time.time()
                self._answer()

            def _answer(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="witness", daemon=True)

    def start(self) -> Witness:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Call:
    """One logical request and what its caller got."""

    id: str
    stream: bool = False
    sent: float = field(default_factory=time.monotonic)
    status: int | None = None  # the answer's status (a stream's error event: its code); None: no answer
    output: Any = None
    error: dict[str, Any] | None = None
    request_id: str | None = None
    should_retry: str | None = None  # the x-should-retry header
    answered: float | None = None  # monotonic time of the answer
    chunk_at: float | None = None  # wall time of the first emitted chunk
    chunk_after: float | None = None  # seconds from sending to the first chunk
    done: bool = False  # a stream's [DONE]
    attempts: int = 1
    note: str = ""  # why there is no answer

    def outcome(self) -> str:
        """A short label of what the caller got, for the notes."""
        if self.status is None:
            return self.note or "no answer"
        if self.error is None:
            return str(self.status)
        label = f"{self.status} {self.error.get('type', '?')}"
        if "no flowpool worker" in str(self.error.get("message", "")):
            label += " (no worker)"
        return label + ("" if self.request_id else " without request_id")


@dataclass
class Row:
    """One line of the table, and the notes it adds under it."""

    fault: str
    sent: int
    correct: int
    refused: int
    wrong: int
    lost: int
    twice: int
    worst: float | None
    notes: list[str]


class Rig:
    """One fault's own stack: a Redis, workers and an API on loopback, an account and the bench's workflow."""

    def __init__(self, witness: Witness, workers: int = 1, concurrency: int = 16, api_workers: int = 1,
                 data_dir: str | None = None) -> None:
        """``data_dir``: where Redis persists, as `flowpool dev` runs it; None: a Redis that keeps nothing."""
        self.witness = witness
        self.workers, self.concurrency, self.api_workers = workers, concurrency, api_workers
        self.redis = RedisServer(data_dir=data_dir)
        self.stack: Stack | None = None
        self.api = self.key = ""
        self._next_uid = UID_BASE

    def __enter__(self) -> Rig:
        try:
            self.redis.start()
            self.stack = Stack(env={**BENCH_ENV, "FLOWPOOL_WORKER_CONCURRENCY": str(self.concurrency),
                                    "FLOWPOOL_API_WORKERS": str(self.api_workers)}, redis_url=self.redis.url)
            for _ in range(self.workers):
                self.add_worker()
            self.api = self.stack.start_api(quiet=True)
            self.stack.wait_ready(workers=self.workers)
            self.key = self.stack.create_account("faults")
            response = requests.post(self.api + "/api/v1/workflows/upload", headers={"x-api-key": self.key},
                                     json={"workflow_ref_name": "work", "script": WORK, "timeout_seconds": TIMEOUT},
                                     timeout=30)
            response.raise_for_status()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        process = self.redis.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused Redis could not stop
        if self.stack is not None:
            self.stack.stop()
        self.redis.stop()

    def add_worker(self) -> Any:
        """Start one more worker, on uids of its own (two workers on one host must not share them)."""
        assert self.stack is not None
        uid_base, self._next_uid = self._next_uid, self._next_uid + 1000
        return self.stack.start_worker(env={"FLOWPOOL_SANDBOX_UID_BASE": str(uid_base)}, quiet=True)

    def live_workers(self) -> list[Any]:
        assert self.stack is not None
        return [p for p in self.stack.processes if "worker" in p.args and p.poll() is None]

    def forget(self, process: Any) -> None:
        assert self.stack is not None
        if process in self.stack.processes:
            self.stack.processes.remove(process)

    def job(self, name: str, **fields: Any) -> dict[str, Any]:
        """A job for the bench's workflow, with a fresh id the counting server will see."""
        return {"id": f"{name}-{uuid.uuid4().hex[:10]}", "witness": self.witness.url, **fields}

    def invoke(self, job: dict[str, Any], stream: bool = False, headers: dict[str, str] | None = None,
               retry_on_drop: bool = False) -> Call:
        """Invoke the workflow over HTTP; never raises: what the caller got is in the Call."""
        call = Call(job["id"], stream)
        body = {"model": "workflow:work", "input": job, "cache": False, "stream": stream}
        for attempt in (1, 2):
            call.attempts = attempt
            try:
                with requests.post(self.api + INVOKE, json=body, headers={"x-api-key": self.key, **(headers or {})},
                                   stream=stream, timeout=(5, 60)) as response:
                    _read(response, call)
                return call
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                call.note = f"connection dropped ({type(exc).__name__})"
                if not retry_on_drop or call.status is not None:
                    return call
            except requests.RequestException as exc:
                call.note = f"no answer ({type(exc).__name__})"
                return call
        return call

    def leftovers(self, settle: float = 0.0) -> str:
        """Records of this rig's runs not yet ended (waiting up to ``settle`` s for them to end), and broker
        messages still reserved but unacknowledged."""
        started = time.monotonic()
        while True:
            statuses = self._statuses()
            if isinstance(statuses, str):
                return statuses
            unended = statuses["queued"] + statuses["running"]
            waited = time.monotonic() - started
            if not unended or waited >= settle:
                break
            time.sleep(0.5)
        try:
            broker = redis.Redis.from_url(self.redis.url)
            try:
                unacked = broker.hlen("unacked")
            finally:
                broker.close()
        except redis.RedisError as exc:
            return f"broker not read: {type(exc).__name__}"
        return (f"records: {_counts(statuses)}; {unended} still queued or running "
                f"{waited:.0f}s after the last answer; {unacked} broker messages unacked")

    def _statuses(self) -> Counter[str] | str:
        """How many of this rig's run records are in each status; a string says why they could not be listed."""
        statuses: Counter[str] = Counter()
        offset = 0
        while True:
            try:
                response = requests.get(self.api + "/api/v1/workflows/work/runs", headers={"x-api-key": self.key},
                                        params={"offset": offset, "limit": 100}, timeout=10)
            except requests.RequestException as exc:
                return f"runs not listed: {type(exc).__name__}"
            if response.status_code != 200:
                return f"runs not listed: {response.status_code}"
            page = response.json()
            statuses.update(run["status"] for run in page["data"])
            offset += len(page["data"])
            if not page["data"] or offset >= page["pagination"]["total"]:
                return statuses


def _read(response: requests.Response, call: Call) -> None:
    """Fill ``call`` from an HTTP answer: a JSON body, or a stream of server-sent events."""
    call.request_id = response.headers.get("X-Request-Id")
    call.should_retry = response.headers.get("x-should-retry")
    if call.stream and response.status_code == 200 and \
            response.headers.get("Content-Type", "").startswith("text/event-stream"):
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                call.done = True
                break
            event = json.loads(line[6:])
            call.request_id = call.request_id or event.get("request_id")
            if event.get("object") == "workflow.chunk":
                if call.chunk_at is None:
                    call.chunk_at, call.chunk_after = time.time(), time.monotonic() - call.sent
            elif "error" in event:
                call.error = event["error"]
                call.request_id = call.error.get("request_id") or call.request_id
                call.status, call.answered = int(call.error.get("code", 500)), time.monotonic()
            elif event.get("object") == "chat.completion":
                call.output, call.status, call.answered = event.get("output"), 200, time.monotonic()
        if call.status is None:
            call.note = "stream ended without an answer"
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    call.status, call.answered = response.status_code, time.monotonic()
    if response.status_code == 200 and isinstance(body, dict):
        call.output = body.get("output")
        call.request_id = body.get("request_id") or call.request_id
    else:
        error = body.get("error") if isinstance(body, dict) else None
        call.error = error if isinstance(error, dict) else {"message": response.text[:200]}
        call.request_id = call.error.get("request_id") or call.request_id


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{label} x{n}" for label, n in counter.most_common()) or "none"


def load(calls: list[Callable[[], Call]], pace: float = 0.0, clients: int | None = None) -> Callable[[], list[Call]]:
    """Start ``calls`` in the background, ``pace`` seconds apart, at most ``clients`` at once; returns a join."""
    results: list[Call] = []

    def run() -> None:
        with ThreadPoolExecutor(max_workers=clients or len(calls)) as pool:
            futures = []
            for call in calls:
                futures.append(pool.submit(call))
                time.sleep(pace)
            results.extend(f.result() for f in futures)

    thread = threading.Thread(target=run, name="load", daemon=True)
    thread.start()

    def join() -> list[Call]:
        thread.join()
        return results

    return join


def verdict(call: Call, ran: bool, errors: frozenset[str]) -> str:
    """correct, refused, wrong or lost: what one caller got, by the definitions of the module's docstring."""
    if call.status is None:
        return "lost"
    if call.error is not None and not call.request_id:
        return "refused" if call.status == 503 and call.should_retry == "true" and not ran else "lost"
    if call.error is None:
        return "correct" if call.output == {"id": call.id} else "wrong"
    if call.should_retry == "true" and ran:
        return "wrong"  # "safe to retry" for a run that ran
    if call.error.get("type") == "worker_lost":
        return "correct" if ran else "wrong"
    return "correct" if call.error.get("type") in errors else "wrong"


def judge(fault: str, calls: list[Call], witness: Witness,
          errors: frozenset[str] = frozenset({"service_unavailable"}), notes: list[str] | None = None) -> Row:
    """The row of a fault: its calls judged, the runs the counting server saw, the slowest answer."""
    verdicts = Counter(verdict(c, witness.seen[c.id] > 0, errors) for c in calls)
    answered = [c.answered - c.sent for c in calls if c.answered is not None]
    lines = [f"answers: {_answers(calls)}"]
    return Row(fault, len(calls), verdicts["correct"], verdicts["refused"], verdicts["wrong"], verdicts["lost"],
               sum(witness.seen[c.id] > 1 for c in calls), max(answered, default=None), lines + (notes or []))


def _answers(calls: list[Call]) -> str:
    """Each kind of answer: how many, and the slowest."""
    kinds: dict[str, list[Call]] = {}
    for call in calls:
        kinds.setdefault(call.outcome(), []).append(call)
    parts = []
    for label, group in sorted(kinds.items(), key=lambda item: -len(item[1])):
        times = [c.answered - c.sent for c in group if c.answered is not None]
        parts.append(f"{label} x{len(group)}" + (f" (slowest {max(times):.1f}s)" if times else ""))
    return ", ".join(parts)


def fault_baseline(witness: Witness, quick: bool) -> list[Row]:
    """Plain mixed load, no fault: plain calls, streams, and streams that emit, 8 clients at once."""
    n = 60 if quick else 200
    with Rig(witness) as rig:
        calls = [(lambda i=i: rig.invoke(rig.job("base", emit=i % 4 == 3), stream=i % 4 >= 2)) for i in range(n)]
        results = load(calls, clients=8)()
        return [judge("baseline", results, witness, notes=[rig.leftovers()])]


def fault_progress(witness: Witness, quick: bool) -> list[Row]:
    """Streams that emit "calling", then wait 2 s on a gated ctx.http call: does the chunk come first?"""
    n = 5 if quick else 10
    with Rig(witness) as rig:
        results = load([lambda: rig.invoke(rig.job("progress", emit=True, gate=2), stream=True)
                        for _ in range(n)])()
        early = [c for c in results if c.chunk_at is not None and c.chunk_at < witness.opened.get(c.id, 0)]
        answered = [c for c in results if c.status is not None]
        chunks = [c.chunk_after for c in results if c.chunk_after is not None]
        return [Row("progress", n, len(early), 0, len(answered) - len(early), n - len(answered),
                    sum(witness.seen[c.id] > 1 for c in results),
                    max(chunks, default=None),
                    ["correct = streams whose chunk came while the gate was closed; worst s = time to the chunk",
                     f"final answers: {_answers(results)}"])]


def _openai_call(rig: Rig, job: dict[str, Any]) -> Call:
    """A call through the official openai client with its default retries (2, on 408, 409, 429 and 5xx)."""
    import openai

    call = Call(job["id"])
    client = openai.OpenAI(base_url=rig.api + "/workflow", api_key=rig.key, timeout=60)
    try:
        completion = client.chat.completions.create(
            model="workflow:work", messages=[{"role": "user", "content": "go"}],
            extra_body={"input": job, "cache": False})
        call.status, call.output = 200, getattr(completion, "output", None)
        call.request_id = getattr(completion, "request_id", None)
    except openai.APIStatusError as exc:
        call.status = exc.status_code
        call.error = exc.body if isinstance(exc.body, dict) else {"message": str(exc.body)}
        call.request_id = call.error.get("request_id") or exc.response.headers.get("X-Request-Id")
        call.should_retry = exc.response.headers.get("x-should-retry")
    except openai.APIError as exc:
        call.note = f"no answer ({type(exc).__name__})"
    finally:
        client.close()
    if call.status is not None:
        call.answered = time.monotonic()
    return call


def _sdk_call(rig: Rig, job: dict[str, Any]) -> Call:
    """A call through flowpool's own SDK, with whatever retries it makes."""
    from flowpool import APIError, Flowpool

    call = Call(job["id"])
    try:
        response = Flowpool(api_key=rig.key, base_url=rig.api, timeout=60).workflow.completions.create(
            model="workflow:work", input=job, cache=False)
        call.status, call.output, call.request_id = 200, response.output, response.request_id
    except APIError as exc:
        call.status = exc.status_code
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        call.error = error if isinstance(error, dict) else {"message": str(exc.body)}
        call.request_id = exc.request_id
        call.should_retry = exc.headers.get("x-should-retry")
    except requests.RequestException as exc:
        call.note = f"no answer ({type(exc).__name__})"
    if call.status is not None:
        call.answered = time.monotonic()
    return call


def fault_client_retries(witness: Witness, quick: bool) -> list[Row]:
    """A workflow that raises, called through the official openai client and through the flowpool SDK."""
    n = 5 if quick else 12
    rows = []
    with Rig(witness) as rig:
        for name, client_call in (("client-retries (openai)", _openai_call), ("client-retries (SDK)", _sdk_call)):
            results = load([lambda: client_call(rig, rig.job("retry", fail=True)) for _ in range(n)], clients=4)()
            runs = Counter(str(witness.seen[c.id]) for c in results)
            rows.append(judge(name, results, witness, errors=frozenset({"script_error"}),
                              notes=[f"runs per call: {_counts(runs)}"]))
    return rows


def fault_redis_pause(witness: Witness, quick: bool) -> list[Row]:
    """Redis SIGSTOPped for 3 s while 2 s runs (a third streamed) arrive over 6 s, on two workers."""
    n = 24 if quick else 48
    with Rig(witness, workers=2) as rig:
        assert rig.redis.process is not None
        calls = [(lambda i=i: rig.invoke(rig.job("pause", sleep=2, emit=i % 3 == 0), stream=i % 3 == 0))
                 for i in range(n)]
        join = load(calls, pace=6 / n)
        time.sleep(2)
        rig.redis.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3)
        finally:
            rig.redis.process.send_signal(signal.SIGCONT)
        results = join()
        return [judge("redis-pause", results, witness, notes=_stream_notes(results) + [rig.leftovers(SETTLE)])]


def fault_redis_restart(witness: Witness, quick: bool) -> list[Row]:
    """Redis killed, and started again on its port and data 5 s later, while 2 s runs arrive over 9 s, on two workers.

    Its Redis persists in a data directory, as the one `flowpool dev` starts.
    """
    n = 24 if quick else 48
    with tempfile.TemporaryDirectory(prefix="flowpool-faults-") as data_dir, \
            Rig(witness, workers=2, data_dir=data_dir) as rig:
        assert rig.redis.process is not None
        before = _key_count(rig.redis)
        calls = [(lambda i=i: rig.invoke(rig.job("restart", sleep=2, emit=i % 3 == 0), stream=i % 3 == 0))
                 for i in range(n)]
        join = load(calls, pace=9 / n)
        time.sleep(2)
        rig.redis.process.kill()
        rig.redis.process.wait()
        time.sleep(5)
        rig.redis.start()  # the same port, arguments and data directory
        after = _key_count(rig.redis)
        results = join()
        return [judge("redis-restart", results, witness, notes=_stream_notes(results) + [
            f"Redis keys before the kill: {before}, after the restart: {after}", rig.leftovers(SETTLE)])]


def _key_count(server: RedisServer) -> int:
    client = redis.Redis(port=server.port)
    try:
        return sum(info.get("keys", 0) for name, info in client.info("keyspace").items())
    finally:
        client.close()


def _stream_notes(results: list[Call]) -> list[str]:
    streams = [c for c in results if c.stream]
    cut = [c for c in streams if not c.done and c.status in (None, 200)]
    return [f"streams: {len(streams)}, {len(cut)} ended with neither [DONE] nor an error event"]


def fault_worker_kill(witness: Witness, quick: bool) -> list[Row]:
    """Two workers of 4 slots each, 4 s runs for twice the slots; one worker SIGKILLed once all slots are busy.

    Twice the slots, not more: a run beyond what the workers hold would wait for a slot past the queue
    wait whether a worker died or not.
    """
    n = 16
    with Rig(witness, workers=2, concurrency=4) as rig:
        jobs = [rig.job("kill", sleep=4) for _ in range(n)]
        join = load([lambda job=job: rig.invoke(job) for job in jobs])
        deadline = time.monotonic() + 20
        while sum(witness.seen[job["id"]] > 0 for job in jobs) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the freed prefetch window fills: each worker reserves more than it runs
        victim = rig.live_workers()[0]
        victim.kill()
        victim.wait()
        rig.forget(victim)
        results = join()
        return [judge("worker-kill", results, witness, notes=[rig.leftovers(SETTLE)])]


def fault_worker_shutdown(witness: Witness, quick: bool) -> list[Row]:
    """Two workers of 4 slots; three times: a backlog of 1 s runs, then SIGTERM to one worker, and a new one."""
    n = 12 if quick else 16
    results: list[Call] = []
    exits: list[str] = []
    with Rig(witness, workers=2, concurrency=4) as rig:
        for _ in range(3):
            join = load([lambda: rig.invoke(rig.job("term", sleep=1)) for _ in range(n)])
            time.sleep(1)
            victim = rig.live_workers()[0]
            victim.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            results += join()
            try:
                exits.append(f"{victim.wait(30)} after {time.monotonic() - stopped:.1f}s")
            except subprocess.TimeoutExpired:  # a worker that does not drain is killed
                victim.kill()
                victim.wait()
                exits.append("killed after 30s")
            rig.forget(victim)
            rig.add_worker()
            assert rig.stack is not None
            rig.stack.wait_ready(workers=2)
        return [judge("worker-shutdown", results, witness,
                      notes=[f"terminated workers exited: {', '.join(exits)}", rig.leftovers()])]


def fault_api_kill(witness: Witness, quick: bool) -> list[Row]:
    """Three API processes; the busiest SIGKILLed mid-request; a client whose connection dies retries once.

    Every request carries an ``Idempotency-Key`` (its id), the same on the
    retry: an API that honours it joins the first run instead of starting a
    second one.
    """
    n = 24 if quick else 48
    with Rig(witness, concurrency=32, api_workers=3) as rig:
        assert rig.stack is not None
        [master] = [p for p in rig.stack.processes if "api" in p.args]
        port = int(rig.api.rsplit(":", 1)[1])

        def call() -> Call:
            job = rig.job("api", sleep=2)
            return rig.invoke(job, headers={"Idempotency-Key": job["id"]}, retry_on_drop=True)

        join = load([call for _ in range(n)], pace=3 / n)
        time.sleep(1.5)
        children = psutil.Process(master.pid).children()
        held = {p: sum(1 for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED
                       and c.laddr and c.laddr.port == port) for p in children}
        victim = max(held, key=lambda p: held[p])
        victim.kill()
        results = join()
        retried = sum(c.attempts > 1 for c in results)
        return [judge("api-kill", results, witness, notes=[
            f"killed an API process holding {held[victim]} of {sum(held.values())} open connections; "
            f"{retried} clients retried with their Idempotency-Key", rig.leftovers()])]


FAULTS: dict[str, Callable[[Witness, bool], list[Row]]] = {
    "baseline": fault_baseline,
    "progress": fault_progress,
    "client-retries": fault_client_retries,
    "redis-pause": fault_redis_pause,
    "redis-restart": fault_redis_restart,
    "worker-kill": fault_worker_kill,
    "worker-shutdown": fault_worker_shutdown,
    "api-kill": fault_api_kill,
}


def print_table(rows: list[Row]) -> None:
    print()
    print(f"{'fault':<26} {'sent':>5} {'correct':>8} {'refused':>8} {'wrong':>6} {'lost':>5} {'twice':>6} "
          f"{'worst s':>8}")
    for row in rows:
        worst = f"{row.worst:.1f}" if row.worst is not None else "-"
        print(f"{row.fault:<26} {row.sent:>5} {row.correct:>8} {row.refused:>8} {row.wrong:>6} {row.lost:>5} "
              f"{row.twice:>6} {worst:>8}")
    print()
    for row in rows:
        for note in row.notes:
            print(f"{row.fault}: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FAULTS), help="run this fault alone")
    parser.add_argument("--quick", action="store_true", help="fewer requests per fault")
    args = parser.parse_args()
    witness = Witness().start()
    rows: list[Row] = []
    try:
        for name, fault in FAULTS.items():
            if args.only and name != args.only:
                continue
            started = time.monotonic()
            print(f"{name}...", file=sys.stderr, flush=True)
            rows += fault(witness, args.quick)
            print(f"{name}: {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    finally:
        witness.stop()
        print_table(rows)


if __name__ == "__main__":
    main()
