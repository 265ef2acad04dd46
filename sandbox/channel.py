"""Length-prefixed JSON frames over a stream socket: the only way a run talks to its worker.

Both ends speak JSON, never pickle: the worker must not trust anything the
sandboxed process sends, and a frame that is too long or not JSON ends the run.

A frame may carry open file descriptors (SCM_RIGHTS), attached to its first
bytes: the worker hands a run a read-only file that way (an accessory), so
the file's bytes never cross the channel. Only the run reads descriptors
(:meth:`Channel.recv_with_fds`); the worker's plain :meth:`Channel.recv`
reads with ``recv``, and the kernel closes whatever descriptors a run sends.
"""
from __future__ import annotations

import array
import json
import os
import socket
import struct
from typing import Any

__all__ = ["Channel", "ChannelClosed", "MAX_FDS", "ProtocolError", "blocking_pair", "blocking_socket"]

_HEADER = struct.Struct(">I")

# The most descriptors one frame may bring: room for them is made in every read of a frame that may carry some.
MAX_FDS = 4
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


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

    def send(self, message: dict[str, Any], fds: tuple[int, ...] | list[int] = ()) -> None:
        """Send one message, with ``fds`` (still the caller's to close) attached to its first bytes."""
        self.send_bytes(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode(), fds)

    def send_bytes(self, payload: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        """Send one frame whose body is already JSON."""
        frame = _HEADER.pack(len(payload)) + payload
        if not fds:
            self.sock.sendall(frame)
            return
        if len(fds) > MAX_FDS:
            raise ValueError(f"a frame carries at most {MAX_FDS} descriptors")
        # sendmsg may take only part of a long frame: the descriptors go with the part it took, the rest follows.
        sent = self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(frame):
            self.sock.sendall(frame[sent:])

    def recv(self) -> dict[str, Any]:
        """Receive one message; the socket's timeout applies to each read. Descriptors sent with it are dropped."""
        return self._recv(None)

    def recv_with_fds(self) -> tuple[dict[str, Any], list[int]]:
        """Receive one message and the descriptors that came with it (close-on-exec; the caller closes them).

        A descriptor the kernel could not hand over (this process is at its
        open-files limit) is missing from the list; the message says how
        many were sent, where the protocol has them.
        """
        fds: list[int] = []
        try:
            return self._recv(fds), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _recv(self, fds: list[int] | None) -> dict[str, Any]:
        # Descriptors travel with a frame's first bytes (send_bytes), so only its header is read with recvmsg.
        size = _HEADER.unpack(self._read(_HEADER.size, fds))[0]
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

    def _read(self, size: int, fds: list[int] | None = None) -> bytes:
        """Exactly ``size`` bytes; with ``fds``, through ``recvmsg``, adding the descriptors that come with them.

        A plain ``recv`` of bytes that carry descriptors closes those: a
        frame that may carry some is read with ``recvmsg`` from its first byte.
        """
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            if fds is None:
                n = self.sock.recv_into(view[got:], size - got)
            else:
                n, ancillary, _flags, _ = self.sock.recvmsg_into([view[got:]], _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
                fds.extend(_descriptors(ancillary))
            if n == 0:
                raise ChannelClosed("channel closed")
            got += n
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in ``recvmsg``'s ancillary data."""
    found = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            found.frombytes(data[:len(data) - len(data) % found.itemsize])
    return list(found)
