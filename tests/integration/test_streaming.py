"""stream: true over SSE, and the official openai client pointed at /workflow."""
from __future__ import annotations

import json
import uuid
from typing import Any, Iterator

import openai
import requests

from tests.helpers import Client, error_of
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
