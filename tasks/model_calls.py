"""Model calls made by the worker for a run: routing, retries, fallbacks, monitoring.

The script asks ``ctx.chat.completions.create(intent=...)``; the worker looks
up the account's application, calls the intent's OpenAI-compatible endpoint
with the provider key (which never enters the sandbox), retries 429 and 5xx
answers with backoff, moves down the fallback list, and records every call on
the run. Each call times out inside the run's remaining budget. The
keywords the seed documents as Maitai's own (``session_id``,
``evaluation_enabled``...) are taken before the body is built, never sent
(:mod:`.maitai_params`).

Provider keys come only from the environment variables the operator lists
in ``FLOWPOOL_PROVIDER_KEYS``: the router holds those values and nothing else
of the worker's environment, so an application that names another variable
(stored before the operator changed the list, or written behind the API's
back) fails its call without anything being sent.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import requests

from flowpool.egress import EgressDenied, EgressPolicy, guarded_session
from flowpool.errors import NotFound
from flowpool.live_calls import LiveCalls
from flowpool.registry import Agent, Applications, ProviderKeys, Route
from flowpool.run import RunJob
from flowpool.sandbox import CallErrorKind, CallFailed, Streamed
from flowpool.sse import sse_data

from .maitai_params import TakenParams, take_maitai_params

__all__ = ["ModelRouter", "RunCalls"]

_RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class RunCalls:
    """The model calls of one run: the job they serve (account, ids, messages, secrets) and the records they leave.

    With ``live``, every call of the run (model, agent, HTTP, inline workflow) is also published as it starts
    and ends, for readers of the running run (:mod:`flowpool.live_calls`).
    """

    job: RunJob
    records: list[dict[str, Any]] = field(default_factory=list)  # each names the workflow whose call it is
    live: LiveCalls | None = None

    def child(self, job: RunJob) -> RunCalls:
        """The calls of a workflow this run calls inline with ``job``, recorded (and published) with the run's own."""
        return RunCalls(job, self.records, self.live)

    def started(self, kind: str, entry: dict[str, Any]) -> None:
        """Publish a call of list ``kind`` (model, http, workflow) that starts now (:meth:`LiveCalls.start`)."""
        if self.live is not None:
            self.live.start(kind, entry)

    def ended(self, kind: str, entry: dict[str, Any], started: dict[str, Any] | None = None) -> None:
        """Publish a call's end, ``entry`` as the record keeps it (:meth:`LiveCalls.end`)."""
        if self.live is not None:
            self.live.end(kind, entry, started)

    def dropped(self, started: dict[str, Any]) -> None:
        """Take back a started call the record will not keep (:meth:`LiveCalls.drop`)."""
        if self.live is not None:
            self.live.drop(started)

    def usage(self) -> dict[str, int]:
        """Token usage summed over the run's calls."""
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for record in self.records:
            for key in total:
                total[key] += int(record.get(key) or 0)
        return total


class _Failed(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def _taken(params: dict[str, Any], session_id: Any) -> TakenParams:
    """A call's parameters split as :func:`take_maitai_params` does; a session id no header can carry fails the call."""
    try:
        return take_maitai_params(params, session_id)
    except ValueError as exc:
        raise CallFailed(CallErrorKind.INVALID, str(exc)) from exc


class ModelRouter:
    """Serves the ``chat`` and ``chat.stream`` ctx calls of a worker's runs."""

    def __init__(self, applications: Applications, egress: EgressPolicy, environ: Mapping[str, str],
                 provider_keys: ProviderKeys, retries: int = 2, connect_timeout: float = 5.0) -> None:
        self.applications = applications
        self.egress = egress
        # Only the variables the operator lists: the rest of ``environ`` is never kept.
        self._keys = {name: environ[name] for name in provider_keys.hosts if name in environ}
        self._provider_keys = provider_keys
        self.retries = retries
        self.connect_timeout = connect_timeout
        self._session = guarded_session(egress)

    def chat(self, run: RunCalls, params: dict[str, Any], deadline: float, stream: bool) -> Any:
        """One monitored model call: the response dict, or a Streamed of chunk dicts."""
        name = params.get("application") or run.job.application
        if not name:
            raise CallFailed(CallErrorKind.MODEL,
                             "no application: pass application=... or set APPLICATION in the script")
        try:
            app = self.applications.get(run.job.account, name)
            intent, primary = app.route(params.get("intent"))
        except NotFound as exc:
            raise CallFailed(CallErrorKind.MODEL, exc.message) from exc
        except KeyError as exc:
            raise CallFailed(CallErrorKind.MODEL, f"application {name!r}: {exc.args[0]}") from exc
        routes: list[Route] = [primary, *primary.fallbacks]
        taken = _taken(params.get("params") or {}, params.get("session_id"))
        body_params = taken.body
        messages = params.get("messages")
        if messages is None:
            messages = run.job.messages
        failures = []
        for index, route in enumerate(routes):
            model = params.get("model") if index == 0 and params.get("model") else route.model
            body = {"model": model, "messages": messages, **route.params, **body_params}
            record = {"kind": "model", "application": name, "intent": intent, "model": model,
                      "provider_host": urlsplit(route.base_url).hostname, "fallback": index,
                      "stream": stream, "started_at": time.time(), "attempts": 0,
                      "session_id": taken.session_id or run.job.session_id, "taken_params": taken.taken,
                      "workflow": run.job.workflow}
            run.started("model", record)
            try:
                if stream:
                    # Posted here, read lazily: a route that refuses or fails before its stream starts moves on to
                    # the next one, as a plain call does.
                    started = time.monotonic()
                    response = self._post(run, route, body, record, deadline, stream=True, started=started)
                    return Streamed(self._stream(run, response, record, started))
                return self._complete(run, route, body, record, deadline)
            except _Failed as exc:
                if "status" not in record:  # given up before anything went out: the record keeps no entry of it
                    run.dropped(record)
                failures.append(f"{model} at {record['provider_host']}: {exc}")
        raise CallFailed(CallErrorKind.MODEL, f"every route of {name}/{intent} failed: " + "; ".join(failures))

    def agent(self, run: RunCalls, name: str, agent: Agent, messages: list[dict[str, Any]],
              params: dict[str, Any], deadline: float, session_id: Any = None) -> dict[str, Any]:
        """Call an agent endpoint (OpenAI-compatible), monitored like a model call."""
        assert agent.base_url is not None
        route = Route(model=agent.model or name, base_url=agent.base_url, api_key_env=agent.api_key_env,
                      api_key_secret=agent.api_key_secret, params=agent.params)
        taken = _taken(params, session_id)
        body = {"model": route.model, "messages": messages, **route.params, **taken.body}
        record = {"kind": "agent", "agent": name, "model": route.model,
                  "provider_host": urlsplit(route.base_url).hostname, "fallback": 0, "stream": False,
                  "started_at": time.time(), "attempts": 0,
                  "session_id": taken.session_id or run.job.session_id, "taken_params": taken.taken,
                  "workflow": run.job.workflow}
        run.started("model", record)
        try:
            return self._complete(run, route, body, record, deadline)
        except _Failed as exc:
            if "status" not in record:
                run.dropped(record)
            raise CallFailed(CallErrorKind.MODEL, f"agent {name!r} at {record['provider_host']} failed: {exc}") from exc

    def _headers(self, run: RunCalls, route: Route, session_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Flowpool-Request-Id": run.job.request_id,
                   "X-Flowpool-Session-Id": session_id}
        key = None
        if route.api_key_secret:
            key = run.job.secrets.get(route.api_key_secret)
        elif route.api_key_env:
            key = self._keys.get(route.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _key_refusal(self, route: Route) -> str | None:
        """Why a route may not use its key (stored before the operator changed FLOWPOOL_PROVIDER_KEYS); None if it may."""
        if route.api_key_env and not route.api_key_secret:
            return self._provider_keys.refusal(route.api_key_env, route.base_url)
        return None

    def _post(self, run: RunCalls, route: Route, body: dict[str, Any], record: dict[str, Any], deadline: float,
              stream: bool, started: float) -> requests.Response:
        """POST with retries of 429/5xx inside the budget; the response of the first success.

        A route that fails is recorded with how long it took, its retries included (``started``: time.monotonic()
        when the call began), so its record says where the time before its fallback went.
        """
        url = route.base_url.rstrip("/") + "/chat/completions"

        def failed(error: str) -> None:
            self._finish(run, record, error=error, latency_ms=(time.monotonic() - started) * 1000)

        refusal = self._key_refusal(route)
        if refusal is not None:
            failed(refusal)
            raise _Failed(refusal, retryable=False)
        data = json.dumps({**body, **({"stream": True} if stream else {})})
        headers = self._headers(run, route, record["session_id"])
        delay = 0.2
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                if attempt:  # tried and failed before the budget ran out: the route's record stays
                    failed("the run's time budget is spent")
                raise _Failed("the run's time budget is spent", retryable=False)
            record["attempts"] = attempt + 1
            try:
                response = self._session.post(
                    url, data=data, headers=headers, stream=stream,
                    timeout=(min(self.connect_timeout, remaining), remaining), allow_redirects=False)
            except EgressDenied as exc:
                failed(str(exc))
                raise _Failed(str(exc), retryable=False) from exc
            except requests.RequestException as exc:
                error: _Failed = _Failed(f"{type(exc).__name__}: {exc}", retryable=True)
            else:
                if response.status_code < 300:
                    return response
                error = _Failed(f"HTTP {response.status_code}: {response.text[:200]}",
                                retryable=response.status_code in _RETRYABLE)
                record["status_code"] = response.status_code
                response.close()
            if not error.retryable or attempt == self.retries:
                failed(str(error))
                raise error
            time.sleep(min(delay, max(0.0, deadline - time.monotonic() - 0.05)))
            delay *= 2
        raise AssertionError("unreachable")

    def _complete(self, run: RunCalls, route: Route, body: dict[str, Any], record: dict[str, Any],
                  deadline: float) -> dict[str, Any]:
        started = time.monotonic()
        response = self._post(run, route, body, record, deadline, stream=False, started=started)
        try:
            data = response.json()
        except ValueError as exc:
            self._finish(run, record, error="the provider answered with something that is not JSON",
                         latency_ms=(time.monotonic() - started) * 1000)
            raise _Failed("the provider answered with something that is not JSON", retryable=False) from exc
        latency = (time.monotonic() - started) * 1000
        self._finish(run, record, latency_ms=latency, ttft_ms=latency, usage=data.get("usage"))
        return data

    def _stream(self, run: RunCalls, response: requests.Response, record: dict[str, Any],
                started: float) -> Iterator[dict[str, Any]]:
        """The chunks of a stream the provider has started answering, recorded once it ends."""
        first = None
        usage = None
        try:
            for chunk in sse_data(response):
                if first is None:
                    first = time.monotonic()
                usage = chunk.get("usage") or usage
                yield chunk
        except (requests.RequestException, ValueError) as exc:
            self._finish(run, record, error=f"the stream broke: {exc}",
                         latency_ms=(time.monotonic() - started) * 1000)
            raise CallFailed(CallErrorKind.MODEL, f"the stream from {record['provider_host']} broke: {exc}") from exc
        finally:
            response.close()
        self._finish(run, record, latency_ms=(time.monotonic() - started) * 1000,
                     ttft_ms=((first or time.monotonic()) - started) * 1000, usage=usage)

    @staticmethod
    def _finish(run: RunCalls, record: dict[str, Any], error: str | None = None, latency_ms: float | None = None,
                ttft_ms: float | None = None, usage: dict[str, Any] | None = None) -> None:
        usage = usage or {}
        record.update(status="error" if error else "ok", error=error,
                      latency_ms=round(latency_ms, 3) if latency_ms is not None else None,
                      ttft_ms=round(ttft_ms, 3) if ttft_ms is not None else None,
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0),
                      total_tokens=int(usage.get("total_tokens") or 0))
        run.records.append(record)
        run.ended("model", record)
