"""A small, real OpenAI-compatible server on loopback that stands in for a model vendor.

The model name says how it behaves:
  echo            answers "echo: <last user message>"
  fail            500, always
  ratelimit-N-X   429 for the first N calls with this exact name, then echo (X makes the name unique)
  slow-MS         waits MS milliseconds, then echo
  hold-NAME       waits until gate NAME opens (see below; at most 60 s), then echo
  notjson         200 with a body that is not JSON
  strict          400 for a body field OpenAI's chat completions API does not take (as OpenAI answers), else echo
Streams (``"stream": true``) send one chunk per word, then a chunk with usage, then [DONE]; their JSON is
written as UTF-8 with no character escaped (ensure_ascii=False, as vendors send it: U+2028 stays raw).
POST /v1/embeddings answers model ``hash-D`` with a D-dimension vector per input: each word (lower
case) adds 1 at a position given by its hash, then the vector is normalized, so texts that share
words point alike (:func:`hash_embedding`); model ``fail`` is a 500.
Usage counts words: prompt = words of every message, completion = words of the answer.

It also serves plain HTTP for ctx.http tests: GET /doc/NAME (JSON), GET /article?paragraphs=N
(plain text, paragraphs a blank line apart), GET /big?kb=N,
GET /slow?ms=N, GET /redirect?to=URL (302), POST /echo (the body back), and gates a
script can wait on: GET /gate/NAME says {"open": ...}, POST /gate/NAME opens it, and
GET /hold/NAME answers only once gate NAME is open (at most 60 s).
"""
from __future__ import annotations

import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["OPENAI_CHAT_FIELDS", "StandInProvider", "hash_embedding"]

# The request body fields of OpenAI's POST /v1/chat/completions: what model ``strict`` takes.
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "user", "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort",
    "functions", "function_call", "modalities", "audio", "prediction", "store", "metadata", "service_tier",
    "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
})


def _words(text: Any) -> int:
    return len(str(text or "").split())


def hash_embedding(text: str, dims: int) -> list[float]:
    """The stand-in's embedding of ``text``: its words hashed into ``dims`` positions, normalized (zero if none)."""
    vector = [0.0] * dims
    for word in str(text).lower().split():
        vector[zlib.crc32(word.encode()) % dims] += 1.0
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of runs may call at once (the default backlog is 5)


class StandInProvider:
    """Start with ``start()``; ``base_url`` ends in /v1; ``requests`` logs what it was sent."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        provider = self
        self.requests: list[dict[str, Any]] = []
        self.echoed: list[str] = []  # the bodies POST /echo got, in order (a script's countable side effect)
        self.open_gates: set[str] = set()  # GET /gate/NAME says whether a test opened it (POST /gate/NAME)
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # gate name -> calls waiting at it now
        self._gate_opened = threading.Condition(self._lock)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: without this, Nagle's
            # algorithm and the client's delayed ACK add 40 ms to every answer.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                with provider._lock:
                    provider.requests.append({"path": self.path, "body": None, "headers": dict(self.headers)})
                if parts.path.startswith("/gate/"):
                    return self._json(200, {"open": parts.path[6:] in provider.open_gates})
                if parts.path.startswith("/hold/"):
                    provider._hold(parts.path[6:])
                    return self._json(200, {"open": parts.path[6:] in provider.open_gates})
                if parts.path == "/article":
                    count = int(query.get("paragraphs", "3"))
                    text = "\n\n".join(f"Paragraph {i + 1} says something worth knowing." for i in range(count))
                    return self._raw(200, text.encode(), "text/plain; charset=utf-8")
                if parts.path.startswith("/doc/"):
                    return self._json(200, {"name": parts.path[5:], "sections": ["intro", "usage", "faq"]})
                if parts.path == "/big":
                    return self._raw(200, b"x" * (int(query.get("kb", "1")) << 10), "text/plain")
                if parts.path == "/slow":
                    time.sleep(int(query.get("ms", "0")) / 1000)
                    return self._json(200, {"slept_ms": int(query.get("ms", "0"))})
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                if self.path.startswith("/gate/"):
                    provider.open_gate(self.path[6:])
                    return self._json(200, {"open": True})
                if self.path == "/echo":
                    data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    with provider._lock:
                        provider.echoed.append(data.decode(errors="replace"))
                    return self._raw(200, data, self.headers.get("Content-Type", "application/octet-stream"))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with provider._lock:
                    provider.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    count = provider._counts[body.get("model", "")] = provider._counts.get(body.get("model", ""), 0) + 1
                if self.path == "/v1/embeddings":
                    return self._embeddings(body)
                if self.path != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": f"no route {self.path}"}})
                model = str(body.get("model", ""))
                if model == "fail":
                    return self._json(500, {"error": {"message": "the stand-in fails on purpose"}})
                if model.startswith("ratelimit-") and count <= int(model.split("-")[1]):
                    return self._json(429, {"error": {"message": "slow down"}})
                if model.startswith("slow-"):
                    time.sleep(int(model.split("-")[1]) / 1000)
                if model.startswith("hold-"):
                    provider._hold(model[5:])
                unknown = sorted(set(body) - OPENAI_CHAT_FIELDS) if model == "strict" else []
                if unknown:
                    return self._json(400, {"error": {"message": "Unrecognized request argument supplied: "
                                                      + ", ".join(unknown), "type": "invalid_request_error"}})
                if model == "notjson":
                    return self._raw(200, b"<html>oops</html>", "text/html")
                messages = body.get("messages") or []
                last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
                answer = f"echo: {last}"
                usage = {"prompt_tokens": sum(_words(m.get("content")) for m in messages),
                         "completion_tokens": _words(answer)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                if body.get("stream"):
                    return self._stream(model, answer, usage)
                self._json(200, {
                    "id": f"cmpl-{count}", "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": usage,
                })

            def _embeddings(self, body: dict[str, Any]) -> None:
                model = str(body.get("model", ""))
                if not model.startswith("hash-"):
                    return self._json(500 if model == "fail" else 404, {"error": {"message": f"no model {model}"}})
                texts = body.get("input")
                texts = [texts] if isinstance(texts, str) else list(texts or [])
                data = [{"object": "embedding", "index": i, "embedding": hash_embedding(text, int(model[5:]))}
                        for i, text in enumerate(texts)]
                self._json(200, {"object": "list", "model": model, "data": data,
                                 "usage": {"prompt_tokens": sum(_words(t) for t in texts)}})

            def _stream(self, model: str, answer: str, usage: dict[str, int]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                words = answer.split(" ")
                for i, word in enumerate(words):
                    delta = {"content": word + (" " if i < len(words) - 1 else "")}
                    chunk = {"object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                    self.wfile.flush()
                final = {"object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}
                self.wfile.write(f"data: {json.dumps(final, ensure_ascii=False)}\n\ndata: [DONE]\n\n".encode())
                self.close_connection = True

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                self._raw(status, json.dumps(payload).encode(), "application/json")

            def _raw(self, status: int, data: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the caller gave up (a timeout under test)

        self.server = _Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://{host}:{self.port}"
        self.base_url = f"{self.origin}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, name="stand-in-provider", daemon=True)

    def _hold(self, gate: str) -> None:
        """Keep a model call waiting until ``gate`` opens (at most 60 s)."""
        with self._gate_opened:
            self._held[gate] = self._held.get(gate, 0) + 1
            try:
                self._gate_opened.wait_for(lambda: gate in self.open_gates, timeout=60)
            finally:
                self._held[gate] -= 1

    def held(self, gate: str) -> int:
        """How many model calls wait at ``gate`` right now."""
        with self._lock:
            return self._held.get(gate, 0)

    def open_gate(self, gate: str) -> None:
        with self._gate_opened:
            self.open_gates.add(gate)
            self._gate_opened.notify_all()

    def start(self) -> StandInProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def sent(self, model: str) -> list[dict[str, Any]]:
        """The requests received for ``model``."""
        with self._lock:
            return [r for r in self.requests if (r["body"] or {}).get("model") == model]
