"""Isolation of workflow runs: the zygote, the run process runtime and the worker's side of each run.

The worker's side (:class:`Sandbox`, :class:`Zygote`) is imported on first
use: the in-sandbox side imports :mod:`.protocol` through this package, and
must not pull in threads, subprocesses and flowpool's errors with it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .protocol import (CallErrorKind, CallFailed, CallHandler, RunErrorKind, RunOutcome, SandboxLimits, Streamed,
                       WithFile)

if TYPE_CHECKING:
    from .sandbox import Sandbox
    from .zygote_client import Zygote

__all__ = ["CallErrorKind", "CallFailed", "CallHandler", "RunErrorKind", "RunOutcome", "Sandbox", "SandboxLimits",
           "Streamed", "WithFile", "Zygote"]


def __getattr__(name: str) -> Any:
    # Written out rather than with flowpool.lazy: the in-sandbox runtime imports this package, and
    # importing flowpool_workflow loads no other module of flowpool than the protocol (a test holds it).
    if name == "Sandbox":
        from .sandbox import Sandbox
        return Sandbox
    if name == "Zygote":
        from .zygote_client import Zygote
        return Zygote
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
