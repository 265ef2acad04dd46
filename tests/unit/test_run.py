"""Tests of a run's shapes (flowpool.run) and of admission (flowpool.api.admission), without a server."""
from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from typing import Any, Iterator

import pytest
import redis

from flowpool import keys
from flowpool.api.admission import admit
from flowpool.api.models import InvokeRequest
from flowpool.api.services import Services
from flowpool.errors import InputSchemaError, RequestError, TimeLimitExceeded
from flowpool.redis_server import RedisServer
from flowpool.registry import Account, Accounts, ResolvedWorkflow, Upload
from flowpool.run import CachePlan, RunEnd, RunJob, RunRecord, RunStatus, encode
from flowpool.sealing import InvalidToken, Sealer, ServerKey
from flowpool.settings import Settings

JOB = RunJob(
    request_id="req_1", account="acct", workflow="parent", version="1.2.3", content_hash="c" * 64, soft_seconds=7.5,
    session_id="sess_1", input={"q": "ünïcode"}, messages=[{"role": "user", "content": "hi"}],
    secrets={"token": "sk-secret", "pin": "123"}, metadata={"team": "x"},
    params={"max_tokens": 5, "temperature": None, "stream": False}, env={"MODE": "a"}, output_schema={"a": {}},
    application="app", limits={"memory_mb": 128}, cache=CachePlan(key="k" * 64, ttl=60))


def test_a_job_round_trips_through_its_json_message_with_its_secrets_sealed(redis_db: redis.Redis) -> None:
    sealer = Sealer(ServerKey(redis_db, "the-server-key"))
    text = json.dumps(JOB.to_message(sealer))
    message = json.loads(text)

    assert RunJob.from_message(message, sealer) == JOB
    assert message["cache"] == {"key": "k" * 64, "ttl": 60}
    assert RunJob.from_message({**message, "from_a_newer_sender": 1}, sealer) == JOB
    assert "sk-secret" not in text and "secrets" not in message
    # Another installation's key opens nothing; a job without secrets carries no token.
    with pytest.raises(InvalidToken):
        RunJob.from_message(message, Sealer(ServerKey(redis_db, "another-key")))
    # Sealed secrets copied into another job's message do not open there.
    with pytest.raises(InvalidToken):
        RunJob.from_message({**message, "request_id": "req_2"}, sealer)
    with pytest.raises(InvalidToken):
        RunJob.from_message({**message, "account": "another"}, sealer)
    bare = replace(JOB, secrets={})
    assert "sealed_secrets" not in bare.to_message(sealer) and RunJob.from_message(bare.to_message(sealer), sealer) == bare


def test_an_output_sealed_for_secrets_opens_only_with_the_same_secrets(redis_db: redis.Redis) -> None:
    sealer = Sealer(ServerKey(redis_db, "the-server-key"))
    box = sealer.box("acct", {"token": "sk-1", "pin": "2"})
    sealed = box.seal({"output": "sk-1"})

    assert "sk-1" not in sealed
    assert sealer.box("acct", {"pin": "2", "token": "sk-1"}).open(sealed) == {"output": "sk-1"}  # any order
    assert sealer.box("acct", None) is None
    foreign = Sealer(ServerKey(redis_db, "k2")).box("acct", {"token": "sk-1", "pin": "2"})
    other_account = sealer.box("another", {"token": "sk-1", "pin": "2"})
    for other in (sealer.box("acct", {"token": "sk-2", "pin": "2"}), foreign, other_account):
        with pytest.raises(InvalidToken):
            other.open(sealed)


def test_a_child_job_keeps_the_request_and_takes_the_callee() -> None:
    callee = ResolvedWorkflow(account_id="acct", ref="child", version="2.0.0", content_hash="d" * 64,
                              config_hash="e" * 64, timeout_seconds=3, cache_ttl_seconds=None, input_schema=None,
                              output_schema={"b": {}}, application="other", env={"MODE": "b"}, limits=None)

    child = JOB.child(callee, soft_seconds=2.0, input={"x": 1}, messages=None)

    kept = ("request_id", "account", "session_id", "secrets", "metadata", "params")
    assert all(getattr(child, name) == getattr(JOB, name) for name in kept)
    assert (child.workflow, child.version, child.content_hash, child.soft_seconds) == ("child", "2.0.0", "d" * 64, 2.0)
    assert (child.input, child.messages, child.env) == ({"x": 1}, [], {"MODE": "b"})
    assert (child.output_schema, child.application, child.limits, child.cache) == ({"b": {}}, "other", None, None)


def test_the_sandbox_sees_what_ctx_shows_and_nothing_of_the_account_or_cache() -> None:
    view = JOB.sandbox_view()

    assert set(view) == {"input", "messages", "secrets", "metadata", "params", "env", "session_id", "request_id"}
    assert view["secrets"] == JOB.secrets and view["request_id"] == "req_1"


def test_only_secrets_long_enough_to_find_are_redacted() -> None:
    assert JOB.secret_values() == ["sk-secret"]


def test_an_end_round_trips_and_a_failed_one_raises_its_error_naming_the_request() -> None:
    ok = RunEnd(status="succeeded", version="1.0.0", usage={"total_tokens": 1}, output=None, content="x")
    failed = RunEnd(status="timed_out", version="1.0.0",
                    error=TimeLimitExceeded("too slow", limit="soft", seconds=1.0).to_dict())

    assert RunEnd.from_message(json.loads(json.dumps(ok.to_message()))) == ok
    assert "reply" not in ok.to_message() and "output" not in ok.to_message()
    assert ok.exception("req_1") is None
    error = failed.exception("req_9")
    assert isinstance(error, TimeLimitExceeded) and error.status == 408
    assert error.details == {"limit": "soft", "seconds": 1.0, "request_id": "req_9"}


def test_only_fields_of_a_run_record_can_be_written() -> None:
    assert encode({"status": RunStatus.QUEUED, "cache_hit": False, "output": None}) == {
        "status": "queued", "cache_hit": "false"}
    with pytest.raises(ValueError, match="not fields of a run record: secrets"):
        encode({"status": "queued", "secrets": {"token": "x"}})


def test_a_record_reads_back_what_was_stored_and_passes_over_unknown_fields() -> None:
    record = RunRecord(request_id="req_1", account="acct", workflow="wf", status="succeeded", cache_hit=True,
                       output={"a": [1, None]}, logs=[{"msg": "ünïcode"}])
    stored = {k.encode(): v.encode() for k, v in record.to_fields().items()}

    assert RunRecord.from_fields({**stored, b"later_field": b"1"}) == record
    assert RunRecord.from_fields({}) is None
    # What a worker writes when the record expired during the run is no run to show.
    assert RunRecord.from_fields({b"status": b"succeeded", b"finished_at": b"1.5", b"output": b"1"}) is None


def test_the_served_view_of_a_record_has_its_timings() -> None:
    record = RunRecord(request_id="req_1", account="acct", workflow="wf", status="succeeded", queued_at=1.0,
                       started_at=1.5, finished_at=2.25)

    full, summary = record.to_view([{"type": "t", "content": 1}]), record.to_view(full=False)

    assert full["timings"]["queue_ms"] == 500.0 and full["timings"]["run_ms"] == 750.0
    assert full["chunks"] == [{"type": "t", "content": 1}] and full["model_calls"] == []
    assert "account" not in full and "output" not in summary and summary["cache_hit"] is False
    assert set(summary) < set(full)


# Admission: a plain function over the stores, callable without an HTTP server.


@pytest.fixture
def services(redis_server: RedisServer, redis_db: redis.Redis) -> Iterator[Services]:
    svc = Services(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15"))
    # A worker of the default queue, alive for the test: admission refuses a queue no worker serves.
    redis_db.zadd(keys.queue_workers("default"), {"worker-a": time.time() + 3600})
    yield svc
    svc.redis.close()


@pytest.fixture
def account(services: Services) -> Account:
    return Accounts(services.redis).create("admission")[0]


SCRIPT = '''\
INPUT_SCHEMA = {"text": {"type": "string", "required": True}}
TIMEOUT_SECONDS = 9
def execute(ctx):
    return ctx.input
'''


def invoke(**body: Any) -> InvokeRequest:
    return InvokeRequest.model_validate({"model": "workflow:echo", **body})


def test_admit_queues_a_run_and_builds_its_job_once(services: Services, account: Account) -> None:
    services.workflows.upload(account.id, Upload(ref="echo", script=SCRIPT, env={"MODE": "a"}))

    admission = admit(services, account, invoke(input={"text": "hi"}, secrets={"token": "sk-x"}, session_id="s1"))

    job = admission.job
    assert admission.verdict == "queued" and admission.cache_header == "MISS" and job is not None
    assert (job.request_id, job.account, job.workflow, job.version) == (admission.request_id, account.id, "echo",
                                                                        "1.0.0")
    assert (job.soft_seconds, job.input, job.secrets, job.env) == (9, {"text": "hi"}, {"token": "sk-x"}, {"MODE": "a"})
    assert job.cache is not None and job.cache.ttl == services.settings.default_cache_ttl_seconds
    record = services.runs.get(admission.request_id)
    assert record is not None and (record.status, record.session_id, record.timeout_seconds) == ("queued", "s1", 9)


def test_admit_joins_an_identical_run_in_flight_and_answers_a_cached_one(services: Services,
                                                                          account: Account) -> None:
    services.workflows.upload(account.id, Upload(ref="echo", script=SCRIPT))
    first = admit(services, account, invoke(input={"text": "same"}))

    joined = admit(services, account, invoke(input={"text": "same"}))
    assert (joined.verdict, joined.request_id, joined.job, joined.cache_header) == ("join", first.request_id, None,
                                                                                    "HIT")

    assert first.job is not None and first.job.cache is not None
    pipe = services.redis.pipeline()
    services.cache.put(pipe, account.id, first.job.cache.key, {"output": {"text": "same"}, "content": "{}",
                                                              "version": "1.0.0", "chunks": [{"type": "t"}]}, 60)
    services.cache.release(account.id, first.job.cache.key, first.request_id, pipe=pipe)
    pipe.execute()

    hit = admit(services, account, invoke(input={"text": "same"}))
    assert hit.verdict == "hit" and hit.job is None and hit.request_id != first.request_id
    assert hit.end == RunEnd(status="succeeded", version="1.0.0", output={"text": "same"}, content="{}")
    assert hit.chunks == [{"type": "t"}]
    record = services.runs.get(hit.request_id)  # the hit's own record, written by admission
    assert record is not None and record.cache_hit is True and record.status == "succeeded"


def test_admit_refuses_bad_input_and_writes_nothing(services: Services, account: Account) -> None:
    services.workflows.upload(account.id, Upload(ref="echo", script=SCRIPT))

    with pytest.raises(InputSchemaError):
        admit(services, account, invoke(input={"text": 1}))
    with pytest.raises(RequestError, match="send 'messages', 'input' or both"):
        admit(services, account, invoke())

    assert services.runs.list_for_workflow(account.id, "echo", 0, 10) == ([], 0)


def test_record_fields_cover_what_the_runs_api_serves() -> None:
    names = {f.name for f in fields(RunRecord)}

    assert {"request_id", "status", "output", "error", "logs", "model_calls", "workflow_calls"} <= names
    assert "secrets" not in names
