"""``GET /metrics``: Prometheus text, from counters every flowpool process keeps in Redis.

The counters live in one Redis hash, so every API process and every worker
adds to the same numbers and any API process can answer the scrape. The
``flowpool_queue_*`` gauges (label ``queue``) are the demand signal of
GET /api/v1/pool (flowpool.pool), read the same way: an HPA scales each
queue's workers on ``flowpool_queue_desired_workers``, not on the queue
length, which hides the runs workers hold. With ``FLOWPOOL_METRICS_TOKEN``
set, a scrape must carry it as a bearer token.

The per-account counters are labelled with the account's id, not its name:
/metrics is public unless that token is set, and names (often a customer's)
should not be. With the token set, ``flowpool_account_info{account, name}``
(value 1) joins ids to names, the Prometheus idiom for such a label.
"""
from __future__ import annotations

import hmac
import time
from typing import Iterator

import redis
from flask import Blueprint, Response, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowpool import keys
from flowpool.errors import AuthenticationError, Unavailable

from .services import Services, bearer_token, services

bp = Blueprint("metrics", __name__)

# The demand signal's fields (flowpool.pool.QueueDemand), each a gauge with the label ``queue``.
_QUEUE_GAUGES = {
    "queued": "Runs waiting in the worker queue's broker queue",
    "reserved": "Runs of the queue live workers fetched and have not started",
    "running": "Runs of the queue going on live workers",
    "slots_per_worker": "Runs one worker of the queue holds at once (the largest of its live workers')",
    "workers": "Live workers consuming the queue",
    "desired_workers": "Workers the queue needs for all its queued, reserved and running runs",
}


class _RedisCollector:
    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        svc = self.svc
        counters = svc.redis.hgetall(keys.METRICS)
        workers = svc.pool.read_workers(time.time())  # the live workers, read once for both gauges below
        runs = CounterMetricFamily("flowpool_runs_finished", "Runs that ended, by status", labels=["status"])
        queue_runs = CounterMetricFamily("flowpool_queue_runs_finished", "Runs that ended, by worker queue and status",
                                         labels=["queue", "status"])
        calls = CounterMetricFamily("flowpool_calls", "Model and agent calls of runs, by kind and status",
                                    labels=["kind", "status"])
        hits = CounterMetricFamily("flowpool_cache_hits", "Requests answered from the result cache")
        fetches = CounterMetricFamily("flowpool_accessory_fetches", "Accessories workers fetched from the blob "
                                      "store into their host's disk cache (not those served from it)")
        fetched = CounterMetricFamily("flowpool_accessory_fetch_bytes", "Bytes of those fetches")
        compute = CounterMetricFamily("flowpool_account_compute_seconds", "Seconds the account's runs held worker "
                                      "slots (counted as each run ends)", labels=["account"])
        tokens = CounterMetricFamily("flowpool_account_tokens", "Model-call tokens of the account's runs",
                                     labels=["account"])
        refusals = CounterMetricFamily("flowpool_quota_refusals", "Requests answered 429 by an account's limit",
                                       labels=["limit"])
        accounts: set[str] = set()  # the ids the account counters name, for flowpool_account_info
        for raw_name, raw_value in sorted(counters.items()):
            name, value = raw_name.decode(), int(raw_value)
            if name.startswith("runs:"):
                runs.add_metric([name[5:]], value)
            elif name.startswith("queue_runs:") and name.count(":") == 2:
                _, queue, status = name.split(":")
                queue_runs.add_metric([queue, status], value)
            elif name.endswith(tuple(f"_calls:{s}" for s in ("ok", "error"))):
                kind, status = name.split("_calls:")
                calls.add_metric([kind, status], value)
            elif name == "cache_hits":
                hits.add_metric([], value)
            elif name == "accessory_fetches":
                fetches.add_metric([], value)
            elif name == "accessory_fetch_bytes":
                fetched.add_metric([], value)
            elif name.startswith("account_compute_ms:"):
                accounts.add(name.partition(":")[2])
                compute.add_metric([name.partition(":")[2]], value / 1000)
            elif name.startswith("account_tokens:"):
                accounts.add(name.partition(":")[2])
                tokens.add_metric([name.partition(":")[2]], value)
            elif name.startswith("quota_refusals:"):
                refusals.add_metric([name.partition(":")[2]], value)
        yield runs
        yield queue_runs
        yield calls
        yield hits
        yield fetches
        yield fetched
        yield compute
        yield tokens
        yield refusals
        if svc.settings.metrics_token is not None and accounts:  # names only to a scraper holding the token
            yield _account_info(svc.redis, accounts)
        yield GaugeMetricFamily("flowpool_workers", "Workers that sent a heartbeat within the worker TTL",
                                value=len(workers))
        try:
            pool = svc.pool.read(workers)
        except (redis.RedisError, Unavailable):
            # A broker of its own (FLOWPOOL_BROKER_URL) that does not answer costs the queue gauges, not the scrape.
            yield GaugeMetricFamily("flowpool_broker_up", "Whether the broker answered this scrape", value=0)
            return
        yield GaugeMetricFamily("flowpool_broker_up", "Whether the broker answered this scrape", value=1)
        yield GaugeMetricFamily("flowpool_queue_length", "Runs waiting for a worker, all worker queues together "
                                "(flowpool_queue_queued by queue)",
                                value=sum(demand.queued for demand in pool.queues.values()))
        for field, what in _QUEUE_GAUGES.items():
            gauge = GaugeMetricFamily(f"flowpool_queue_{field}", what, labels=["queue"])
            for name, demand in pool.queues.items():
                gauge.add_metric([name], getattr(demand, field))
            yield gauge


def _account_info(client: redis.Redis, accounts: set[str]) -> GaugeMetricFamily:
    """``flowpool_account_info{account=<id>, name=<name>} 1`` for each account a counter names and the registry
    still knows by name (the registry read once per scrape)."""
    info = GaugeMetricFamily("flowpool_account_info", "An account's name, to join with the account counters' "
                             "id labels (shown only when FLOWPOOL_METRICS_TOKEN is set)", labels=["account", "name"])
    names = {v.decode(): k.decode() for k, v in client.hgetall(keys.ACCOUNTS).items()}
    for account_id in sorted(accounts):
        if account_id in names:
            info.add_metric([account_id, names[account_id]], 1)
    return info


def check_scrape_token(expected: str | None, authorization: str | None) -> None:
    """Refuse (401) a scrape without the operator's metrics token, when one is set; compared in constant time."""
    if expected is None:
        return
    token = bearer_token(authorization)
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthenticationError("/metrics needs the metrics token: send Authorization: Bearer <FLOWPOOL_METRICS_TOKEN>")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of the whole installation."""
    check_scrape_token(services().settings.metrics_token, request.headers.get("Authorization"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RedisCollector(services()))  # type: ignore[arg-type]
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
