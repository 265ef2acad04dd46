"""The asynchronous client, on httpx2: ``AsyncFlowpool(...)``, and ``AsyncMaitai()`` for the seed's users.

    from flowpool import AsyncFlowpool

    async with AsyncFlowpool(api_key="fp_...", base_url="http://127.0.0.1:8080") as client:
        response = await client.workflow.completions.create(model="workflow:echo", input={"text": "hi"})
        async for chunk in await client.workflow.completions.create(model="workflow:echo", input={}, stream=True):
            print(chunk)

Every resource and method of :class:`Flowpool`, awaited (they are the same
methods: :mod:`flowpool.sdk.resources`), with the same options, retries,
idempotency keys and errors. A stream is an :class:`AsyncStream` of
:class:`Obj`: the request is sent when it is awaited (an error status raises
there), its events come as they arrive, an error event raises its APIError,
and ``await stream.aclose()`` (or ``async with``) closes its connection.
"""
from __future__ import annotations

import itertools
from typing import Any, AsyncIterator, TypeVar

import anyio
import httpx2

from ..multipart import MultipartBody
from ..sse import EventReader
from . import sansio
from .errors import APIConnectionError, APITimeoutError
from .objects import Obj
from .resources import ClientBase
from .sansio import Call, Timeout

__all__ = ["AsyncFlowpool", "AsyncMaitai", "AsyncStream", "MaitaiAsync"]

_Client = TypeVar("_Client", bound="AsyncFlowpool")

# What may fail on the way for a reason a second try can mend: nothing came back, or the answer broke off.
_RETRYABLE = (httpx2.NetworkError, httpx2.RemoteProtocolError, httpx2.ConnectTimeout)

# How much of a multipart body is read from disk at a time while it is sent.
_CHUNK = 1 << 16


class AsyncFlowpool(ClientBase):
    """An asyncio (or trio) client of one flowpool API; the options are :class:`Flowpool`'s.

    ``await client.close()`` (or ``async with``) closes its connections.
    """

    _POOL = "http_client"
    http_client: httpx2.AsyncClient

    def _new_pool(self) -> httpx2.AsyncClient:
        # The timeout goes with each request (the options' or a call's own), so the pool has none of its own.
        return httpx2.AsyncClient(timeout=None)

    async def close(self) -> None:
        """Close the client's connections."""
        await self.http_client.aclose()

    async def __aenter__(self: _Client) -> _Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, call: Call) -> Any:
        response = await self._send(call)
        return call.result(sansio.decode(response.status_code, response.headers, response.content,
                                         str(response.url)))

    async def _send(self, call: Call, stream: bool = False) -> httpx2.Response:
        """Send ``call``, again while that is safe (a keyed call: nothing came back, or the server says so).

        A stream is retried only until its answer starts; after that a retry would replay its events.
        """
        url = self.options.base_url + call.path
        headers = {**self.options.headers(), **call.headers}
        timeout = _timeout(self.options.timeout if call.timeout is None else call.timeout)
        content: Any = call.content
        if isinstance(content, MultipartBody):
            # Sent as read from disk, with its length up front rather than chunked (as the sync client sends it).
            headers["Content-Length"] = str(len(content))
            content = _chunks(content)
        try:
            for attempt in itertools.count():
                request = self.http_client.build_request(call.method, url, params=call.query(), json=call.json,
                                                         content=content, headers=headers, timeout=timeout)
                try:
                    response = await self.http_client.send(request, stream=stream)
                except httpx2.RequestError as exc:
                    wait = None
                    if call.retry and isinstance(exc, _RETRYABLE):
                        wait = sansio.retry_wait(attempt, self.options.max_retries, None)
                    if wait is None:
                        raise _transport_error(exc, url) from exc
                    await anyio.sleep(wait)
                    continue
                wait = (sansio.retry_wait(attempt, self.options.max_retries, response.status_code,
                                          response.headers) if call.retry else None)
                if wait is None:
                    return response
                await response.aclose()
                await anyio.sleep(wait)
        finally:
            if isinstance(call.content, MultipartBody):
                call.content.close()
        raise AssertionError("the loop returns or raises")

    async def _stream(self, call: Call) -> AsyncStream:
        """Send ``call``: an :class:`AsyncStream` of its events; an error status raised here, an error event where
        it comes."""
        response = await self._send(call, stream=True)
        url = str(response.url)
        if sansio.is_event_stream(response.status_code, response.headers):
            return AsyncStream(response)
        try:
            content = await response.aread()
        except httpx2.RequestError as exc:
            raise _transport_error(exc, url) from exc
        finally:
            await response.aclose()
        return AsyncStream(None, Obj(sansio.decode(response.status_code, response.headers, content, url)))


class AsyncStream:
    """The events of a streamed answer, as :class:`Obj`, as they arrive; iterate it once with ``async for``.

    Its connection is closed once the last event has been read, when an
    error is raised, and by :meth:`aclose` (or leaving an ``async with``
    block), whether or not it was iterated: one left before its end holds
    its connection (and the server goes on sending) until it is closed::

        async with await client.workflow.completions.create(model="workflow:w", input={}, stream=True) as stream:
            async for chunk in stream:
                if chunk.object == "workflow.chunk":
                    break

    A stream that ends before the server's ``[DONE]`` raises
    :class:`APIConnectionError`: its answer is not whole.

    :meth:`aclose` may be awaited in another task while one iterates the
    stream: the connection is closed at once, and the iterating task's loop
    ends (without an error, as after a ``break``; a read it awaited is cut
    off).
    """

    def __init__(self, response: httpx2.Response | None, answer: Obj | None = None) -> None:
        # response: an event stream; else ``answer``, the one JSON answer that came in its place (a cached run).
        self.response = response
        self._answer = answer
        self._closed = False
        self._iterator = self._events()

    def __aiter__(self) -> AsyncIterator[Obj]:
        return self._iterator

    async def __anext__(self) -> Obj:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Close the connection; the events not read yet are not read."""
        self._closed = True
        # The connection first: another task may be iterating, awaiting a read (the generator is running there,
        # and cannot be closed from here); closing the connection ends that read.
        if self.response is not None:
            await self.response.aclose()
        if not self._iterator.ag_running:
            await self._iterator.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _events(self) -> AsyncIterator[Obj]:
        response = self.response
        if response is None:
            if self._answer is not None:
                yield self._answer
            return
        url = str(response.url)
        reader = EventReader()
        try:
            async for chunk in response.aiter_bytes():
                for value in reader.feed(chunk):
                    yield sansio.event(value, response.headers)
                if reader.done:
                    return
            for value in reader.end():
                yield sansio.event(value, response.headers)
            if not reader.done and not self._closed:
                raise sansio.unfinished(url)
        except httpx2.RequestError as exc:
            if self._closed:  # aclose() in another task cut the read off: the loop ends as aclose() says
                return
            raise _transport_error(exc, url) from exc  # the stream broke off
        finally:
            await response.aclose()


async def _chunks(body: MultipartBody) -> AsyncIterator[bytes]:
    """A multipart body as it is read from disk (its progress callback called as each piece goes)."""
    while chunk := body.read(_CHUNK):
        yield chunk


def _timeout(timeout: Timeout) -> httpx2.Timeout:
    """The options' timeout as httpx2's: a (connect, read) pair bounds writing and waiting for the pool as reading."""
    if isinstance(timeout, tuple):
        connect, read = timeout
        return httpx2.Timeout(read, connect=connect)
    return httpx2.Timeout(timeout)


def _transport_error(exc: httpx2.RequestError, url: str) -> APIConnectionError:
    """httpx2's exception as the SDK's (the caller chains it)."""
    if isinstance(exc, httpx2.TimeoutException):
        return APITimeoutError(f"no answer from {url} in time: {type(exc).__name__}: {exc}", url)
    return APIConnectionError(f"no answer from {url}: {type(exc).__name__}: {exc}", url)


class AsyncMaitai(AsyncFlowpool):
    """:class:`AsyncFlowpool` as the seed's ``maitai.MaitaiAsync()``: ``api_key`` and ``base_url`` fall back on
    MAITAI_API_KEY and MAITAI_BASE_URL first (then FLOWPOOL_*), and the key goes in ``X-Maitai-Api-Key``. A base
    URL ending with ``/api/v1``, as Maitai's command line writes it, is taken without it."""

    _KEY_ENV = ("MAITAI_API_KEY",)
    _URL_ENV = ("MAITAI_BASE_URL",)
    _KEY_HEADER = "X-Maitai-Api-Key"


#: The seed's name for it (``maitai.MaitaiAsync()``).
MaitaiAsync = AsyncMaitai
