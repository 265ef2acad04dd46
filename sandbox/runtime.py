"""The code that runs inside a sandboxed run process: build ``ctx``, run the script, report.

It speaks the run's half of the protocol :mod:`.protocol` specifies: it
takes one ``run`` job (a warm process, one after another: :mod:`.reuse`),
sends what the script emits, logs and asks of ``ctx``, turns each failed ctx
call into the exception :mod:`flowpool_workflow` maps its kind to, and ends
each run with one ``result`` or ``error``. Where the sandbox has
no network, the socket layer's errors say so and name ``ctx.http``
(:mod:`.no_network`). It imports the stdlib and flowpool_workflow only, all
of it before the zygote covers flowpool's code.
"""
from __future__ import annotations

import base64
import itertools
import json
import linecache
import marshal
import math
import os
import resource
import signal
import sys
import threading
import traceback
import types
from typing import Any, Iterator

from flowpool_workflow import CALL_ERRORS, SoftTimeLimitExceeded, WorkflowContext, WorkflowError

from .channel import Channel, ChannelClosed, blocking_socket
from .no_network import install as install_network_hint
from .protocol import CallErrorKind, RunErrorKind
from .reuse import Baseline

__all__ = ["serve"]

_WARM_FILENAME = "workflow:warm-up"  # the name of the script the zygote runs to warm up


class _Transport:
    """Frames to and from the worker; safe to use from threads the script starts."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._ids = itertools.count(1)

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._channel.send(message)

    def _replies(self, method: str, params: dict[str, Any]) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """The worker's answers to one call, each with the descriptors that came with it (the receiver's to close).

        Every frame is read with ``recvmsg``, since a plain read would drop a
        descriptor the worker sent. Answers to an earlier call that the soft
        limit interrupted are passed over, their descriptors closed.
        """
        call_id = next(self._ids)
        self.send({"op": "call", "id": call_id, "method": method, "params": params})
        while True:
            message, fds = self._channel.recv_with_fds()
            if message.get("id") != call_id:
                _close(fds)
                continue
            error = message.get("error")
            if error:
                _close(fds)
                raise _call_error(error)
            yield message, fds
            if message["op"] == "reply":
                return

    def call(self, method: str, params: dict[str, Any]) -> Any:
        return self.call_with_file(method, params, want_file=False)[0]

    def call_with_file(self, method: str, params: dict[str, Any], want_file: bool = True) -> tuple[Any, int | None]:
        """A call answered with a value and, with ``want_file``, the read-only file the worker sent with it."""
        with self._call_lock:
            for message, fds in self._replies(method, params):
                if message["op"] != "reply":
                    _close(fds)
                    continue
                if not want_file:
                    _close(fds)
                    return message.get("value"), None
                if len(fds) != 1 or message.get("fds") != 1:
                    _close(fds)
                    raise WorkflowError(
                        f"ctx call {method!r} came without its file: the run may be at its open-files limit "
                        f"({resource.getrlimit(resource.RLIMIT_NOFILE)[0]})")
                return message.get("value"), fds[0]
        return None, None

    def stream(self, method: str, params: dict[str, Any]) -> Iterator[Any]:
        with self._call_lock:
            for message, fds in self._replies(method, params):
                _close(fds)
                if message["op"] == "chunk":
                    yield message.get("value")


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _call_error(error: dict[str, Any]) -> Exception:
    """The exception a ctx call raises in the script for the worker's ``error`` answer."""
    message = error.get("message", "the call failed")
    try:
        kind = CallErrorKind(error.get("kind"))
    except ValueError:  # not a kind this runtime knows: still an error the script can catch
        return WorkflowError(message)
    if kind is CallErrorKind.TIMEOUT:  # the worker saw the soft limit pass before our alarm rang
        message = f"the run reached its soft time limit: {error.get('message')}"
    return CALL_ERRORS[kind](message)


class _StreamToLog:
    """Turns ``print`` output into log lines of the run, one per line written."""

    def __init__(self, transport: _Transport, level: str, stream: str) -> None:
        self._transport, self._level, self._stream = transport, level, stream
        self._buf = ""

    def write(self, text: str) -> int:
        self._buf += text
        # Flush whole lines, and long partial lines too, so a print without
        # end cannot grow memory here; the worker caps what it keeps.
        while "\n" in self._buf or len(self._buf) >= 8192:
            line, sep, rest = self._buf.partition("\n") if "\n" in self._buf else (self._buf[:8192], "", self._buf[8192:])
            self._buf = rest
            self._transport.send({"op": "log", "level": self._level, "msg": line, "fields": {"stream": self._stream}})
        return len(text)

    def flush(self) -> None:
        if self._buf:
            line, self._buf = self._buf, ""
            self._transport.send({"op": "log", "level": self._level, "msg": line, "fields": {"stream": self._stream}})

    def isatty(self) -> bool:
        return False


def _on_soft_limit(signum: int, frame: object) -> None:
    raise SoftTimeLimitExceeded("the run reached its soft time limit")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _script_traceback(exc: BaseException, filename: str) -> str:
    """The traceback of the script's own frames only: no frame of the runtime, flowpool or the stdlib.

    The worker compiles each script under the name ``workflow:<ref>``, so the
    frames kept name the workflow, never a path of the worker's host.
    Chained exceptions (``raise ... from``, or raised while handling another)
    are cut the same way.
    """
    shown = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    pending = [shown]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.stack = traceback.StackSummary.from_list([f for f in current.stack if f.filename == filename])
        pending += [c for c in (current.__cause__, current.__context__) if c is not None]
    return "".join(shown.format())


class _NullTransport:
    def send(self, message: dict[str, Any]) -> None:
        json.dumps(message)

    def call(self, method: str, params: dict[str, Any]) -> Any:
        return None

    def call_with_file(self, method: str, params: dict[str, Any]) -> tuple[Any, int | None]:
        return None, None

    def stream(self, method: str, params: dict[str, Any]) -> Iterator[Any]:
        return iter(())


# Compiled once, in the zygote: a run process pays no compilation to warm up.
_WARM_CODE = base64.b64encode(marshal.dumps(compile("def execute(ctx):\n    return {'ok': [1, 2.0, None]}\n",
                                                    _WARM_FILENAME, "exec"))).decode()


def _warm_up() -> None:
    """Walk the code paths a run takes, before the job comes.

    A forked process shares its memory with the zygote until it writes to it,
    and merely using an object writes its reference count: the first run of
    each path copies pages. Doing that here keeps it off the caller's clock.
    """
    message = json.loads(json.dumps({"op": "run", "code": _WARM_CODE, "job": {"input": {"a": [1]}}}))
    module = types.ModuleType("warm")
    exec(marshal.loads(base64.b64decode(message["code"])), module.__dict__)
    ctx = WorkflowContext(message["job"], _NullTransport())
    ctx.emit("warm", {"x": 1})
    ctx.log.info("warm", n=1)
    json.dumps({"op": "result", "value": module.execute(ctx)}, separators=(",", ":"), ensure_ascii=False)
    signal.setitimer(signal.ITIMER_REAL, 0)


def serve(fd: int, no_network: bool = False, reusable: bool = False) -> None:
    """Run the jobs received on ``fd``, reporting each one's outcome; returns when the process is done.

    ``no_network``: the sandbox has none (seccomp refuses sockets, or the network namespace is empty), so the
    socket layer's errors say so and name ``ctx.http`` (:mod:`.no_network`). ``reusable``: the run has
    namespaces of its own, so after a run the worker asked to keep (``reuse``) this process tidies up
    (:class:`~.reuse.Baseline`) and says ``ready``; the worker then checks it, stopped, and may keep it for the
    next run of the same version of the same account. Otherwise, as always before, it takes one job.
    """
    channel = Channel(blocking_socket(fd))
    if no_network:
        install_network_hint()
    transport = _Transport(channel)
    _warm_up()
    baseline: Baseline | None = None
    module: types.ModuleType | None = None
    code_text = None
    while True:
        try:
            request = channel.recv()
        except ChannelClosed:
            return  # the worker retired this warm process
        reuse = reusable and bool(request.get("reuse"))
        if reuse and baseline is None:
            baseline = Baseline()  # what this process holds before its first run: what each later run gets
        if not reuse or request["code"] != code_text:
            module, code_text = None, request["code"]  # a warm process serves one version: the same code
        reuse = _allow_cpu(int(request["cpu_seconds"]), reuse)
        module, payload = _run_one(transport, request, module)
        _flush_streams()
        if module is None:
            reuse = False  # its code failed, or the soft limit interrupted it: no other run follows here
        # The answer first: tidying up (a /tmp of many files, say) must not count against the run's time.
        channel.send_bytes(payload)
        if not reuse:
            return
        assert baseline is not None
        if not baseline.restore():
            return  # the worker takes the channel's end as the process retiring itself
        # Only tidying: the worker decides, from the kernel's view of this process once it is stopped, whether
        # to keep it (sandbox.warm); "ready" only says the tidying is done.
        channel.send({"op": "ready"})


def _allow_cpu(seconds: int, reuse: bool) -> bool:
    """Give this run ``seconds`` of CPU time; whether the process may still be kept afterwards.

    RLIMIT_CPU counts a process's whole life. A run in a process that is not
    kept gets it as soft and hard limit, as ever; a warm process keeps the
    hard limit it was started under (the longest run's budget) and each run
    moves the soft one (SIGXCPU) to what it used so far plus its own budget.
    The containment monitor bounds each run's CPU time too, whatever a script
    does to its soft limit. The worker hands a warm process a run only while
    its hard limit leaves room for the run's whole budget (sandbox.warm); one
    that does not (never expected) gives the run what is left, and is not kept.
    """
    if reuse:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
            return True
        seconds = hard
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
    return False


def _run_one(transport: _Transport, request: dict[str, Any],
             module: types.ModuleType | None) -> tuple[types.ModuleType | None, bytes]:
    """Run one job, ``module`` being the version's module from an earlier run in this process, if any: the
    module (None when it must not serve another run: its code failed, or the soft limit interrupted it) and the
    final message (a ``result`` or an ``error``) as JSON."""
    job = request["job"]
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in (job.get("env") or {}).items()})
    os.environ.update({"HOME": os.getcwd(), "TMPDIR": os.getcwd(), "PATH": "/usr/local/bin:/usr/bin:/bin"})
    ctx = WorkflowContext(job, transport)
    sys.stdout = _StreamToLog(transport, "info", "stdout")  # type: ignore[assignment]
    sys.stderr = _StreamToLog(transport, "warning", "stderr")  # type: ignore[assignment]

    code = marshal.loads(base64.b64decode(request["code"]))
    filename = code.co_filename  # the worker's name for the script: workflow:<ref>
    signal.signal(signal.SIGALRM, _on_soft_limit)
    signal.setitimer(signal.ITIMER_REAL, float(request["soft_seconds"]))
    outcome: dict[str, Any]
    try:
        try:
            if module is None:
                fresh = types.ModuleType("workflow")
                fresh.__file__ = filename
                sys.modules["workflow"] = fresh
                if request.get("source"):
                    source = request["source"]
                    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
                exec(code, fresh.__dict__)
                module = fresh  # only a module whose code ran to its end serves the next run
            result = module.execute(ctx)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            payload = json.dumps({"op": "result", "value": result}, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            outcome = {"op": "error", "kind": RunErrorKind.RESULT.value, "type": type(exc).__name__,
                       "message": f"the result is not JSON-serializable: {exc}"}
        else:
            return module, payload.encode()
    except SoftTimeLimitExceeded as exc:
        outcome = {"op": "error", "kind": RunErrorKind.TIMEOUT.value, "type": type(exc).__name__,
                   "message": str(exc), "traceback": _script_traceback(exc, filename)}
        module = None
    except BaseException as exc:  # the script may raise anything, SystemExit included
        outcome = {"op": "error", "kind": RunErrorKind.SCRIPT.value, "type": type(exc).__name__,
                   "message": _describe(exc), "traceback": _script_traceback(exc, filename)}
    return module, json.dumps(outcome, separators=(",", ":"), ensure_ascii=False).encode()


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the script may have replaced them
            pass
