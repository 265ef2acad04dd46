"""A run's session reading what the run sends: a real socket pair, the run's side written by the test."""
from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

from flowpool.sandbox.channel import _HEADER, Channel
from flowpool.sandbox.protocol import RunOutcome, SandboxLimits
from flowpool.sandbox.session import RunSession


def test_a_result_whose_frame_pauses_midway_while_log_lines_wait_is_read_whole() -> None:
    # Log lines waiting shorten the session's wait to when they are due (10 ms at least); a wait that ran
    # out in the middle of a frame used to lose the frame's first bytes, and the next read took the rest
    # for a length: a valid result ended as "over the size limit".
    worker_end, run_end = socket.socketpair()
    lines: list[dict[str, Any]] = []
    session = RunSession(SimpleNamespace(pid=1, sock=worker_end), zygote=None, limits=SandboxLimits(),  # type: ignore[arg-type]
                         soft_seconds=30, hard_grace_seconds=5, outcome=RunOutcome(),
                         on_log=lambda line, cut: lines.append(line), on_idle=lambda: None)
    result = {"op": "result", "value": {"rows": ["x" * 100] * 1000}}
    payload = json.dumps(result).encode()
    frame = _HEADER.pack(len(payload)) + payload

    def run_side() -> None:
        Channel(run_end).send({"op": "log", "level": "info", "msg": "about to answer"})
        time.sleep(0.05)  # the session hands the line on, then waits 0.2 s for the next batch of lines
        run_end.sendall(frame[:1000])
        time.sleep(0.3)  # a run process held up mid-send, past the lines' wait
        run_end.sendall(frame[1000:])

    Channel(run_end).send({"op": "log", "level": "info", "msg": "first"})
    sender = threading.Thread(target=run_side)
    sender.start()
    try:
        session.follow()
    finally:
        sender.join(10)
        worker_end.close()
        run_end.close()
    assert session.outcome.error is None, session.outcome.error
    assert session.outcome.result == result["value"]
    assert [line["msg"] for line in lines] == ["first", "about to answer"]
