"""Length-prefixed JSON frames over a stream socket: the only way a run talks to its worker.

Both ends speak JSON, never pickle: the worker must not trust anything the
sandboxed process sends, and a frame that is too long or not JSON ends the run.
"""
from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = ["Channel", "ChannelClosed", "ProtocolError", "blocking_pair", "blocking_socket"]

_HEADER = struct.Struct(">I")


def blocking_pair(kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
    """A connected pair of Unix sockets in blocking mode, whatever the process's default timeout.

    Every socket flowpool hands to another process (a run's channel, the
    zygote's control socket) is made here. A socket made while a default
    timeout is in force (Celery's shutdown sets ``socket.setdefaulttimeout(5)``
    for the whole worker) is in timeout mode, which Python implements with
    O_NONBLOCK on the file description: the process the other end is handed
    to shares that description, and its first blocking ``recv`` would raise
    BlockingIOError.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    ours.setblocking(True)
    theirs.setblocking(True)
    return ours, theirs


def blocking_socket(fd: int) -> socket.socket:
    """The socket of an inherited descriptor, in blocking mode whatever its sender left set on it."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


class ChannelClosed(EOFError):
    """The other end closed the channel."""


class ProtocolError(ValueError):
    """The other end sent something that is not a well-formed frame."""


class Channel:
    """One end of a framed JSON channel."""

    def __init__(self, sock: socket.socket, max_frame: int = 1 << 30) -> None:
        self.sock = sock
        self.max_frame = max_frame

    def send(self, message: dict[str, Any]) -> None:
        """Send one message."""
        self.send_bytes(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode())

    def send_bytes(self, payload: bytes) -> None:
        """Send one frame whose body is already JSON."""
        self.sock.sendall(_HEADER.pack(len(payload)) + payload)

    def recv(self) -> dict[str, Any]:
        """Receive one message; the socket's timeout applies to each read."""
        size = _HEADER.unpack(self._read(_HEADER.size))[0]
        if size > self.max_frame:
            raise ProtocolError(f"frame of {size} bytes is over the limit of {self.max_frame}")
        body = self._read(size)
        try:
            message = json.loads(body)
        except (ValueError, RecursionError) as exc:  # nesting deep enough to exhaust the stack is no frame either
            raise ProtocolError(f"frame is not JSON: {exc}") from exc
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise ProtocolError("frame is not an object with an 'op'")
        return message

    def _read(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if n == 0:
                raise ChannelClosed("channel closed")
            got += n
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()
