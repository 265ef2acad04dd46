"""Reading a server-sent event stream of JSON events that ends with ``data: [DONE]``, without I/O.

The one reader of every stream flowpool reads: the SDK's clients (an
invoke's or a run's events, over requests or httpx2), the command line
(through the SDK) and the worker (a provider's streamed completion). Each
feeds it the bytes as they arrive (:class:`EventReader`), or hands it an
iterable of them (:func:`sse_data`: a ``requests.Response`` is one).

The format, as the SSE specification (WHATWG HTML, "Server-sent events") says:

- One UTF-8 byte order mark at the start of the stream is dropped.
- A line ends at CR, LF or CRLF, and nowhere else: never at U+2028, U+2029,
  U+0085, VT or FF, which ``str.splitlines()`` (and so requests'
  ``iter_lines(decode_unicode=True)`` and httpx's ``aiter_lines()``) also
  take for line ends, and which a JSON text may hold unescaped (the API
  writes its JSON with ``ensure_ascii=False``). The bytes are split before
  they are decoded: CR and LF never occur inside a UTF-8 character.
- An event is the ``data:`` lines before a blank line, joined with LF (one
  space after the colon is dropped); a line that starts with ``:`` is a
  comment (a keep-alive), and the other fields (``event:``, ``id:``,
  ``retry:``) say nothing of the data.
- ``[DONE]`` as an event's data ends the stream: nothing after it is read.
  A stream may end without it (the connection closed): whether that is an
  error is the caller's to say (the SDK raises; a provider may leave it off).

Each event's data is JSON; one that is not raises ValueError (so does a line
that is not UTF-8: UnicodeDecodeError is one). Two leniencies towards
providers, beyond the specification: an event whose joined data is not JSON
but each of whose ``data:`` lines is (several values written without a blank
line between them) is read as one value per line, a ``[DONE]`` line among
them ending the stream; and :meth:`EventReader.end` dispatches a last event
whose blank line never came.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Iterator

__all__ = ["DONE", "EventReader", "sse_data"]

#: The data of the event that ends a stream.
DONE = "[DONE]"

# A line's end; a CR last in what has come so far may be the first half of a CRLF, so it waits for the next byte.
_EOL = re.compile(rb"\r\n|\r|\n")


class EventReader:
    """The events of one stream, fed its bytes as they come.

    ``feed(chunk)`` returns the JSON value of each event the chunk completes,
    ``end()`` (once the stream has ended) that of an event whose lines all
    came but not the blank line after them (a line cut off before its end is
    dropped); ``done`` says whether ``[DONE]`` came (then both return nothing
    more).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        # How much of the buffer was searched for a line end and has none: a long line fed in small
        # pieces is searched once, not again with every piece.
        self._searched = 0
        self._data: list[str] = []
        self._first_line = True
        self.done = False

    def feed(self, chunk: bytes) -> list[Any]:
        """The JSON value of each event that ``chunk`` completes, in order."""
        if self.done:
            return []
        self._buffer += chunk
        values: list[Any] = []
        start = 0
        # search() rather than finditer(): an iterator would hold the buffer, which is cut below.
        while (match := _EOL.search(self._buffer, self._searched)) is not None:
            at, end = match.span()
            if end == len(self._buffer) and match.group() == b"\r":
                break  # maybe half of a CRLF: decided by the next byte (or by the end)
            self._line(bytes(self._buffer[start:at]), values)
            start = self._searched = end
            if self.done:
                self._buffer.clear()
                self._searched = 0
                return values
        del match
        del self._buffer[:start]
        self._searched = max(len(self._buffer) - 1, 0) if self._buffer.endswith(b"\r") else len(self._buffer)
        return values

    def end(self) -> list[Any]:
        """At the end of the stream: the value(s) of the event whose ``data:`` lines all came but not the blank line
        that dispatches it, if any (a last line that came without its line end is dropped).

        The SSE specification drops such an event; it is dispatched here because a provider's stream may end
        (its connection closed) without a blank line after its last event, or after its ``[DONE]``, and the
        worker reads what such a stream said (through :func:`sse_data`).
        """
        if self.done:
            return []
        values: list[Any] = []
        if self._buffer.endswith(b"\r"):  # a lone CR ended its line after all
            self._line(bytes(self._buffer[:-1]), values)
        self._buffer.clear()
        self._searched = 0
        if not self.done:
            self._line(b"", values)
        return values

    def _line(self, raw: bytes, values: list[Any]) -> None:
        """Take one line: a blank one dispatches the event its data lines make (into ``values``)."""
        line = raw.decode("utf-8")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")  # one byte order mark, as the SSE specification says
        if not line:
            if self._data:
                lines, self._data = self._data, []
                self._dispatch(lines, values)
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)

    def _dispatch(self, lines: list[str], values: list[Any]) -> None:
        """Take the event the ``data:`` ``lines`` make: its value into ``values``, or ``[DONE]``."""
        data = "\n".join(lines)
        if data.strip() == DONE:
            self.done = True
            return
        try:
            values.append(json.loads(data))
            return
        except ValueError as exc:
            if len(lines) == 1:
                raise
            error = exc
        # Leniency towards providers that write several JSON values as the data lines of one event, with no
        # blank line between them (flowpool's first reader took each data line as a value, and they worked):
        # each line is one value then, a [DONE] line ends the stream. A line that is not JSON either raises the
        # error of the event's data as a whole.
        each: list[Any] = []
        for line in lines:
            if line.strip() == DONE:
                values.extend(each)
                self.done = True
                return
            try:
                each.append(json.loads(line))
            except ValueError:
                raise error from None
        values.extend(each)


def sse_data(chunks: Iterable[bytes]) -> Iterator[Any]:
    """The JSON value of each event of a stream read as ``chunks`` of bytes, as they come, until ``[DONE]`` or the
    end of the chunks (a ``requests.Response`` opened with ``stream=True`` is such an iterable)."""
    reader = EventReader()
    for chunk in chunks:
        yield from reader.feed(chunk)
        if reader.done:
            return
    yield from reader.end()
