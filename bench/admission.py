"""What admission costs an invoke, phase by phase, from the API's own Server-Timing header.

    python bench/admission.py [--requests 2000]

Starts its own Redis, one worker and the API, then makes sequential no-op
invokes (cache off) for two accounts in interleaved rounds: one taking the
default limits (none), one with all four limits set far above what the bench
uses (every check runs: the rate's GCRA, concurrency, both daily budgets, the
fair-share lane). Prints the p50 of each phase the API reports: ``parse``,
``begin`` (admission: the workflow, the input, and the one Redis script that
checks the limits and queues the run), ``submit`` (the broker), ``wait`` (the
run) and the whole. Run it in two checkouts to compare releases: its numbers
are the server's own, so the client's overhead is out of them.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowpool.devstack import Stack  # noqa: E402
from flowpool.redis_server import RedisServer  # noqa: E402

NOOP = "def execute(ctx):\n    return {'ok': True}\n"
PHASES = ("parse", "begin", "submit", "wait", "app")


def limit_everything(redis_url: str, name: str) -> bool:
    """Set all four limits of account ``name`` far above the bench's use; False on a release without limits."""
    try:
        from flowpool.limits import LimitStore
        from flowpool.registry import Accounts
        from flowpool.settings import Settings
    except ImportError:
        return False
    client = redis.Redis.from_url(redis_url)
    account = Accounts(client).find(name)
    assert account is not None
    LimitStore(client, Settings()).set(account.id, concurrency=10_000, rpm=10**9, tokens_per_day=10**12,
                                       compute_seconds_per_day=10**12)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="sequential invokes per account")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    args = parser.parse_args()
    redis_server = RedisServer().start()
    stack = Stack(env={"FLOWPOOL_LOG_LEVEL": "WARNING"}, redis_url=redis_server.url)
    try:
        stack.start_worker(quiet=True)
        api = stack.start_api(quiet=True)
        stack.wait_ready()
        host, port = api.split("//")[1].split(":")
        accounts = {"defaults": stack.create_account("defaults"), "all limits": stack.create_account("limited")}
        limited = limit_everything(redis_server.url, "limited")
        if not limited:
            del accounts["all limits"]
        phases: dict[str, dict[str, list[float]]] = {name: {p: [] for p in PHASES} for name in accounts}
        connections = {name: http.client.HTTPConnection(host, int(port)) for name in accounts}

        def call(name: str) -> dict[str, float]:
            connection = connections[name]
            headers = {"x-api-key": accounts[name], "Content-Type": "application/json"}
            connection.request("POST", "/workflow/chat/completions", json.dumps(
                {"model": "workflow:noop", "input": {"x": 1}, "cache": False}), headers)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(data)
            timing = response.getheader("Server-Timing") or ""
            return {part.split(";dur=")[0].strip(): float(part.split(";dur=")[1]) for part in timing.split(",")}

        for name, key in accounts.items():
            connection = connections[name]
            connection.request("POST", "/api/v1/workflows/upload", json.dumps(
                {"workflow_ref_name": "noop", "script": NOOP}), {"x-api-key": key, "Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            assert response.status in (200, 201), response.status
            for _ in range(50):
                call(name)
        per_round = args.requests // args.rounds
        for _ in range(args.rounds):
            for name in accounts:
                for _ in range(per_round):
                    for phase, ms in call(name).items():
                        if phase in phases[name]:
                            phases[name][phase].append(ms)
        print(f"{'server p50, ms':<28}" + "".join(f"{p:>10}" for p in PHASES))
        for name in accounts:
            print(f"{name:<28}" + "".join(f"{statistics.median(phases[name][p]):>10.3f}" for p in PHASES))
        if not limited:
            print("(this release has no limits: one account)")
    finally:
        stack.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
