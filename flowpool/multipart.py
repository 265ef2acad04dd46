"""A multipart/form-data request body read from disk as it is sent, with a progress callback.

An upload may bundle accessories of tens of MB each: the SDK sends them
without first building the whole body in memory, and says how far it got
(``flowpool push`` draws that as a progress bar). The body knows its length
up front, so it goes out with a ``Content-Length`` rather than chunked.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["MultipartBody", "Progress"]

#: Called as ``progress(bytes_sent, bytes_total)`` while a body is sent.
Progress = Callable[[int, int], None]

_Piece = Union[bytes, Path]


def _quoted(value: str) -> str:
    """A header parameter value, as browsers write one: quotes and line breaks percent-encoded."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartBody:
    """A file-like multipart body: ``read(n)`` yields the next bytes, files are read from disk as they go.

    requests streams any object with ``read`` and ``__len__`` (with that
    length as its ``Content-Length``).
    """

    def __init__(self, fields: dict[str, str], files: dict[str, tuple[str, Union[bytes, Path]]],
                 progress: Progress | None = None) -> None:
        self.boundary = f"flowpool-{uuid.uuid4().hex}"
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._pieces: list[_Piece] = []
        for name, value in fields.items():
            self._pieces.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"'
                                f"\r\n\r\n{value}\r\n".encode())
        for name, (filename, content) in files.items():
            self._pieces.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"; '
                                f'filename="{_quoted(filename)}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                                .encode())
            self._pieces.extend((content, b"\r\n"))
        self._pieces.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self._pieces)
        self._progress = progress
        self._index = 0
        self._offset = 0  # in the current bytes piece
        self._file: BinaryIO | None = None
        self.sent = 0

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left for a negative size); b"" at the end."""
        out = bytearray()
        while self._index < len(self._pieces) and (size < 0 or len(out) < size):
            want = -1 if size < 0 else size - len(out)
            piece = self._pieces[self._index]
            if isinstance(piece, Path):
                if self._file is None:
                    self._file = open(piece, "rb")
                data = self._file.read(want)
                if not data or want < 0:
                    self._file.close()
                    self._file = None
                    self._index += 1
            else:
                end = len(piece) if want < 0 else self._offset + want
                data = piece[self._offset:end]
                self._offset += len(data)
                if self._offset >= len(piece):
                    self._index, self._offset = self._index + 1, 0
            out += data
        self.sent += len(out)
        if self._progress is not None and out:
            self._progress(self.sent, self._length)
        return bytes(out)

    def close(self) -> None:
        """Close the file being read, if one is open."""
        if self._file is not None:
            self._file.close()
            self._file = None
