"""The synchronous client, on requests: ``Flowpool(api_key=..., base_url=...)``, and ``Maitai()`` for the seed's users.

    from flowpool import Flowpool, APIError

    with Flowpool(api_key="fp_...", base_url="http://127.0.0.1:8080", timeout=30) as client:
        try:
            response = client.workflow.completions.create(model="workflow:echo", input={"text": "hi"})
        except APIError as exc:
            print(exc.status_code, exc.type, exc.message, exc.request_id)
        else:
            print(response.choices[0].message.content, response.output)

Answers are :class:`Obj`; errors are :mod:`flowpool.sdk.errors`' tree (a
refused or dropped connection is an :class:`APIConnectionError`, one past
the timeout an :class:`APITimeoutError`); retries and idempotency keys are
described in :mod:`flowpool.sdk.sansio`. ``client.with_options(timeout=5)``
is a client with other options on the same connection pool. A call with
``stream=True`` answers a :class:`Stream` (sent at once; an error status
raises there): iterate it, and close it (or use ``with``) when leaving it
before its end.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Iterator, TypeVar

import requests
import urllib3

from ..sse import EventReader
from . import sansio
from .errors import APIConnectionError, APITimeoutError
from .objects import Obj
from .resources import ClientBase
from .sansio import Call

__all__ = ["Flowpool", "Maitai", "Stream"]

_Client = TypeVar("_Client", bound="Flowpool")

# What may fail on the way for a reason a second try can mend: nothing came back, or the answer broke off.
_RETRYABLE = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)

# How much of an event stream is read at a time (requests' own size for iter_lines): urllib3 hands a chunked
# answer's pieces over as they come, and waits for this many bytes of an answer that is not chunked.
_CHUNK = 512


class Flowpool(ClientBase):
    """A client of one flowpool API.

    ``api_key`` and ``base_url`` fall back on FLOWPOOL_API_KEY and
    FLOWPOOL_API_URL; ``timeout`` bounds each try of a call (seconds, a
    (connect, read) pair, or None); ``max_retries`` is how often a keyed call
    is sent again; ``default_headers`` go with every request.
    """

    _POOL = "session"
    session: requests.Session

    def _new_pool(self) -> requests.Session:
        return requests.Session()

    def close(self) -> None:
        """Close the client's connections."""
        self.session.close()

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, call: Call) -> Any:
        response = self._send(call)
        return call.result(sansio.decode(response.status_code, response.headers, response.content, response.url))

    def _send(self, call: Call, stream: bool = False) -> requests.Response:
        """Send ``call``, again while that is safe (a keyed call: nothing came back, or the server says so).

        A stream is retried only until its answer starts; after that a retry would replay its events.
        """
        url = self.options.base_url + call.path
        headers = {**self.options.headers(), **call.headers}
        timeout = self.options.timeout if call.timeout is None else call.timeout
        try:
            for attempt in itertools.count():
                try:
                    response = self.session.request(call.method, url, params=call.query(), json=call.json,
                                                    data=call.content, headers=headers, stream=stream,
                                                    timeout=timeout)
                except requests.RequestException as exc:
                    wait = None
                    if call.retry and isinstance(exc, _RETRYABLE) and not _timed_out_reading(exc):
                        wait = sansio.retry_wait(attempt, self.options.max_retries, None)
                    if wait is None:
                        raise _transport_error(exc, url) from exc
                    time.sleep(wait)
                    continue
                wait = (sansio.retry_wait(attempt, self.options.max_retries, response.status_code,
                                          response.headers) if call.retry else None)
                if wait is None:
                    return response
                response.close()
                time.sleep(wait)
        finally:
            close = getattr(call.content, "close", None)  # a multipart body reading files from disk
            if close is not None:
                close()
        raise AssertionError("the loop returns or raises")

    def _stream(self, call: Call) -> Stream:
        """Send ``call``: a :class:`Stream` of its events (an error status raised here, an error event where it
        comes)."""
        response = self._send(call, stream=True)
        if sansio.is_event_stream(response.status_code, response.headers):
            return Stream(response)
        with response:
            try:
                content = response.content
            except requests.RequestException as exc:
                raise _transport_error(exc, response.url) from exc
        return Stream(None, Obj(sansio.decode(response.status_code, response.headers, content, response.url)))


class Stream:
    """The events of a streamed answer, as :class:`Obj`, as they arrive; iterate it once.

    Its connection is closed once the last event has been read, when an
    error is raised, and by :meth:`close` (or leaving a ``with`` block),
    whether or not it was iterated: one left before its end holds its
    connection (and the server goes on sending) until it is closed::

        with client.workflow.completions.create(model="workflow:w", input={}, stream=True) as stream:
            for chunk in stream:
                if chunk.object == "workflow.chunk":
                    break

    A stream that ends before the server's ``[DONE]`` raises
    :class:`APIConnectionError`: its answer is not whole.

    :meth:`close` may be called from another thread while one iterates the
    stream: the connection is closed at once, and the iterating thread's
    loop ends (without an error, as after a ``break``; a read it was blocked
    in is cut off).
    """

    def __init__(self, response: requests.Response | None, answer: Obj | None = None) -> None:
        # response: an event stream; else ``answer``, the one JSON answer that came in its place (a cached run).
        self.response = response
        self._answer = answer
        self._closed = False
        self._iterator = self._events()

    def __iter__(self) -> Iterator[Obj]:
        return self._iterator

    def __next__(self) -> Obj:
        return next(self._iterator)

    def close(self) -> None:
        """Close the connection; the events not read yet are not read."""
        self._closed = True
        # The connection first: another thread may be iterating (the generator is running there, and cannot be
        # closed from here), blocked in a read that only the socket's shutdown ends.
        if self.response is not None:
            _shutdown(self.response)
            self.response.close()
        if not self._iterator.gi_running:
            try:
                self._iterator.close()
            except ValueError:  # another thread began iterating since: its read fails, and its loop ends
                pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _events(self) -> Iterator[Obj]:
        response = self.response
        if response is None:
            if self._answer is not None:
                yield self._answer
            return
        reader = EventReader()
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                for value in reader.feed(chunk):
                    yield sansio.event(value, response.headers)
                if reader.done:
                    return
            for value in reader.end():
                yield sansio.event(value, response.headers)
            if not reader.done and not self._closed:
                raise sansio.unfinished(response.url)
        except Exception as exc:
            if self._closed:
                # close() from another thread cut the read off (requests raises what the closed socket made it,
                # an AttributeError among them): the loop ends as close() says.
                return
            if isinstance(exc, requests.RequestException):  # the stream broke off
                raise _transport_error(exc, response.url) from exc
            raise
        finally:
            response.close()


def _shutdown(response: requests.Response) -> None:
    """Shut ``response``'s socket for reading, which ends a read of it blocked in another thread (urllib3 2.3 and
    later can; with an older one, closing it ends such a read once the next bytes come)."""
    shutdown = getattr(response.raw, "shutdown", None)
    if shutdown is None:
        return
    try:
        shutdown()
    except (ValueError, RuntimeError, OSError):  # read to its end and its connection released, or closed already
        pass


def _timed_out_reading(exc: requests.RequestException) -> bool:
    """Whether ``exc`` is a read past the timeout (requests says so as a ConnectionError once a body is streamed)."""
    return isinstance(exc, requests.ReadTimeout) or (
        bool(exc.args) and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError))


def _transport_error(exc: requests.RequestException, url: str) -> APIConnectionError:
    """requests' exception as the SDK's (the caller chains it)."""
    if isinstance(exc, requests.Timeout) or _timed_out_reading(exc):
        return APITimeoutError(f"no answer from {url} in time: {exc}", url)
    return APIConnectionError(f"no answer from {url}: {exc}", url)


class Maitai(Flowpool):
    """:class:`Flowpool` as the seed's ``maitai.Maitai()``: ``api_key`` and ``base_url`` fall back on MAITAI_API_KEY
    and MAITAI_BASE_URL first (then FLOWPOOL_API_KEY, FLOWPOOL_API_URL), and the key goes in ``X-Maitai-Api-Key``.
    Like every client, it takes a base URL ending with ``/api/v1`` (as Maitai's command line writes it) without it."""

    _KEY_ENV = ("MAITAI_API_KEY",)
    _URL_ENV = ("MAITAI_BASE_URL",)
    _KEY_HEADER = "X-Maitai-Api-Key"
