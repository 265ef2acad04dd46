"""``POST /workflow/chat/completions``: invoke a workflow like a model."""
from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any, Iterator

from flask import Blueprint, Response, jsonify

from flowpool.errors import (FlowpoolError, PayloadTooLarge, RequestError, RunError, RunNotStarted, Unavailable,
                             run_error_from_dict)
from flowpool.registry import ResolvedWorkflow, check_input
from flowpool.runs import RunStatus
from flowpool.tasks import RUN_TASK

from .app import Services, authenticate, mark, services
from .models import InvokeRequest, parse_model
from .parsing import json_body, model_from

bp = Blueprint("invoke", __name__)


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def completion(model: str, request_id: str, session_id: str, done: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` answer of a finished run, with flowpool's own fields."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.get("content")},
                     "finish_reason": "stop"}],
        "usage": done.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "request_id": request_id,
        "session_id": session_id,
        "output": done.get("output"),
    }


def _check_input(body: InvokeRequest, workflow: ResolvedWorkflow, limit: int) -> None:
    size = len(json.dumps(body.input)) + len(json.dumps([m.model_dump() for m in body.messages or []]))
    if size > limit:
        raise PayloadTooLarge(f"input and messages are {size} bytes as JSON, over the limit of {limit}")
    schema = workflow.input_schema
    if body.input is None and schema and not any(spec.get("required") for spec in schema.values()):
        return  # only messages came, and the schema asks for nothing
    check_input(schema, body.input if body.input is not None else {})


def _answer(body: InvokeRequest, request_id: str, session_id: str, done: dict[str, Any], cache: str) -> Response:
    if done.get("error"):
        error = run_error_from_dict(done["error"])
        error.details["request_id"] = request_id
        raise error
    response = jsonify(completion(body.model, request_id, session_id, done))
    response.headers["X-Request-Id"] = request_id
    response.headers["X-Cache"] = cache
    return response


@bp.post("/workflow/chat/completions")
def chat_completions() -> Response:
    svc = services()
    settings = svc.settings
    account = authenticate()
    body = model_from(InvokeRequest, json_body())
    if body.messages is None and body.input is None:
        raise RequestError("send 'messages', 'input' or both", param="input")
    ref, pinned = parse_model(body.model)
    request_id = _new_id("req_")
    session_id = body.session_id or _new_id("sess_")
    request = body.model_dump(include={"input", "max_tokens", "temperature", "metadata"})
    request["messages"] = [m.model_dump(exclude_none=True) for m in body.messages] if body.messages else None
    mark("parse")

    workflow = svc.resolve(account.id, ref, pinned)
    for _ in range(3):
        _check_input(body, workflow, settings.max_input_bytes)
        soft = settings.clamp_timeout(workflow.timeout_seconds)
        run_seconds = soft + settings.run_deadline_slack
        ttl = workflow.cache_ttl_seconds if workflow.cache_ttl_seconds is not None \
            else settings.default_cache_ttl_seconds
        cache_key = None
        if body.cache and ttl > 0:
            cache_key = svc.cache.key(account.id, workflow.content_hash, workflow.config_hash, request, body.secrets)
        queued = {"status": RunStatus.QUEUED, "version": workflow.version, "session_id": session_id,
                  "cache_hit": False, "queued_at": time.time(), "timeout_seconds": soft, "metadata": body.metadata}
        state, found = svc.runs.begin(
            account.id, workflow.ref, request_id, queued,
            cache_keys=svc.cache.redis_keys(account.id, cache_key) if cache_key else None,
            lock_seconds=settings.queue_wait_seconds + run_seconds, rev=workflow.rev)
        if state != "stale":
            break
        workflow = svc.resolve(account.id, ref, pinned, fresh=True)
    else:
        raise Unavailable(f"workflow {ref!r} changed three times while this request started; try again")
    mark("begin")
    if state in ("hit", "hit-unrecorded"):
        if state == "hit-unrecorded":
            _record_hit(svc, body, workflow, request_id, session_id, found)
        done = dict(found, status="succeeded")
        if body.stream:
            return stream_response(svc, body.model, request_id, session_id,
                                   _replay(found.get("chunks") or [], done), "HIT")
        return _answer(body, request_id, session_id, done, "HIT")
    if state == "join":
        # An identical request is running: share its run instead of starting one.
        if body.stream:
            return stream_response(svc, body.model, found, session_id, svc.runs.events(
                found, settings.queue_wait_seconds, run_seconds, keepalive=settings.stream_keepalive_seconds), "HIT")
        done = _wait(svc, found, run_seconds)
        return _answer(body, found, session_id, done, "HIT")

    try:
        if not svc.workers_alive():
            raise Unavailable("no flowpool worker is running; start one with 'flowpool worker'")
        _submit(svc, body, workflow, request_id, session_id, soft, request, cache_key, ttl)
    except BaseException as exc:
        if cache_key is not None:
            svc.cache.release(account.id, cache_key, request_id)
        svc.runs.abandon(request_id, RunStatus.QUEUED, RunNotStarted(str(exc)), workflow.version)
        raise
    mark("submit")
    if body.stream:
        return stream_response(svc, body.model, request_id, session_id, svc.runs.events(
            request_id, settings.queue_wait_seconds, run_seconds, keepalive=settings.stream_keepalive_seconds),
            "MISS", cancel_on_disconnect=body.on_disconnect == "cancel")
    done = _wait(svc, request_id, run_seconds)
    mark("wait")
    return _answer(body, request_id, session_id, done, "MISS")


def _sse(payload: Any, event_id: str = "") -> str:
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event_id}\ndata: {data}\n\n" if event_id else f"data: {data}\n\n"


Events = Iterator[tuple[str, str, dict[str, Any]]]


def stream_response(svc: Services, model: str, request_id: str, session_id: str, events: Events, cache: str,
                    cancel_on_disconnect: bool = False) -> Response:
    """Answer as ``text/event-stream``: each emitted chunk, then the chat.completion, then ``[DONE]``.

    Each event carries the run's stream entry id as its SSE ``id``, so
    ``GET /api/v1/runs/{request_id}/stream`` with ``Last-Event-ID`` resumes a
    dropped connection. A run that fails before its first event is answered
    with the plain JSON error and its status; after it, with an ``error``
    event. A caller that goes away leaves the run going, unless it asked for
    ``"on_disconnect": "cancel"``.
    """
    try:
        first = next(events)
        while first[1] == "ping":
            first = next(events)
    except RunError as exc:
        exc.details.setdefault("request_id", request_id)
        raise
    if first[1] == "done" and first[2].get("error"):
        error = run_error_from_dict(first[2]["error"])
        error.details["request_id"] = request_id
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
                finished = True
                done = svc.runs.take_reply(request_id, data)
                if done.get("error"):
                    error = run_error_from_dict(done["error"])
                    error.details["request_id"] = request_id
                    yield _sse(error.to_body(), event_id)
                else:
                    final = completion(model, request_id, session_id, done)
                    final["choices"][0]["delta"] = dict(final["choices"][0]["message"])
                    yield _sse(final, event_id)
                break
        except RunError as exc:
            finished = True
            exc.details.setdefault("request_id", request_id)
            yield _sse(exc.to_body())
        except GeneratorExit:  # the caller went away
            if cancel_on_disconnect and not finished:
                svc.runs.request_cancel(request_id)
            raise
        yield "data: [DONE]\n\n"

    response = Response(generate(), mimetype="text/event-stream")
    response.headers.update({"X-Request-Id": request_id, "X-Cache": cache, "Cache-Control": "no-cache",
                             "X-Accel-Buffering": "no"})
    return response


def _replay(chunks: list[dict[str, Any]], done: dict[str, Any]) -> Events:
    """A cached run's events: its stored chunks, then its end."""
    for index, chunk in enumerate(chunks):
        yield "", "chunk", {**chunk, "index": index}
    yield "", "done", done


def _wait(svc: Services, request_id: str, run_seconds: float) -> dict[str, Any]:
    """The end of a run; an error raised while waiting names the run, so the caller can look it up."""
    try:
        return svc.runs.take_reply(request_id, svc.runs.wait(request_id, svc.settings.queue_wait_seconds,
                                                             run_seconds))
    except RunError as exc:
        exc.details.setdefault("request_id", request_id)
        raise


def _record_hit(svc: Services, body: InvokeRequest, workflow: ResolvedWorkflow, request_id: str,
                session_id: str, entry: dict[str, Any]) -> None:
    now = time.time()
    pipe = svc.redis.pipeline(transaction=False)
    svc.runs.create(pipe, workflow.account_id, workflow.ref, request_id, {
        "status": RunStatus.SUCCEEDED, "version": entry.get("version"), "session_id": session_id,
        "cache_hit": True, "origin_request_id": entry.get("request_id"), "queued_at": now, "started_at": now,
        "finished_at": now, "output": entry.get("output"), "usage": entry.get("usage"),
        "chunk_count": len(entry.get("chunks") or ()), "metadata": body.metadata,
    })
    pipe.execute()


def _submit(svc: Services, body: InvokeRequest, workflow: ResolvedWorkflow, request_id: str, session_id: str,
            soft: float, request: dict[str, Any], cache_key: str | None, ttl: int) -> None:
    """Hand a queued run to the workers."""
    settings = svc.settings
    job = {
        "request_id": request_id, "account": workflow.account_id, "workflow": workflow.ref,
        "version": workflow.version, "content_hash": workflow.content_hash, "soft_seconds": soft,
        "input": body.input, "messages": request["messages"] or [], "secrets": body.secrets or {},
        "metadata": body.metadata or {}, "session_id": session_id, "env": workflow.env,
        "params": {"max_tokens": body.max_tokens, "temperature": body.temperature, "stream": body.stream},
        "output_schema": workflow.output_schema, "application": workflow.application, "limits": workflow.limits,
        "cache": {"key": cache_key, "ttl": ttl} if cache_key else None,
    }
    try:
        svc.celery.send_task(
            RUN_TASK, kwargs={"job": job}, task_id=request_id, expires=settings.queue_wait_seconds,
            # Keep secrets out of worker logs and task events (Flower).
            argsrepr="()", kwargsrepr=f"{{'job': <run {request_id} of {workflow.ref}@{workflow.version}>}}",
        )
    except FlowpoolError:
        raise
    except Exception as exc:
        raise Unavailable(f"the broker did not take the run: {exc}") from exc


__all__ = ["bp", "completion", "stream_response"]
