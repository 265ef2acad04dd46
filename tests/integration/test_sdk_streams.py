"""Event streams as both SDK clients and the worker read them: line ends, closing, and a stream cut short.

The U+2028 tests run on the session's real stack (a workflow's ctx.emit, a
provider's streamed answer read by the worker); the faults the stack cannot
make (a stream closed before its [DONE], one that never ends) come from
loopback servers.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from typing import Any

import pytest

import flowpool
from tests.helpers import CannedHTTPServer, Client, eventually
from tests.provider import StandInProvider

# Characters str.splitlines() takes for line ends, which JSON may hold unescaped: the API writes them raw.
SEPARATORS = "a\u2028b\u2029c\u0085d"

EMITTING_WORKFLOW = """\
def execute(ctx):
    ctx.emit("text", ctx.input["text"])
    return {"text": ctx.input["text"]}
"""


def _ref(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def _sync(base_url: str, key: str = "fp_x") -> flowpool.Flowpool:
    return flowpool.Flowpool(api_key=key, base_url=base_url, timeout=60, max_retries=0)


def _async(base_url: str, key: str = "fp_x") -> flowpool.AsyncFlowpool:
    return flowpool.AsyncFlowpool(api_key=key, base_url=base_url, timeout=60, max_retries=0)


# Line ends: only CR, LF and CRLF end a line of an event stream.

def test_a_chunk_holding_unicode_line_separators_streams_whole_through_the_sync_client(client: Client) -> None:
    ref = _ref("separators")
    client.upload(ref, EMITTING_WORKFLOW)
    with _sync(client.base_url, client.key) as fp:
        events = list(fp.workflow.completions.create(model=f"workflow:{ref}", input={"text": SEPARATORS},
                                                     stream=True, cache=False))
    assert [e.content for e in events[:-1]] == [SEPARATORS]
    assert events[-1].output.text == SEPARATORS


def test_a_chunk_holding_unicode_line_separators_streams_whole_through_the_async_client(client: Client) -> None:
    ref = _ref("separators")
    client.upload(ref, EMITTING_WORKFLOW)

    async def main() -> list[Any]:
        async with _async(client.base_url, client.key) as fp:
            stream = await fp.workflow.completions.create(model=f"workflow:{ref}", input={"text": SEPARATORS},
                                                          stream=True, cache=False)
            return [event async for event in stream]

    events = asyncio.run(main())
    assert [e.content for e in events[:-1]] == [SEPARATORS]
    assert events[-1].output.text == SEPARATORS


def test_a_provider_stream_holding_unicode_line_separators_is_read_whole_by_the_worker(
        client: Client, provider: StandInProvider) -> None:
    app, ref = _ref("app"), _ref("providerstream")
    response = client.request("PUT", f"/api/v1/applications/{app}",
                              json={"intents": {"answer": {"model": "echo", "base_url": provider.base_url}}})
    assert response.status_code in (200, 201), response.text
    client.upload(ref, f"""
def execute(ctx):
    chunks = list(ctx.chat.completions.create(application="{app}", intent="answer", stream=True,
                                              messages=[{{"role": "user", "content": ctx.input["text"]}}]))
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
""")
    response = client.invoke(ref, input={"text": SEPARATORS})
    assert response.status_code == 200, response.text
    assert response.json()["output"] == f"echo: {SEPARATORS}"


# A stream cut short.

_CUT_SHORT = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
              b'data: {"object": "workflow.chunk", "type": "step", "content": 1}\n\n')


def test_a_stream_closed_before_its_done_raises_api_connection_error_in_the_sync_client() -> None:
    with CannedHTTPServer(_CUT_SHORT) as server, _sync(server.url) as fp:
        events: list[Any] = []
        with pytest.raises(flowpool.APIConnectionError, match=r"the stream ended before its \[DONE\]"):
            for event in fp.workflow.completions.create(model="workflow:x", input={}, stream=True):
                events.append(event)
    assert [e.content for e in events] == [1]  # the events that came, then the error


def test_a_stream_closed_before_its_done_raises_api_connection_error_in_the_async_client() -> None:
    async def main(url: str, events: list[Any]) -> None:
        async with _async(url) as fp:
            async for event in await fp.workflow.completions.create(model="workflow:x", input={}, stream=True):
                events.append(event)

    events: list[Any] = []
    with CannedHTTPServer(_CUT_SHORT) as server:
        with pytest.raises(flowpool.APIConnectionError, match=r"the stream ended before its \[DONE\]"):
            asyncio.run(main(server.url, events))
    assert [e.content for e in events] == [1]


# Closing a stream left before its end.

class _EndlessStream:
    """A loopback server answering each request with an event stream that never ends; it counts the connections
    the client closed (a write failed) and those still open."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.opened = 0
        self.closed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> _EndlessStream:
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._socket.close()
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        # accept() in another thread is not woken by close(): wait in short steps so __exit__ never waits out its
        # join's timeout.
        self._socket.settimeout(0.05)
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(None)
            self.opened += 1
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        body = b'data: {"object": "workflow.chunk", "type": "step", "content": 1}\n\n'
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n")
                while not self._stop.wait(0.05):
                    connection.sendall(b"%x\r\n%s\r\n" % (len(body), body))
            except OSError:  # the client closed it
                self.closed += 1


def test_closing_a_sync_stream_closes_its_connection_whether_or_not_it_was_iterated() -> None:
    with _EndlessStream() as server, _sync(server.url) as fp:
        untouched = fp.workflow.completions.create(model="workflow:x", input={}, stream=True)
        untouched.close()
        eventually(lambda: server.closed == 1, what="the server saw the unread stream's connection close")
        stream = fp.workflow.completions.create(model="workflow:x", input={}, stream=True)
        for event in stream:
            assert event.content == 1
            break
        stream.close()
        eventually(lambda: server.closed == 2, what="the server saw the left stream's connection close")
        with fp.workflow.completions.create(model="workflow:x", input={}, stream=True) as stream:
            next(iter(stream))
        eventually(lambda: server.closed == 3, what="the server saw the with block's stream close")
    assert server.opened == 3


def test_closing_an_async_stream_closes_its_connection_whether_or_not_it_was_iterated() -> None:
    async def main(server: _EndlessStream) -> None:
        async with _async(server.url) as fp:
            untouched = await fp.workflow.completions.create(model="workflow:x", input={}, stream=True)
            await untouched.aclose()
            await _until(lambda: server.closed == 1)
            stream = await fp.workflow.completions.create(model="workflow:x", input={}, stream=True)
            async for event in stream:
                assert event.content == 1
                break
            await stream.aclose()
            await _until(lambda: server.closed == 2)
            async with await fp.workflow.completions.create(model="workflow:x", input={}, stream=True) as stream:
                await stream.__anext__()
            await _until(lambda: server.closed == 3)

    with _EndlessStream() as server:
        asyncio.run(main(server))
    assert server.opened == 3


def test_closing_a_sync_stream_from_another_thread_ends_the_iterating_thread_and_closes_the_connection() -> None:
    with _EndlessStream() as server, _sync(server.url) as fp:
        stream = fp.workflow.completions.create(model="workflow:x", input={}, stream=True)
        first = threading.Event()
        events: list[Any] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                for event in stream:
                    events.append(event)
                    first.set()
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(10), "no event came"
        stream.close()  # the reader is iterating (blocked in a read, or about to be)
        reader.join(10)
        assert not reader.is_alive(), "the iterating thread still reads the closed stream"
        assert errors == []  # its loop ended as after a break
        assert events and all(e.content == 1 for e in events)
        eventually(lambda: server.closed == 1, what="the server saw the connection close")
    assert server.opened == 1


def test_closing_an_async_stream_from_another_task_ends_the_iterating_task_and_closes_the_connection() -> None:
    async def main(server: _EndlessStream) -> list[Any]:
        async with _async(server.url) as fp:
            stream = await fp.workflow.completions.create(model="workflow:x", input={}, stream=True)
            events: list[Any] = []
            first = asyncio.Event()

            async def read() -> None:
                async for event in stream:
                    events.append(event)
                    first.set()

            reader = asyncio.create_task(read())
            await asyncio.wait_for(first.wait(), 10)
            await stream.aclose()  # the reader task is iterating, awaiting a read
            await asyncio.wait_for(reader, 10)  # it ended, without an error
            await _until(lambda: server.closed == 1)
            return events

    with _EndlessStream() as server:
        events = asyncio.run(main(server))
    assert events and all(e.content == 1 for e in events)
    assert server.opened == 1


async def _until(check: Any, timeout: float = 10.0) -> None:
    """Wait (without blocking the loop) until ``check()`` is true; fail the test after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {timeout:g}s: {check}")
