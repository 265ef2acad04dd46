"""stream: true over SSE, and the official openai client pointed at /workflow."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

import openai
import pytest
import requests

from tests.helpers import Client, error_of, eventually, sse_events
from tests.provider import StandInProvider

WAITS_ON_A_GATE = """
    import time

    def execute(ctx):
        ctx.emit("progress", "started")
        while not ctx.http.get("{gate}").json()["open"]:
            time.sleep(0.02)
        for i in range(3):
            ctx.emit("step", i)
        return {{"done": True}}
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _events(response: requests.Response) -> Iterator[Any]:
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def test_the_first_chunk_arrives_while_the_run_is_still_going(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("gated"), f"{provider.origin}/gate/{uuid.uuid4().hex}"
    client.upload(ref, WAITS_ON_A_GATE.format(gate=gate))
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True},
                     stream=True, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"
        events = _events(response)
        first = next(events)
        # The run cannot finish before the gate opens, and the gate opens only now.
        assert first["object"] == "workflow.chunk" and first["content"] == "started" and first["index"] == 0
        assert first["request_id"] == response.headers["X-Request-Id"]
        requests.post(gate, timeout=5)
        rest = list(events)
    steps, final, end = rest[:-2], rest[-2], rest[-1]
    assert [(e["type"], e["content"], e["index"]) for e in steps] == [("step", 0, 1), ("step", 1, 2), ("step", 2, 3)]
    assert final["object"] == "chat.completion" and final["output"] == {"done": True}
    assert end == "[DONE]"


@pytest.mark.parametrize("before", ["http", "nested"])
def test_a_chunk_emitted_before_a_blocking_ctx_call_arrives_while_the_call_waits(
        client: Client, provider: StandInProvider, before: str) -> None:
    """Emits go out before a ctx call is served: a "calling" chunk is not held behind the call it announces."""
    name = uuid.uuid4().hex
    hold = f"{provider.origin}/hold/{name}"
    ref = _ref("announces")
    if before == "http":
        call = f'ctx.http.get("{hold}")'
    else:  # the nested workflow's own call blocks; the caller's chunk must not wait for it
        inner = _ref("holds")
        client.upload(inner, f"""
            def execute(ctx):
                return ctx.http.get("{hold}").json()
        """)
        call = f'ctx.workflows.call("{inner}", input={{}})'
    client.upload(ref, f"""
        def execute(ctx):
            ctx.emit("progress", "calling")
            {call}
            return "called"
    """)
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True,
                                                         "cache": False}, stream=True, timeout=30) as response:
        assert response.status_code == 200
        events = _events(response)
        first = next(events)  # the call is held until the gate opens, and the gate opens only after this
        assert first["type"] == "progress" and first["content"] == "calling"
        eventually(lambda: provider.held(name) == 1, what="the call reaches the gate")
        provider.open_gate(name)
        rest = list(events)
    assert rest[-2]["output"] == "called" and rest[-1] == "[DONE]"


def test_a_failure_before_the_first_event_is_a_plain_json_error(client: Client) -> None:
    ref = _ref("fails-early")
    client.upload(ref, "def execute(ctx):\n    raise ValueError('early')\n")
    response = client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {},
                                                               "stream": True})
    assert response.status_code == 500
    assert "ValueError: early" in error_of(response)["message"]


def test_a_failure_after_the_first_event_is_an_error_event_then_done(client: Client) -> None:
    ref = _ref("fails-late")
    client.upload(ref, "def execute(ctx):\n    ctx.emit('progress', 1)\n    raise ValueError('late')\n")
    response = client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {},
                                                               "stream": True}, stream=True)
    assert response.status_code == 200
    chunk, error, end = list(_events(response))
    assert chunk["type"] == "progress"
    assert error["error"]["code"] == 500 and "ValueError: late" in error["error"]["message"]
    assert end == "[DONE]"


def test_a_cache_hit_replays_the_stored_chunks_and_the_final_object(client: Client) -> None:
    ref = _ref("replay")
    client.upload(ref, "def execute(ctx):\n    ctx.emit('a', 1)\n    ctx.emit('b', 2)\n    return 'ok'\n")
    body = {"model": f"workflow:{ref}", "input": {"q": 1}, "stream": True}
    first = client.post("/workflow/chat/completions", json=body)
    second = client.post("/workflow/chat/completions", json=body)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    one, two = list(_events(first)), list(_events(second))
    assert [(e["type"], e["content"]) for e in one[:2]] == [(e["type"], e["content"]) for e in two[:2]] == \
        [("a", 1), ("b", 2)]
    assert one[2]["choices"][0]["message"]["content"] == two[2]["choices"][0]["message"]["content"] == "ok"
    assert one[-1] == two[-1] == "[DONE]"


def test_the_official_openai_client_calls_a_workflow(client: Client) -> None:
    ref = _ref("openai")
    client.upload(ref, """
        def execute(ctx):
            ctx.emit("progress", "thinking")
            return f"{ctx.input['greeting']}, {ctx.secrets['name']} ({ctx.session_id})"
    """)
    oa = openai.OpenAI(api_key=client.key, base_url=client.base_url + "/workflow", max_retries=0)
    extra = {"input": {"greeting": "hello"}, "secrets": {"name": "Ada"}, "session_id": "s-1"}
    reply = oa.chat.completions.create(model=f"workflow:{ref}", messages=[{"role": "user", "content": "hi"}],
                                       extra_body=extra)
    assert reply.choices[0].message.content == "hello, Ada (s-1)"
    assert reply.model == f"workflow:{ref}"

    stream = oa.chat.completions.create(model=f"workflow:{ref}", messages=[{"role": "user", "content": "hi"}],
                                        stream=True, extra_body={**extra, "cache": False})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello, Ada (s-1)"
    assert chunks[0].to_dict()["type"] == "progress"


def test_the_openai_client_sees_errors_as_its_own_exceptions(client: Client) -> None:
    oa = openai.OpenAI(api_key=client.key, base_url=client.base_url + "/workflow", max_retries=0)
    try:
        oa.chat.completions.create(model="workflow:does-not-exist", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as exc:
        assert "does-not-exist" in str(exc)
    else:
        raise AssertionError("expected a 404")
    bad = openai.OpenAI(api_key="fp_wrong", base_url=client.base_url + "/workflow", max_retries=0)
    try:
        bad.chat.completions.create(model="workflow:x", messages=[{"role": "user", "content": "x"}])
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("expected a 401")


def test_many_chunks_arrive_in_order_and_complete_with_ids(client: Client) -> None:
    ref = _ref("many")
    client.upload(ref, "def execute(ctx):\n    for i in range(500):\n        ctx.emit('n', i)\n    return 'done'\n")
    response = client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {},
                                                               "stream": True}, stream=True)
    events = list(sse_events(response, comments=True))
    chunks = [e for e in events if e.get("data", {}) != "[DONE]" and "data" in e][:-1]
    assert [e["data"]["content"] for e in chunks] == list(range(500))
    assert [e["data"]["index"] for e in chunks] == list(range(500))
    ids = [e["id"] for e in chunks]
    assert len(set(ids)) == 500 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_a_dropped_stream_resumes_after_the_last_event_id(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("resume"), f"{provider.origin}/gate/{uuid.uuid4().hex}"
    client.upload(ref, WAITS_ON_A_GATE.format(gate=gate))
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True},
                     stream=True, timeout=30) as response:
        request_id = response.headers["X-Request-Id"]
        first = next(e for e in sse_events(response, comments=True) if "data" in e)
    # The connection is gone; the run goes on.
    requests.post(gate, timeout=5)
    with client.get(f"/api/v1/runs/{request_id}/stream", headers={"Last-Event-ID": first["id"]},
                    stream=True, timeout=30) as resumed:
        assert resumed.status_code == 200
        rest = [e["data"] for e in sse_events(resumed, comments=True) if "data" in e]
    assert [e["content"] for e in rest[:3]] == [0, 1, 2]
    assert rest[3]["output"] == {"done": True} and rest[-1] == "[DONE]"
    # From the start, everything again.
    with client.get(f"/api/v1/runs/{request_id}/stream", stream=True, timeout=30) as again:
        assert [e["data"]["content"] for e in [e for e in sse_events(again, comments=True) if "data" in e][:4]] == \
            ["started", 0, 1, 2]
    assert client.get(f"/api/v1/runs/{request_id}/stream", headers={"Last-Event-ID": "nonsense"}).status_code == 400


def test_an_idle_stream_gets_keep_alive_comments(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("idle"), f"{provider.origin}/gate/{uuid.uuid4().hex}"
    client.upload(ref, WAITS_ON_A_GATE.format(gate=gate))
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True},
                     stream=True, timeout=30) as response:
        events = sse_events(response, comments=True)
        assert "data" in next(events)
        assert next(events) == {"comment": ": keep-alive"}  # nothing happens until the gate opens
        requests.post(gate, timeout=5)
        assert [e for e in events if "data" in e][-1]["data"] == "[DONE]"


def test_a_caller_that_disconnects_leaves_the_run_going_and_cached(client: Client,
                                                                  provider: StandInProvider) -> None:
    ref, gate = _ref("leaves"), f"{provider.origin}/gate/{uuid.uuid4().hex}"
    client.upload(ref, WAITS_ON_A_GATE.format(gate=gate))
    body = {"model": f"workflow:{ref}", "input": {}, "stream": True}
    with client.post("/workflow/chat/completions", json=body, stream=True, timeout=30) as response:
        request_id = response.headers["X-Request-Id"]
        next(sse_events(response, comments=True))
    requests.post(gate, timeout=5)
    deadline = time.monotonic() + 20
    while client.run(request_id)["status"] != "succeeded":
        assert time.monotonic() < deadline, client.run(request_id)
        time.sleep(0.1)
    assert client.post("/workflow/chat/completions", json=body).headers["X-Cache"] == "HIT"


def test_on_disconnect_cancel_stops_the_run(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("cancels"), f"{provider.origin}/gate/{uuid.uuid4().hex}"
    client.upload(ref, WAITS_ON_A_GATE.format(gate=gate))
    with client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {}, "stream": True,
                                                         "on_disconnect": "cancel"}, stream=True, timeout=30) as r:
        request_id = r.headers["X-Request-Id"]
        next(sse_events(r, comments=True))
    deadline = time.monotonic() + 20
    while client.run(request_id)["status"] != "cancelled":
        assert time.monotonic() < deadline, client.run(request_id)
        time.sleep(0.1)
    assert "cancelled" in client.run(request_id)["error"]["message"]


def test_an_identical_request_joins_the_running_stream(client: Client, provider: StandInProvider) -> None:
    ref, gate = _ref("joins"), f"{provider.origin}/gate/{uuid.uuid4().hex}"
    client.upload(ref, WAITS_ON_A_GATE.format(gate=gate))
    body = {"model": f"workflow:{ref}", "input": {"same": 1}, "stream": True}
    with client.post("/workflow/chat/completions", json=body, stream=True, timeout=30) as leader, \
            client.post("/workflow/chat/completions", json=body, stream=True, timeout=30) as joiner:
        assert joiner.headers["X-Cache"] == "HIT"
        assert joiner.headers["X-Request-Id"] == leader.headers["X-Request-Id"]
        requests.post(gate, timeout=5)
        one = [e["data"] for e in sse_events(leader, comments=True) if "data" in e]
        two = [e["data"] for e in sse_events(joiner, comments=True) if "data" in e]
    assert one[:-2] == two[:-2] and len(one) == len(two)
    assert one[-2]["output"] == two[-2]["output"] == {"done": True} and one[-1] == two[-1] == "[DONE]"
    assert client.get(f"/api/v1/workflows/{ref}/runs").json()["pagination"]["total"] == 1


def test_many_open_streams_do_not_starve_other_requests(client: Client, provider: StandInProvider) -> None:
    """60 streams stay open on an API of one process while their run waits on a gate; other requests still answer.

    The 60 requests are identical, so they share one run (single flight) and
    the worker's slots do not limit how many streams are open.
    """
    import concurrent.futures

    ref, gate = _ref("crowd"), f"{provider.origin}/gate/{uuid.uuid4().hex}"
    client.upload(ref, WAITS_ON_A_GATE.format(gate=gate), timeout_seconds=60)
    cached = _ref("cached")
    client.upload(cached, "def execute(ctx):\n    return 'warm'\n")
    assert client.invoke(cached, input={}).status_code == 200

    def open_stream(n: int) -> requests.Response:
        return client.post("/workflow/chat/completions", json={"model": f"workflow:{ref}", "input": {},
                                                               "stream": True}, stream=True, timeout=(5, 10))

    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        streams = list(pool.map(open_stream, range(60)))
        try:
            assert [s.status_code for s in streams] == [200] * 60
            # Other requests are answered meanwhile (a read timeout here would be starvation).
            assert client.get("/healthz", timeout=5).status_code == 200
            assert client.get("/api/v1/workflows", timeout=5).status_code == 200
            hit = client.invoke(cached, input={}, timeout=5)
            assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT"
        finally:
            requests.post(gate, timeout=5)
            finished = list(pool.map(lambda s: [e for e in sse_events(s) if "data" in e][-1]["data"], streams))
            for s in streams:
                s.close()
    assert finished == ["[DONE]"] * 60


def test_a_timeout_before_the_first_event_is_a_408_and_after_it_an_error_event(client: Client) -> None:
    early, late = _ref("slow-early"), _ref("slow-late")
    client.upload(early, "import time\ndef execute(ctx):\n    time.sleep(10)\n    return 1\n", timeout_seconds=1)
    client.upload(late, "import time\ndef execute(ctx):\n    ctx.emit('p', 1)\n    time.sleep(10)\n    return 1\n",
                  timeout_seconds=1)
    response = client.post("/workflow/chat/completions", json={"model": f"workflow:{early}", "input": {},
                                                               "stream": True}, timeout=20)
    assert response.status_code == 408 and error_of(response)["type"] == "timeout"
    response = client.post("/workflow/chat/completions", json={"model": f"workflow:{late}", "input": {},
                                                               "stream": True}, stream=True, timeout=20)
    assert response.status_code == 200
    chunk, error, end = list(_events(response))
    assert chunk["content"] == 1 and error["error"]["code"] == 408 and end == "[DONE]"
