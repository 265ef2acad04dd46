"""AsyncFlowpool (httpx2) against the session's real stack over HTTP: every resource, streams, errors, retries.

Each test runs its coroutine with ``asyncio.run``; the faults that the stack
cannot make (a refused port, a port that never answers, an answer lost after
the server ran the call) come from loopback servers.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socketserver
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import psutil
import pytest
import redis

import flowpool
from flowpool.limits import LimitStore
from flowpool.procs import free_port
from flowpool.registry import Accounts
from flowpool.settings import Settings
from tests.helpers import (ECHO_WORKFLOW, FAILING_WORKFLOW, SLEEPING_WORKFLOW, CannedHTTPServer, Client, SilentServer,
                           eventually)

STREAMING_WORKFLOW = """\
def execute(ctx):
    for n in range(3):
        ctx.emit("step", n)
    return {"steps": 3}
"""

SLOW_WORKFLOW = """\
import time


def execute(ctx):
    time.sleep(ctx.input["seconds"])
    return ctx.input["seconds"]
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _async(client: Client, **options: Any) -> flowpool.AsyncFlowpool:
    options = {"api_key": client.key, "base_url": client.base_url, "timeout": 60, "max_retries": 0, **options}
    return flowpool.AsyncFlowpool(**options)


def _runs(client: Client, ref: str) -> list[dict[str, Any]]:
    return client.get(f"/api/v1/workflows/{ref}/runs", params={"limit": 100}).json()["data"]


# Every resource.

def test_a_completion_and_every_resource_answer_through_the_async_client(client: Client, tmp_path: Path) -> None:
    ref = _ref("echo")
    (tmp_path / "table.json").write_text(json.dumps({"rows": list(range(1000))}))
    progress: list[tuple[int, int]] = []

    async def main() -> None:
        async with _async(client) as fp:
            uploaded = await fp.workflows.upload(ref, ECHO_WORKFLOW, accessories={"table": tmp_path / "table.json"},
                                                 progress=lambda sent, total: progress.append((sent, total)))
            assert (uploaded.workflow.workflow_ref_name, uploaded.created) == (ref, True)
            assert (await fp.workflows.get(ref)).workflow_ref_name == ref
            assert ref in [w.workflow_ref_name for w in await fp.workflows.list(limit=100)]

            response = await fp.workflow.completions.create(model=f"workflow:{ref}", input={"text": "hi"})
            assert repr(response).startswith(f"ChatCompletion(id='chatcmpl-{response.request_id}', ")
            assert response.output.echo == "hi" and response.choices[0].message.content == '{"echo":"hi"}'

            started = await fp.workflow.runs.create(model=f"workflow:{ref}", input={"text": "later"}, cache=False)
            run = await fp.workflow.runs.get(started.request_id, wait=30)
            assert (run.status, run.output.to_dict()) == ("succeeded", {"echo": "later"})
            followed = [event async for event in await fp.runs.stream(started.request_id, logs=True)]
            assert followed[-1].object == "chat.completion" and followed[-1].output.echo == "later"
            (listed, *_) = await fp.workflows.runs(ref)
            assert listed.request_id == started.request_id  # newest first

            await fp.datastores.create("docs", id_field="id", text_fields=["text"])
            ingested = await fp.datastores.ingest("docs", [{"id": "a", "text": "apples and pears"},
                                                           {"id": "b", "text": "a field of wheat"}])
            assert ingested.upserted == 2
            found = await fp.datastores.search("docs", query="apples")
            assert [hit.id for hit in found.data] == ["a"]
            assert (await fp.datastores.get_record("docs", "b")).text == "a field of wheat"
            await fp.datastores.delete_records("docs", ["b"])
            with pytest.raises(flowpool.NotFoundError):
                await fp.datastores.get_record("docs", "b")
            assert [d.name for d in await fp.datastores.list()] == ["docs"]
            await fp.datastores.delete("docs")
            assert (await fp.usage.get(group_by="workflow")).to_dict()

    asyncio.run(main())
    assert progress and progress[-1][0] == progress[-1][1]  # the body was sent whole, saying so as it went


# Streams.

def test_a_streamed_completion_gives_each_chunk_then_the_final_completion(client: Client) -> None:
    ref = _ref("steps")
    client.upload(ref, STREAMING_WORKFLOW)

    async def main() -> list[Any]:
        async with _async(client) as fp:
            stream = await fp.workflow.completions.create(model=f"workflow:{ref}", input={}, stream=True)
            return [event async for event in stream]

    events = asyncio.run(main())
    assert [(e.object, e.type, e.content) for e in events[:-1]] == [("workflow.chunk", "step", n) for n in range(3)]
    final = events[-1]
    assert final.object == "chat.completion" and final.output.to_dict() == {"steps": 3}
    assert final.choices[0].message.content == '{"steps":3}'


def test_an_error_event_mid_stream_is_raised_as_its_api_error_after_the_chunks_before_it(client: Client) -> None:
    ref = _ref("fails")
    client.upload(ref, FAILING_WORKFLOW)
    events: list[Any] = []

    async def main() -> None:
        async with _async(client) as fp:
            async for event in await fp.workflow.completions.create(model=f"workflow:{ref}", input={}, stream=True):
                events.append(event)

    with pytest.raises(flowpool.InternalServerError) as raised:
        asyncio.run(main())
    assert [(e.object, e.type, e.content) for e in events] == [("workflow.chunk", "step", 1)]
    error = raised.value
    assert (error.status_code, error.type) == (500, "script_error")
    assert error.request_id == events[0].request_id
    assert client.run(error.request_id)["status"] == "failed"


def test_a_stream_of_an_unknown_workflow_raises_when_awaited() -> None:
    with CannedHTTPServer(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 58\r\n"
                          b"Connection: close\r\n\r\n"
                          b'{"error": {"type": "not_found", "message": "no such flow"}}') as server:
        async def main() -> None:
            async with flowpool.AsyncFlowpool(api_key="fp_x", base_url=server.url, max_retries=0) as fp:
                await fp.workflow.completions.create(model="workflow:none", input={}, stream=True)

        with pytest.raises(flowpool.NotFoundError, match="no such flow"):
            asyncio.run(main())


# Typed errors, from real answers.

def test_each_error_status_raises_its_own_class(client: Client, stack_db: redis.Redis) -> None:
    failing, sleeping, slow = _ref("fails"), _ref("sleeps"), _ref("slow")
    client.upload(failing, FAILING_WORKFLOW)
    client.upload(sleeping, SLEEPING_WORKFLOW)
    client.upload(slow, SLOW_WORKFLOW)
    LimitStore(stack_db, Settings()).set(Accounts(stack_db).authenticate(client.key).id, concurrency=1)

    async def raised(fp: flowpool.AsyncFlowpool, ref: str, **body: Any) -> flowpool.APIError:
        with pytest.raises(flowpool.APIError) as caught:
            await fp.workflow.completions.create(model=f"workflow:{ref}", **body)
        return caught.value

    async def main() -> list[flowpool.APIError]:
        async with _async(client) as fp:
            errors = [await raised(fp, failing, messages="not a list"),
                      await raised(fp.with_options(api_key="fp_bogus"), failing, input={}),
                      await raised(fp, "nowhere-to-be-found", input={}),
                      await raised(fp, sleeping, input={})]
            holder = asyncio.create_task(fp.workflow.completions.create(model=f"workflow:{slow}",
                                                                        input={"seconds": 3}))
            await asyncio.to_thread(eventually, lambda: _runs(client, slow), what="the slot is taken")
            errors.append(await raised(fp, slow, input={"seconds": 0}))
            await holder  # the slot is free again
            return [*errors, await raised(fp, failing, input={})]

    errors = asyncio.run(main())
    assert [(type(e), e.status_code) for e in errors] == [
        (flowpool.BadRequestError, 400), (flowpool.AuthenticationError, 401), (flowpool.NotFoundError, 404),
        (flowpool.WorkflowTimeoutError, 408), (flowpool.RateLimitError, 429), (flowpool.InternalServerError, 500)]
    timed_out, limited, failed = errors[3], errors[4], errors[5]
    assert timed_out.type == "timeout" and client.run(timed_out.request_id)["status"] == "timed_out"
    assert limited.headers["x-should-retry"] == "true" and "concurrency" in (limited.message or "")
    assert failed.message == "ZeroDivisionError: division by zero" and failed.request_id.startswith("req_")


# Retries.

def test_a_429_is_sent_again_after_its_retry_after_until_the_slot_comes_back(client: Client,
                                                                             stack_db: redis.Redis) -> None:
    LimitStore(stack_db, Settings()).set(Accounts(stack_db).authenticate(client.key).id, concurrency=1)
    ref = _ref("slow")
    client.upload(ref, SLOW_WORKFLOW)
    answers: list[tuple[float, int, str | None, str | None]] = []

    async def record(response: httpx2.Response) -> None:
        answers.append((time.monotonic(), response.status_code, response.headers.get("Retry-After"),
                        response.request.headers.get("Idempotency-Key")))

    async def main() -> Any:
        async with _async(client, max_retries=20) as fp:
            fp.http_client.event_hooks["response"].append(record)
            return await fp.workflow.completions.create(model=f"workflow:{ref}", input={"seconds": 0})

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(client.invoke, ref, input={"seconds": 3})  # takes the account's one slot
        eventually(lambda: _runs(client, ref), what="the first run")
        done = asyncio.run(main())
        assert holder.result().status_code == 200
    assert done.output == 0
    assert [a[1] for a in answers] == [429] * (len(answers) - 1) + [200] and len(answers) >= 2
    assert len({a[3] for a in answers}) == 1  # every try carried the call's one Idempotency-Key
    for (sent_at, _, retry_after, _), (next_at, _, _, _) in zip(answers, answers[1:]):
        assert retry_after is not None and next_at - sent_at >= float(retry_after)


def test_a_429_asking_for_a_long_wait_and_a_failed_run_are_raised_at_once(client: Client,
                                                                          stack_db: redis.Redis) -> None:
    if 86400 - time.time() % 86400 < 120:  # seconds to the next UTC midnight
        pytest.skip("the daily budget starts again within the test")
    failing, slow = _ref("fails"), _ref("slow")
    client.upload(failing, FAILING_WORKFLOW)
    client.upload(slow, SLOW_WORKFLOW)
    tries: list[int] = []

    async def record(response: httpx2.Response) -> None:
        tries.append(response.status_code)

    async def main(ref: str, **body: Any) -> flowpool.APIError:
        async with _async(client, max_retries=5) as fp:
            fp.http_client.event_hooks["response"].append(record)
            with pytest.raises(flowpool.APIError) as raised:
                await fp.workflow.completions.create(model=f"workflow:{ref}", input=body)
            return raised.value

    failed = asyncio.run(main(failing))
    assert (failed.status_code, failed.headers["x-should-retry"], tries) == (500, "false", [500])
    assert len(_runs(client, failing)) == 1  # a failed run is never run again

    LimitStore(stack_db, Settings()).set(Accounts(stack_db).authenticate(client.key).id, compute_seconds_per_day=1)
    assert client.invoke(slow, input={"seconds": 1.2}).status_code == 200  # spends today's one compute second
    tries.clear()
    limited = asyncio.run(main(slow, seconds=0))
    assert isinstance(limited, flowpool.RateLimitError) and tries == [429]  # Retry-After says midnight
    assert int(limited.headers["Retry-After"]) > 10 and limited.headers["x-should-retry"] == "true"


class _LosesFirstAnswer:
    """A loopback proxy to the API that forwards every request whole, but drops the connection instead of passing
    on the first answer: the call was run, and its caller never heard."""

    def __init__(self, target: str) -> None:
        self.keys: list[str | None] = []
        self.answers: list[http.client.HTTPResponse] = []
        origin = urlsplit(target)
        proxy = self

        class _Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                method, path, _ = self.rfile.readline().decode("latin-1").split(" ", 2)
                headers = http.client.parse_headers(self.rfile)
                body = self.rfile.read(int(headers.get("Content-Length") or 0))
                proxy.keys.append(headers.get("Idempotency-Key"))
                upstream = http.client.HTTPConnection(origin.hostname, origin.port, timeout=60)
                forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(method, path, body=body, headers=forwarded)
                answer = upstream.getresponse()
                content = answer.read()
                upstream.close()
                proxy.answers.append(answer)
                if len(proxy.answers) == 1:
                    return  # the connection closes with no answer
                kept = [(k, v) for k, v in answer.getheaders()
                        if k.lower() not in ("connection", "content-length", "transfer-encoding")]
                head = "".join(f"{k}: {v}\r\n" for k, v in kept)
                self.wfile.write(f"HTTP/1.1 {answer.status} {answer.reason}\r\n{head}Content-Length: {len(content)}"
                                 f"\r\nConnection: close\r\n\r\n".encode("latin-1") + content)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="loses-first", daemon=True)

    def __enter__(self) -> _LosesFirstAnswer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def test_a_call_whose_answer_was_lost_is_sent_again_with_its_key_and_answered_with_the_first_run(
        client: Client) -> None:
    ref = _ref("once")
    client.upload(ref, "import random\n\ndef execute(ctx):\n    return {'draw': random.random()}\n")
    with _LosesFirstAnswer(client.base_url) as proxy:
        async def main() -> Any:
            async with _async(client, base_url=proxy.url, max_retries=2) as fp:
                return await fp.workflow.completions.create(model=f"workflow:{ref}", input={}, cache=False)

        answer = asyncio.run(main())
    assert len(proxy.keys) == 2 and proxy.keys[0] == proxy.keys[1] and proxy.keys[0]
    (run,) = _runs(client, ref)  # the second try started nothing: the server answered from the first run
    assert answer.request_id == run["request_id"]
    assert proxy.answers[1].getheader("Idempotent-Replayed") == "true"


# Transport failures.

def test_a_refused_connection_is_an_api_connection_error_chained_from_httpx2() -> None:
    async def main() -> None:
        async with flowpool.AsyncFlowpool(api_key="fp_x", base_url=f"http://127.0.0.1:{free_port()}",
                                          max_retries=1) as fp:
            await fp.workflow.completions.create(model="workflow:echo", input={})

    with pytest.raises(flowpool.APIConnectionError) as raised:
        asyncio.run(main())
    error = raised.value
    assert type(error) is flowpool.APIConnectionError and isinstance(error, flowpool.APIError)
    assert (error.status_code, error.body, error.request_id) == (None, None, None)
    assert isinstance(error.__cause__, httpx2.ConnectError)


def test_a_call_past_its_timeout_is_an_api_timeout_error() -> None:
    with SilentServer() as silent:
        async def main() -> list[flowpool.APIError]:
            caught = []
            async with flowpool.AsyncFlowpool(api_key="fp_x", base_url=silent.url, timeout=(5, 0.3),
                                              max_retries=3) as fp:
                for call in (lambda: fp.workflows.list(),  # the client's (connect, read) timeout
                             lambda: fp.with_options(timeout=60).workflow.completions.create(
                                 model="workflow:x", input={}, timeout=0.3),  # a call's own
                             lambda: fp.with_options(timeout=60).workflow.runs.create(
                                 model="workflow:x", input={}, timeout=0.3)):
                    with pytest.raises(flowpool.APITimeoutError) as raised:
                        await call()
                    caught.append(raised.value)
            return caught

        errors = asyncio.run(main())
    assert all(isinstance(e.__cause__, httpx2.ReadTimeout) and e.status_code is None for e in errors)
    bounds = [e.__cause__.request.extensions["timeout"] for e in errors]  # what each try was sent with
    assert [(b["connect"], b["read"]) for b in bounds] == [(5, 0.3), (0.3, 0.3), (0.3, 0.3)]


# with_options.

def _connections_to(url: str) -> int:
    port = urlsplit(url).port
    return sum(1 for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port
               and c.status == psutil.CONN_ESTABLISHED)


def test_with_options_makes_a_client_of_other_options_on_the_same_connection_pool(client: Client) -> None:
    ref = _ref("echo")
    client.upload(ref, ECHO_WORKFLOW)

    before = _connections_to(client.base_url)  # the test's own client keeps one

    async def main() -> None:
        async with _async(client) as fp:
            other = fp.with_options(timeout=5, max_retries=3, default_headers={"X-Trace": "t1"})
            assert other.http_client is fp.http_client
            assert (other.timeout, other.max_retries, other.api_key) == (5, 3, fp.api_key)
            assert (fp.timeout, fp.max_retries, dict(fp.default_headers)) == (60, 0, {})
            for each in (fp, other, fp, other):
                assert (await each.workflow.completions.create(model=f"workflow:{ref}", input={"text": "x"})).output
            assert _connections_to(client.base_url) == before + 1  # one kept-alive connection served both
            with pytest.raises(flowpool.AuthenticationError):
                await fp.with_options(api_key="fp_bogus").workflows.list()
            assert await fp.workflows.list()  # the key went with the request, not into the pool
            with pytest.raises(TypeError, match="not colour"):
                fp.with_options(colour="red")

    asyncio.run(main())


# Maitai.

def test_async_maitai_reads_maitai_variables_first_and_sends_its_key_as_x_maitai_api_key(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWPOOL_API_KEY", "fp_not_this_one")
    monkeypatch.setenv("FLOWPOOL_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MAITAI_API_KEY", client.key)
    monkeypatch.setenv("MAITAI_BASE_URL", client.base_url + "/")
    ref = _ref("echo")
    client.upload(ref, ECHO_WORKFLOW)

    async def main() -> Any:
        async with flowpool.MaitaiAsync() as maitai:
            assert isinstance(maitai, flowpool.AsyncMaitai) and maitai.base_url == client.base_url
            return await maitai.workflow.completions.create(model=f"workflow:{ref}", input={"text": "m"})

    assert asyncio.run(main()).output.echo == "m"

    with CannedHTTPServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
                          b"Connection: close\r\n\r\n" b'{"data": []}') as server:
        monkeypatch.setenv("MAITAI_BASE_URL", server.url)

        async def listed() -> None:
            async with flowpool.AsyncMaitai() as maitai:
                assert await maitai.workflows.list() == []

        asyncio.run(listed())
    (head,) = server.heads
    assert f"x-maitai-api-key: {client.key}\r\n".lower() in head.lower() and "\nx-api-key" not in head.lower()

    monkeypatch.delenv("MAITAI_API_KEY")
    monkeypatch.delenv("MAITAI_BASE_URL")
    fallback = flowpool.AsyncMaitai()
    assert (fallback.api_key, fallback.base_url) == ("fp_not_this_one", "http://127.0.0.1:9")
    asyncio.run(fallback.close())
