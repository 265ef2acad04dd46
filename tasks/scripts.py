"""Compiled workflow scripts kept warm in a worker, so a run of a known version skips compiling."""
from __future__ import annotations

import marshal
import threading
from collections import OrderedDict
from typing import NamedTuple

from flowpool.registry import Workflows

__all__ = ["CompiledScript", "ScriptCache", "script_filename"]


def script_filename(ref: str) -> str:
    """The file name a workflow's code is compiled under: what its tracebacks show, never a path of the worker."""
    return f"workflow:{ref}"


class CompiledScript(NamedTuple):
    """A script version compiled once, and its source for the run's tracebacks."""

    code: bytes  # marshalled code object
    source: str  # for the tracebacks of the run


class ScriptCache:
    """Compiled script versions kept warm in a worker, by content hash and workflow name (LRU)."""

    def __init__(self, workflows: Workflows, size: int) -> None:
        self.workflows = workflows
        self.size = size
        self._code: OrderedDict[tuple[str, str], CompiledScript] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, account_id: str, ref: str, version: str, content_hash: str) -> CompiledScript:
        """The compiled script of a version, compiled on first use."""
        # The name is part of the key: the same source under another name (of another account, say)
        # must not show that name in its tracebacks.
        key = (content_hash, ref)
        with self._lock:
            code = self._code.get(key)
            if code is not None:
                self._code.move_to_end(key)
                return code
        source = self.workflows.load_script(account_id, ref, version)
        code = CompiledScript(marshal.dumps(compile(source, script_filename(ref), "exec", dont_inherit=True)), source)
        with self._lock:
            self._code[key] = code
            while len(self._code) > self.size:
                self._code.popitem(last=False)
        return code
