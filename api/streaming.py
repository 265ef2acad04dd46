"""How a run's end and events are answered: the OpenAI ``chat.completion``, as JSON or as server-sent events."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Iterator

import redis
from flask import Response, jsonify

from flowpool.errors import OutcomeUnavailable, RunError
from flowpool.run import RunEnd, dumps
from flowpool.runs import RunStore
from flowpool.sealing import SecretBox

__all__ = ["Events", "answer", "completion", "replay", "stream_response"]

log = logging.getLogger("flowpool.api")

# (event id, "chunk" | "log" | "ping" | "done", the chunk's or log line's data or the RunEnd), as
# RunStore.events gives them ("log" only to a reader that asked for log lines; its ids then name both streams).
Events = Iterator[tuple[str, str, Any]]


def completion(model: str, request_id: str, session_id: str, end: RunEnd) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` answer of a finished run, with flowpool's own fields."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": end.content},
                     "finish_reason": "stop"}],
        "usage": end.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "request_id": request_id,
        "session_id": session_id,
        "output": end.output,
    }


def answer(model: str, request_id: str, session_id: str, end: RunEnd, cache: str) -> Response:
    """The JSON answer of a finished run; a run that failed raises its error, rendered with its status."""
    error = end.exception(request_id)
    if error is not None:
        raise error
    response = jsonify(completion(model, request_id, session_id, end))
    response.headers["X-Request-Id"] = request_id
    response.headers["X-Cache"] = cache
    return response


def _sse(payload: Any, event_id: str = "", event: str = "") -> str:
    data = dumps(payload)
    head = (f"event: {event}\n" if event else "") + (f"id: {event_id}\n" if event_id else "")
    return f"{head}data: {data}\n\n"


def stream_response(runs: RunStore, model: str, request_id: str, session_id: str, events: Events, cache: str,
                    cancel_on_disconnect: bool = False, box: SecretBox | None = None) -> Response:
    """Answer as ``text/event-stream``: each emitted chunk, then the chat.completion, then ``[DONE]``.

    Log lines, where ``events`` carries them (a run's stream read with
    ``?logs=true``), come in order with the chunks as SSE events named
    ``log`` (``object: workflow.log``), so a client that did not ask never
    sees one; an invoke's stream never carries them.

    Each event carries the run's stream entry id as its SSE ``id`` (with
    log lines, ``<events entry id>.<log entry id>``), so
    ``GET /api/v1/runs/{request_id}/stream`` with ``Last-Event-ID`` resumes a
    dropped connection. A run that fails before its first event is answered
    with the plain JSON error and its status; after it, with an ``error``
    event, as is a Redis that fails under the stream (the run goes on; its
    outcome is unknown here). A caller that goes away leaves the run going, unless it asked for
    ``"on_disconnect": "cancel"``. An output sealed for the request's secrets
    is opened with ``box``; without it (a resumed stream) it stays redacted.
    """
    try:
        first = next(events)
        while first[1] == "ping":
            first = next(events)
    except RunError as exc:
        exc.details.setdefault("request_id", request_id)
        raise
    if first[1] == "done":
        error = first[2].exception(request_id)
        if error is not None:
            raise error

    def generate() -> Iterator[str]:
        finished = False
        try:
            for event_id, kind, data in itertools.chain([first], events):
                if kind == "ping":
                    yield ": keep-alive\n\n"
                    continue
                if kind == "chunk":
                    # "choices": [] keeps OpenAI clients, which read every event as a chunk, happy.
                    yield _sse({"object": "workflow.chunk", "type": data.get("type"), "content": data.get("content"),
                                "index": data.get("index"), "request_id": request_id, "choices": []}, event_id)
                    continue
                if kind == "log":
                    yield _sse({"object": "workflow.log", **_log_line(data), "request_id": request_id}, event_id, "log")
                    continue
                finished = True
                end = runs.take_reply(request_id, data, box)
                error = end.exception(request_id)
                if error is not None:
                    yield _sse(error.to_body(), event_id)
                else:
                    final = completion(model, request_id, session_id, end)
                    final["choices"][0]["delta"] = dict(final["choices"][0]["message"])
                    yield _sse(final, event_id)
                break
        except RunError as exc:
            finished = True
            exc.details.setdefault("request_id", request_id)
            yield _sse(exc.to_body())
        except redis.RedisError as exc:
            finished = True
            log.warning("stream of run %s: Redis failed under it: %s", request_id, exc)
            yield _sse(OutcomeUnavailable(f"Redis failed while the run was followed ({exc}); the run may still finish: "
                                          "look it up by its request_id", request_id=request_id).to_body())
        except GeneratorExit:  # the caller went away
            if cancel_on_disconnect and not finished:
                try:
                    runs.request_cancel(request_id)
                except redis.RedisError as exc:
                    log.warning("run %s: could not ask for it to be cancelled: %s", request_id, exc)
            raise
        yield "data: [DONE]\n\n"

    response = Response(generate(), mimetype="text/event-stream")
    response.headers.update({"X-Request-Id": request_id, "X-Cache": cache, "Cache-Control": "no-cache",
                             "X-Accel-Buffering": "no"})
    return response


def _log_line(data: dict[str, Any]) -> dict[str, Any]:
    """A log line as a ``log`` event shows it: level, msg, time, fields (when it has some) and its index."""
    return {key: data[key] for key in ("level", "msg", "time", "fields", "index") if key in data}


def replay(chunks: list[dict[str, Any]], end: RunEnd) -> Events:
    """A cached run's events: its stored chunks, then its end."""
    for index, chunk in enumerate(chunks):
        yield "", "chunk", {**chunk, "index": index}
    yield "", "done", end
