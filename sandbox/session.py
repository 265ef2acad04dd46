"""One run followed from the worker's side: hand it its job, serve and record what it sends, enforce its limits.

A :class:`RunSession` speaks the worker's half of :mod:`.protocol` over the
run's channel, one method per ``op``. Time limits are enforced here, not by
Celery (whose limits only the prefork pool enforces): the run process arms
its own soft-limit timer, which raises
:class:`flowpool_workflow.SoftTimeLimitExceeded` in the script so its
``finally`` blocks run; the session kills it at the hard limit, whatever the
script does. A session blocks its worker thread on the run's socket.
"""
from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import threading
import time
from typing import Any, Callable

from flowpool.errors import InvalidResult, ResultTooLarge, RunError, SandboxError, ScriptError, TimeLimitExceeded
from flowpool.jsonsafe import find_problem, find_problem_in

from .channel import Channel, ChannelClosed, ProtocolError
from .protocol import (CallErrorKind, CallFailed, CallHandler, RunErrorKind, RunOutcome, SandboxLimits, Streamed,
                       WithFile, cpu_budget)
from .run_process import RunProcess
from .zygote_client import Zygote

__all__ = ["RunSession", "StopRequest"]

_SIGNAL_HINTS = {signal.SIGKILL: "killed (memory or CPU limit, or from outside)",
                 signal.SIGXCPU: "CPU time limit", signal.SIGSEGV: "segmentation fault"}

# A frame may hold a whole result, plus the envelope around it.
_FRAME_OVERHEAD = 64 << 10

# Log lines that come without an emit are handed on at most this often (an emit or a ctx call hands them on at
# once): a run that prints in a loop costs its worker a round trip to Redis per interval, not one per line.
_LOG_EVERY = 0.2


def _unshowable(content: Any, chunk_type: str, max_depth: int) -> int | str:
    """The size of an emitted chunk's content as JSON, or why it cannot be stored and shown.

    The content is serialized anyway, for its size; the walk that finds
    nesting past ``max_depth``, a NaN or a lone surrogate runs only when that
    text hints at one (:func:`~flowpool.jsonsafe.find_problem_in`), or when
    there is no text at all, so an ordinary chunk costs no second pass.
    """
    try:
        text: str | None = json.dumps(content, allow_nan=False)
    except (ValueError, RecursionError):
        text = None
    problem = find_problem(content, max_depth) if text is None else find_problem_in(content, text, max_depth)
    if problem is not None:
        path, what = problem
        return f"an emitted chunk's content{' field ' + path if path else ''} {what}"
    if not chunk_type.isascii():
        try:
            chunk_type.encode()
        except UnicodeEncodeError:
            return "an emitted chunk's type holds a lone surrogate, which is not valid Unicode"
    return len(text) if text is not None else 0


class _RunGone(Exception):
    """The run's end of the channel took no more: it died, or stopped reading."""


class StopRequest:
    """Asks for a run to be stopped, with the error it then ends with: why it was stopped.

    Its supervisor (:meth:`RunSession.follow`) looks at it between messages.
    The first to ask names the reason: the caller that went away
    (:class:`~flowpool.errors.Cancelled`), or the worker shutting down
    (:class:`~flowpool.errors.WorkerLost`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: RunError | None = None

    def ask(self, reason: RunError) -> None:
        """Ask for the run to stop, ending with ``reason`` unless someone asked first."""
        with self._lock:
            if self.reason is None:
                self.reason = reason


class RunSession:
    """The worker's side of one run: its deadlines, its callbacks, and the outcome it fills in."""

    def __init__(self, process: RunProcess, zygote: Zygote, limits: SandboxLimits, soft_seconds: float,
                 hard_grace_seconds: float, outcome: RunOutcome, *,
                 on_emit: Callable[[str, Any], None] | None = None, on_call: CallHandler | None = None,
                 cancel: StopRequest | None = None, on_idle: Callable[[], None] | None = None,
                 on_log: Callable[[dict[str, Any], bool], None] | None = None) -> None:
        assert process.pid is not None and process.sock is not None
        self.process = process
        self.limits = limits
        self.soft_seconds = soft_seconds
        self.hard_grace_seconds = hard_grace_seconds
        self.outcome = outcome
        self.soft_deadline = time.monotonic() + soft_seconds
        self.hard_deadline = self.soft_deadline + hard_grace_seconds
        self.channel = Channel(process.sock, max_frame=limits.max_result_bytes + _FRAME_OVERHEAD)
        self._zygote = zygote
        self._emit_to = on_emit
        self._serve_call = on_call
        self._cancel = cancel
        self._idle = on_idle
        self._log_to = on_log
        self._log_bytes = 0
        self._emitted = False  # emits not yet handed on by on_idle
        self._logged = False  # log lines not yet handed on by on_idle
        self._handed_on = -float("inf")  # when on_idle last ran (time.monotonic())
        self._pending = select.poll()  # whether the run has sent more (poll: descriptors may be past 1024)
        self._pending.register(process.sock, select.POLLIN)
        # Whether the run ended cleanly (a result in time, or the script's own error): only then may the sandbox
        # offer its process to the warm pool, which checks it for itself (sandbox.warm). What the process says
        # of itself is never trusted.
        self.reusable = False
        self._handlers: dict[str, Callable[[dict[str, Any]], bool]] = {
            "call": self.on_call, "emit": self.on_emit, "log": self.on_log, "result": self.on_result,
            "error": self.on_error}

    @property
    def cpu_seconds(self) -> int:
        """The run's CPU time budget: the workflow's own limit, within a backstop for the hard limit (whole seconds)."""
        return cpu_budget(self.soft_seconds + self.hard_grace_seconds, self.limits.cpu_seconds)

    def start(self, code: bytes, job: dict[str, Any], source: str | None, reuse: bool = False) -> None:
        """Hand the job to the run process; OSError when it died before it took the job.

        ``reuse``: the process may be kept for another run afterwards, so it
        sets its CPU limit for that and, after its answer, tidies up and says
        ``ready`` (read by :meth:`.warm.WarmPool.settle`, not here).
        """
        message = {"op": "run", "code": base64.b64encode(code).decode(), "source": source, "job": job,
                   "soft_seconds": self.soft_seconds, "cpu_seconds": self.cpu_seconds}
        if reuse:
            message["reuse"] = True
        self.channel.send(message)

    def follow(self) -> None:
        """Serve and record what the run sends until it is over: a result, an error, a limit, a crash or a cancel."""
        while True:
            # on_idle runs once the run has nothing more to send right now, so
            # a burst of emits is handed on in one batch; log lines alone wait
            # till _LOG_EVERY has passed since the last time.
            lines_due = self._handed_on + _LOG_EVERY
            if (self._emitted or (self._logged and time.monotonic() >= lines_due)) and not self._pending.poll(0):
                self._hand_on()
            if self._cancel is not None and self._cancel.reason is not None:
                self._kill(self._cancel.reason)
                return
            remaining = self.hard_deadline - time.monotonic()
            if remaining <= 0:
                self._kill(TimeLimitExceeded(
                    f"the run passed its hard time limit ({self.soft_seconds + self.hard_grace_seconds:g}s) "
                    "and was killed", limit="hard", seconds=self.soft_seconds))
                return
            # With a cancel event, wake up now and then to look at it; with log lines waiting, when they are due.
            # The wait is for the start of a message: once one has begun it is read whole (within the hard
            # limit), since a timeout in the middle of a frame would lose its first bytes and the next read
            # would take the rest for a length.
            wait = min(remaining, 0.25) if self._cancel is not None else remaining
            if self._logged:
                wait = min(wait, max(0.01, lines_due - time.monotonic()))
            if not self._pending.poll(max(1, int(wait * 1000))):
                continue
            self.channel.sock.settimeout(max(0.01, self.hard_deadline - time.monotonic()))
            try:
                message = self.channel.recv()
            except socket.timeout:
                continue  # the hard limit came mid-message: the next turn kills the run
            except ChannelClosed:
                self.outcome.error = self.crashed()
                return
            except ProtocolError as exc:
                self.on_protocol_error(exc)
                return
            if self._handlers.get(message["op"], self.on_unknown)(message):
                return

    # One method per op the run sends: each returns whether the run is over.

    def on_call(self, message: dict[str, Any]) -> bool:
        """Serve one ctx call of the run: a reply, or chunks then an end, or an error.

        Chunks and log lines the run sent before the call are handed on
        first: serving it may block for as long as a model or HTTP call takes.
        """
        self._hand_on()
        try:
            self._answer_call(message)
        except _RunGone:
            pass  # the run died or stopped reading: the next recv or the deadline says which
        return False

    def on_emit(self, message: dict[str, Any]) -> bool:
        """Hand a chunk to the caller, killing a run past its chunk limits."""
        self.outcome.chunks += 1
        if self.outcome.chunks > self.limits.max_chunks:
            self._kill(ResultTooLarge(f"the run emitted more than {self.limits.max_chunks} chunks"))
            return True
        content, chunk_type = message.get("content"), str(message.get("type"))
        problem = _unshowable(content, chunk_type, self.limits.max_json_depth)
        if isinstance(problem, str):  # it would break every reader of the run's stream
            self._kill(InvalidResult(problem))
            return True
        if problem + len(chunk_type) > self.limits.max_chunk_bytes:
            self._kill(ResultTooLarge(f"an emitted chunk is over {self.limits.max_chunk_bytes} bytes"))
            return True
        if self._emit_to is not None:
            self._emit_to(chunk_type, content)
            self._emitted = True
        return False

    def on_log(self, message: dict[str, Any]) -> bool:
        """Keep a log line, until the log reaches its size limit, and pass it to ``on_log``: handed on with the
        emits, before a ctx call, or on its own at most every ``_LOG_EVERY`` seconds.

        The line that passes the limit is replaced by one saying the log was
        cut, the last kept and handed on: the live log and the record's end alike.
        """
        outcome, limit = self.outcome, self.limits.max_log_bytes
        if outcome.logs_truncated:
            return False
        line = {"level": str(message.get("level", "info")), "msg": str(message.get("msg", "")), "time": time.time()}
        fields = message.get("fields")
        if isinstance(fields, dict) and fields:
            problem = find_problem(fields, self.limits.max_json_depth)
            line["fields"] = fields if problem is None else {"unreadable": f"field {problem[0]} {problem[1]}"}
            self._log_bytes += len(json.dumps(line["fields"]))
        self._log_bytes += len(line["msg"]) + len(line["level"]) + 40
        if self._log_bytes > limit:
            outcome.logs_truncated = True
            line = {"level": "warning", "msg": f"log cut at {limit} bytes", "time": time.time()}
        outcome.logs.append(line)
        if self._log_to is not None:
            self._log_to(line, outcome.logs_truncated)
            self._logged = True
        return False

    def on_result(self, message: dict[str, Any]) -> bool:
        """Record the run's result, unless it is too large or came past the soft limit."""
        outcome = self.outcome
        outcome.result = message.get("value")
        outcome.result_json = json.dumps(outcome.result, separators=(",", ":"), ensure_ascii=False)
        if len(outcome.result_json.encode()) > self.limits.max_result_bytes:
            outcome.result = outcome.result_json = None
            outcome.error = ResultTooLarge(f"the result is over {self.limits.max_result_bytes} bytes")
        elif time.monotonic() > self.soft_deadline:
            outcome.result = outcome.result_json = None
            outcome.error = TimeLimitExceeded(f"the run passed its soft time limit ({self.soft_seconds:g}s)",
                                              limit="soft", seconds=self.soft_seconds)
        self.reusable = outcome.error is None
        return True

    def on_error(self, message: dict[str, Any]) -> bool:
        """Record how the script failed."""
        if message.get("kind") == RunErrorKind.TIMEOUT.value or time.monotonic() > self.soft_deadline:
            # Past the soft limit whatever failed is the limit's doing (a cleanup that raised, say).
            self.outcome.error = TimeLimitExceeded(
                f"the run passed its soft time limit ({self.soft_seconds:g}s) and was interrupted",
                limit="soft", seconds=self.soft_seconds)
        else:
            self.outcome.error = ScriptError(str(message.get("message", "the script failed")),
                                             exception=str(message.get("type", "")),
                                             traceback=str(message.get("traceback", ""))[-8192:])
            self.reusable = True
        return True

    def on_unknown(self, message: dict[str, Any]) -> bool:
        """Kill a run that sends an op outside the protocol."""
        self._kill(SandboxError(f"the run sent an unknown message {message['op']!r}"))
        return True

    def on_protocol_error(self, exc: ProtocolError) -> None:
        """Kill a run that sent a frame over the size limit, or one that is no message."""
        if "over the limit" in str(exc):
            self._kill(ResultTooLarge(
                f"the run sent a message over the size limit ({self.limits.max_result_bytes} bytes for a result)"))
        else:
            self._kill(SandboxError(f"the run broke the sandbox protocol: {exc}"))

    def crashed(self) -> SandboxError:
        """Why the run process ended without a result, from the exit status the zygote saw."""
        assert self.process.pid is not None
        status = self._zygote.wait_exit(self.process.pid, 2.0)
        if status is None:
            self.process.kill()
            return SandboxError("the sandbox process closed its channel without a result")
        if "signal" in status:
            sig = status["signal"]
            hint = _SIGNAL_HINTS.get(sig, "")
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return SandboxError(f"the sandbox process died from signal {name}" + (f" ({hint})" if hint else ""),
                                signal=sig)
        return SandboxError(f"the sandbox process exited with code {status['code']} without a result",
                            exit_code=status["code"])

    def close(self) -> None:
        """Close the worker's end of the run's channel."""
        self.channel.close()

    def _hand_on(self) -> None:
        if (self._emitted or self._logged) and self._idle is not None:
            self._idle()
            self._handed_on = time.monotonic()
        self._emitted = self._logged = False

    def _kill(self, error: RunError) -> None:
        self.reusable = False
        self.process.kill()
        self.outcome.error = error

    def _answer_call(self, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        try:
            if self._serve_call is None:
                raise CallFailed(CallErrorKind.UNSUPPORTED, "this worker serves no ctx calls")
            method, params = message.get("method"), message.get("params")
            if not isinstance(method, str) or not isinstance(params, dict):
                raise CallFailed(CallErrorKind.INVALID, "a ctx call needs a method name and a params object")
            try:
                value = self._serve_call(method, params, self.soft_deadline)
            except OSError as exc:  # a server that let one through: still an answer, not a run left waiting
                raise CallFailed(CallErrorKind.UNAVAILABLE, f"ctx call {method} failed on the worker: "
                                 f"{type(exc).__name__}") from exc
            if isinstance(value, Streamed):
                for chunk in value.chunks:
                    self._send({"op": "chunk", "id": call_id, "value": chunk})
                self._send({"op": "reply", "id": call_id, "end": True})
            elif isinstance(value, WithFile):
                try:  # the file's descriptor goes with the reply; none of its bytes cross the channel
                    self._send({"op": "reply", "id": call_id, "value": value.value, "fds": 1}, fds=[value.fd])
                finally:
                    os.close(value.fd)
            else:
                self._send({"op": "reply", "id": call_id, "value": value})
        except CallFailed as exc:
            kind = exc.kind
            if time.monotonic() >= self.soft_deadline:
                # The call failed because the run's budget ran out (its own alarm may not have rung yet):
                # the script sees the soft limit, not a model or HTTP error it might not expect.
                kind = CallErrorKind.TIMEOUT
            self._send({"op": "reply", "id": call_id, "error": {"kind": kind.value, "message": exc.message}})

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send the run a frame, within the hard limit; :class:`_RunGone` when it cannot take it.

        Only sending is read as the run being gone: an OSError from serving
        the call is the server's, and must reach the run as an error reply.
        """
        try:
            self.channel.sock.settimeout(max(0.01, self.hard_deadline - time.monotonic()))
            self.channel.send(message, fds or ())
        except (OSError, socket.timeout) as exc:
            raise _RunGone() from exc
