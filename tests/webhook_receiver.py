"""A webhook receiver on loopback for the tests: it keeps what it is sent and answers the statuses it is told."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass(frozen=True)
class Delivery:
    """One request the receiver got: its path, headers and body as they came."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 keeping each request; answers ``statuses`` in turn, then the last one forever.

    A status of 3xx answers with a Location of ``/moved`` (which a delivery must not follow).
    """

    def __init__(self, statuses: tuple[int, ...] = (200,)) -> None:
        self.statuses = list(statuses)
        self.deliveries: list[Delivery] = []
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.deliveries.append(Delivery(self.path, dict(self.headers), body, time.time()))
                    status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                    receiver._lock.notify_all()
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/moved")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        """The first ``count`` deliveries, once they came; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.deliveries) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"the receiver got {len(self.deliveries)} webhook(s) within {timeout:g}s, "
                                f"not {count}")
                self._lock.wait(left)
            return list(self.deliveries[:count])
